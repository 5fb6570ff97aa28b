# The operator image: dotsvlm with the `operator` extra only (no torch).
# Build from the repo root: docker build -f images/operator.Dockerfile -t dotsvlm-operator:0.1.0 .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY serving ./serving
RUN pip install --no-cache-dir '.[operator]'
USER 65532:65532
ENTRYPOINT ["dotsvlm", "operator"]
