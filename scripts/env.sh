#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if needed.
# The venv lives outside the clone, keyed by the lock file's hash, so repeated CI runs
# and fresh clones on the same machine reuse it; a half-built venv (no marker) is rebuilt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
key="$( { cat "$root/requirements.lock" "$root/requirements-nodeps.txt"; "$py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
venv="${DR2PIPE_VENV_ROOT:-$HOME/.cache/dr2pipe}/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$(dirname "$venv")"
  # Serialise concurrent first runs (parallel test sessions, make demo + make test).
  exec 9>"$venv.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    echo "[env] creating $venv from requirements.lock (first run only: ~3.5 GB download)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" >&2 || true
    # One pip command for everything: separate installs let botocore drift past aiobotocore's pin.
    "$venv/bin/python" -m pip install -q -r "$root/requirements.lock" 2>&1 \
      | grep -v "is ignored: it is neither" >&2 || true
    "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-nodeps.txt" 2>&1 \
      | grep -v "is ignored: it is neither" >&2 || true
    "$venv/bin/python" -c "import torch, torchvision, ray, lpips, cv2, pyarrow, s3fs, facenet_pytorch" \
      || { echo "[env] install failed: see the messages above" >&2; exit 1; }
    touch "$venv/.complete"
  fi
  flock -u 9
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$@"
