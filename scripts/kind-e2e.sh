#!/usr/bin/env bash
# End to end on a throwaway kind cluster, for machines with Docker that allows privileged containers
# (kind runs each Kubernetes node as a privileged container):
#   build both images, create a kind cluster, load the images, install the Helm chart, serve the tiny
#   model on CPU (a DotsVLMDeployment with gpusPerReplica: 0), send one chat request with an image,
#   tear everything down.
#
# NOT RUN IN THIS PROJECT'S CI OR DEV MACHINES: they refuse privileged containers ("unable to apply
# caps"), so kind cannot start there. What is tested there instead: tests/operator/test_chart.py (the
# chart rendered, dry-run on a real API server, installed, the operator run as the chart's
# ServiceAccount reconciling a sample, upgrade, uninstall, RBAC) on a kwok control plane, and
# tests/serving/ (the Serve application with the tiny model on a local Ray).
#
# Usage: scripts/kind-e2e.sh                 (from the repository root)
# Env:   CLUSTER (default dotsvlm-e2e)  KEEP=1 keeps the cluster for a look around
#        TIMEOUT (seconds to wait for Ready, default 1200: the first start pulls nothing but loads Ray)
# Needs: docker, kind (https://kind.sigs.k8s.io), kubectl, helm 3, curl, python3 (for the test image).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-dotsvlm-e2e}
TIMEOUT=${TIMEOUT:-1200}
TAG=e2e
NS=dotsvlm-e2e
NAME=tiny
PORT=18000

log() { printf '[kind-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
for tool in docker kind kubectl helm curl python3; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: '$tool' is not installed" >&2; exit 2; }
done

workdir=$(mktemp -d)
pf_pid=""
teardown() {
  rc=$?
  [ -n "$pf_pid" ] && kill "$pf_pid" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    log "FAILED; state for diagnosis:"
    kubectl get dvlm,pods -A -o wide 2>/dev/null || true
    kubectl describe dvlm "$NAME" -n "$NS" 2>/dev/null | tail -30 || true
    kubectl -n dotsvlm-system logs deploy/dotsvlm-operator --tail=50 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    log "KEEP=1: cluster $CLUSTER left running (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  rm -rf "$workdir"
  exit "$rc"
}
trap teardown EXIT

log "building images (images/*.Dockerfile)"
docker build -q -f images/operator.Dockerfile -t "dotsvlm-operator:$TAG" . >/dev/null
docker build -q -f images/serving.Dockerfile -t "dotsvlm-serving:$TAG" . >/dev/null

log "writing the tiny model with the serving image"
mkdir -p "$workdir/tiny" && chmod 777 "$workdir/tiny"
docker run --rm -v "$workdir/tiny:/out" "dotsvlm-serving:$TAG" dotsvlm model init-tiny /out --force >/dev/null

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 180s
kind load docker-image "dotsvlm-operator:$TAG" "dotsvlm-serving:$TAG" --name "$CLUSTER"
# The weights reach the pods through a hostPath on the (single) kind node.
docker exec "$CLUSTER-control-plane" mkdir -p /var/dotsvlm
docker cp "$workdir/tiny" "$CLUSTER-control-plane:/var/dotsvlm/tiny"

log "installing the chart"
helm install dotsvlm-operator charts/dotsvlm-operator -n dotsvlm-system --create-namespace --wait --timeout 300s \
  --set image.repository=dotsvlm-operator --set image.tag="$TAG" --set image.pullPolicy=Never

log "serving the tiny model (CPU)"
kubectl create namespace "$NS"
kubectl apply -n "$NS" -f - <<EOF
apiVersion: dotsvlm.io/v1alpha1
kind: DotsVLMDeployment
metadata: {name: $NAME}
spec:
  image: dotsvlm-serving:$TAG
  model:
    path: /models/tiny
    volume: {hostPath: {path: /var/dotsvlm}}
    quantization: none
    dtype: float32
  vision: {gpusPerReplica: 0, minReplicas: 1, maxReplicas: 1, shmSize: 1Gi,
           resources: {requests: {cpu: 500m, memory: 2Gi}}}
  llm: {gpusPerReplica: 0, tensorParallel: 1, minReplicas: 1, maxReplicas: 1, contextLength: 2048,
        maxRunningRequests: 4, shmSize: 1Gi, resources: {requests: {cpu: 500m, memory: 2Gi}}}
  head: {resources: {requests: {cpu: 500m, memory: 2Gi}}}
EOF
kubectl wait -n "$NS" "dvlm/$NAME" --for=condition=Ready --timeout="${TIMEOUT}s"
kubectl get dvlm -n "$NS" -o wide

log "one chat request with an image"
kubectl -n "$NS" port-forward "svc/$NAME-api" "$PORT:8000" >/dev/null 2>&1 &
pf_pid=$!
for _ in $(seq 60); do curl -fs "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
image=$(python3 -c 'import base64,struct,zlib
w=h=32
raw=b"".join(b"\x00"+b"".join(bytes([x*8,y*8,128]) for x in range(w)) for y in range(h))
chunk=lambda t,d: struct.pack(">I",len(d))+t+d+struct.pack(">I",zlib.crc32(t+d))
png=b"\x89PNG\r\n\x1a\n"+chunk(b"IHDR",struct.pack(">IIBBBBB",w,h,8,2,0,0,0))+chunk(b"IDAT",zlib.compress(raw))+chunk(b"IEND",b"")
print(base64.b64encode(png).decode())')
status=$(curl -s -o "$workdir/answer.json" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/chat/completions" \
  -H 'Content-Type: application/json' -d @- <<EOF
{"model": "dots.vlm1", "max_tokens": 8, "messages": [{"role": "user", "content": [
  {"type": "text", "text": "What is in this picture?"},
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,$image"}}]}]}
EOF
)
cat "$workdir/answer.json"; echo
[ "$status" = 200 ] || { log "chat request answered HTTP $status"; exit 1; }
log "OK: HTTP 200 from the tiny model on kind"
