# The serving image: Ray and dotsvlm with the `serving` extra (torch, transformers, Ray Serve). The
# operator runs it as the Ray head and as the vision and LLM pool workers; the Serve application
# imports dotsvlm_serving from it. torch from the package index is the CUDA build: on GPU nodes
# (NVIDIA container runtime) it uses the GPUs, elsewhere it runs on CPU.
#
# Build from the repository root:
#   docker build -f images/serving.Dockerfile -t dotsvlm-serving:0.1.0 .
# Offline / from a local wheelhouse (what the tests do; see images/README.md):
#   docker build --network host --build-arg BASE_IMAGE=dotsvlm-base:bookworm \
#     --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/ -f images/serving.Dockerfile -t dotsvlm-serving:test .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Empty: install from the package index. A URL or folder: install only from that wheelhouse.
ARG PIP_FIND_LINKS=""
# What does not depend on dotsvlm comes first: a storage driver without copy-on-write (vfs, as in the
# tests) copies the whole filesystem for every instruction after the large dependency layer.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/dotsvlm/bin:$PATH HOME=/home/dotsvlm
# Ray needs a user with a home (its temp and session folders); the pods add /dev/shm and the model.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/dotsvlm dotsvlm
WORKDIR /home/dotsvlm
CMD ["ray", "start", "--head", "--block"]

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /src/pyproject.toml
# hadolint ignore=SC2086
RUN set -eu; \
    if [ -n "$PIP_FIND_LINKS" ]; then index="--no-index --find-links $PIP_FIND_LINKS"; else index=""; fi; \
    python3 -m venv /opt/dotsvlm; \
    python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["serving"]))' > /tmp/requirements.txt; \
    /opt/dotsvlm/bin/pip install --no-cache-dir --disable-pip-version-check $index -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

# Then dotsvlm itself. One COPY: .dockerignore lets only pyproject.toml, README.md, operator/, serving/ in.
COPY . /src/
# hadolint ignore=SC2086
RUN set -eu; \
    if [ -n "$PIP_FIND_LINKS" ]; then index="--no-index --find-links $PIP_FIND_LINKS"; else index=""; fi; \
    /opt/dotsvlm/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps $index /src; \
    rm -rf /src

USER 1000:1000
