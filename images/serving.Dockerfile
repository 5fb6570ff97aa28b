# The serving image: Ray plus dotsvlm with the `serving` extra. The operator runs it as the Ray head and
# as the pool workers; the Serve application imports dotsvlm_serving from it.
# Build from the repo root: docker build -f images/serving.Dockerfile -t dotsvlm-serving:0.1.0 .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl procps && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY serving ./serving
RUN pip install --no-cache-dir '.[serving]'
ENV PYTHONUNBUFFERED=1
CMD ["ray", "start", "--head", "--block"]
