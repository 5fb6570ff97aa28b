#!/usr/bin/env bash
# Builds the test control plane from Go modules into a versioned cache outside the repo:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (Kubernetes), etcd, kwok, kwokctl, helm.
# Each tool lands in its own versioned folder and is reused when present, so only what is missing is built.
# A cold build took 8 min (idle machine) to 18 min (busy machine, empty Go module cache) on 2 cores;
# a warm run returns in a second.
#
# Usage: tests/cluster/build-binaries.sh        (prints the bin folder on its last line)
# Env:   DOTSVLM_CACHE (default ~/.cache/dotsvlm)
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.8     # the etcd client Kubernetes v1.36.3 pins; the server of the same release
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0

here=$(cd "$(dirname "$0")" && pwd)
cache=${DOTSVLM_CACHE:-$HOME/.cache/dotsvlm}
bin=$cache/bin
mkdir -p "$bin" "$cache/go-build"
export CGO_ENABLED=0 GOFLAGS=-trimpath GOCACHE=${GOCACHE:-$cache/go-build} GOTOOLCHAIN=local

command -v go >/dev/null || { echo "error: Go is not installed; install Go 1.26 or newer (https://go.dev/dl/)" >&2; exit 1; }

log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# step NAME DIR CHECKFILE... -- COMMAND...: run COMMAND into DIR.tmp unless every CHECKFILE exists in DIR.
step() {
  local name=$1 dir=$2; shift 2
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done; shift
  local missing=0
  for f in "${files[@]}"; do [ -x "$dir/$f" ] || missing=1; done
  if [ $missing = 0 ]; then log "$name: cached in $dir"; return; fi
  log "$name: building (this can take several minutes)..."
  local start=$SECONDS
  rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
  if ! OUTDIR="$dir.tmp" "$@"; then
    log "$name: FAILED after $((SECONDS - start))s"; rm -rf "$dir.tmp"; exit 1
  fi
  rm -rf "$dir"; mv "$dir.tmp" "$dir"
  log "$name: done in $((SECONDS - start))s"
}

build_etcd() { (cd "$here/gomod/etcd" && go build -o "$OUTDIR/etcd" go.etcd.io/etcd/server/v3); }

build_kwok() {
  GOBIN=$OUTDIR go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

build_helm() {
  GOBIN=$OUTDIR go install -ldflags "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_k8s() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local v=k8s.io/component-base/version
  local ldflags="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
  (cd "$here/gomod/k8s" && go build -p 2 -ldflags "$ldflags" -o "$OUTDIR/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}

total=$SECONDS
step "etcd $ETCD_VERSION" "$bin/etcd-$ETCD_VERSION" etcd -- build_etcd
step "kwok $KWOK_VERSION" "$bin/kwok-$KWOK_VERSION" kwok kwokctl -- build_kwok
step "helm $HELM_VERSION" "$bin/helm-$HELM_VERSION" helm -- build_helm
step "kubernetes $K8S_VERSION" "$bin/kubernetes-$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler kubectl -- build_k8s

# One folder of links so tests and users can put a single directory on PATH.
current=$bin/current
mkdir -p "$current"
for f in "$bin/etcd-$ETCD_VERSION/etcd" "$bin/kwok-$KWOK_VERSION/kwok" "$bin/kwok-$KWOK_VERSION/kwokctl" \
         "$bin/helm-$HELM_VERSION/helm" "$bin/kubernetes-$K8S_VERSION"/*; do
  ln -sfn "$f" "$current/$(basename "$f")"
done
log "all binaries ready in $current ($((SECONDS - total))s)"
echo "$current"
