#!/usr/bin/env bash
# Creates .venv (Python 3.11) with dotsvlm and every extra installed, editable. Re-installs only when
# pyproject.toml changed. Uses uv (from PyPI) because it installs torch and ray in seconds from a warm cache.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py=$c; break; fi
  done
fi
[ -n "$py" ] || { echo "error: dotsvlm needs Python 3.11 (python3.11 not found on PATH); set PYTHON=/path/to/python3.11" >&2; exit 1; }
stamp=.venv/.dotsvlm-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ -x .venv/bin/python ]; then what="updating .venv (pyproject.toml changed)"; else what="creating .venv with $py and installing dotsvlm[operator,serving,dev] (first time: a minute or more, ~6 GB)"; fi
echo "[setup] $what..." >&2
start=$SECONDS
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv
.venv/bin/uv pip install --python .venv/bin/python -q -e '.[operator,serving,dev]'
echo "$want" > "$stamp"
echo "[setup] done in $((SECONDS - start))s" >&2
