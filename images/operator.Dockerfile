# The operator image: `dotsvlm operator` with the `operator` extra only (no torch), run as a non-root
# user; the chart runs it with a read-only root filesystem.
#
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t dotsvlm-operator:0.1.0 .
# Offline / from a local wheelhouse (what the tests do; see images/README.md):
#   docker build --network host --build-arg BASE_IMAGE=dotsvlm-base:bookworm \
#     --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/ -f images/operator.Dockerfile -t dotsvlm-operator:test .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Empty: install from the package index. A URL or folder: install only from that wheelhouse.
ARG PIP_FIND_LINKS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/dotsvlm/bin:$PATH

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /src/pyproject.toml
# hadolint ignore=SC2086
RUN set -eu; \
    if [ -n "$PIP_FIND_LINKS" ]; then index="--no-index --find-links $PIP_FIND_LINKS"; else index=""; fi; \
    python3 -m venv /opt/dotsvlm; \
    python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["operator"]))' > /tmp/requirements.txt; \
    /opt/dotsvlm/bin/pip install --no-cache-dir --disable-pip-version-check $index -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

# Then dotsvlm itself. One COPY: .dockerignore lets only pyproject.toml, README.md, operator/, serving/ in.
COPY . /src/
# hadolint ignore=SC2086
RUN set -eu; \
    if [ -n "$PIP_FIND_LINKS" ]; then index="--no-index --find-links $PIP_FIND_LINKS"; else index=""; fi; \
    /opt/dotsvlm/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps $index /src; \
    rm -rf /src; \
    if /opt/dotsvlm/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the operator image" >&2; exit 1; fi

# The same user as the chart's runAsUser.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["dotsvlm", "operator"]
