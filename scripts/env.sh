#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if needed.
# The venv lives outside the clone, keyed by the hash of every lock file (requirements.lock,
# requirements-test.lock, requirements-nodeps.txt) and the interpreter's version, so repeated CI runs and
# fresh clones on the same machine reuse it; a half-built venv (no marker) is rebuilt.
# It holds the runtime lock AND the test/dev tools on top (make demo, make test, make lint); the
# production image (infra/Dockerfile) installs requirements.lock only. Every install is --require-hashes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
# The locks are resolved for CPython 3.11 (scripts/lock.sh), the interpreter of the Ray 2.60 image.
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "[env] $py is Python $("$py" -c 'import platform; print(platform.python_version())'), the locks need 3.11:" \
       "set PYTHON=python3.11" >&2
  exit 1
fi
locks=("$root/requirements.lock" "$root/requirements-test.lock" "$root/requirements-nodeps.txt")
key="$( { cat "${locks[@]}"; "$py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
venv="${DR2PIPE_VENV_ROOT:-$HOME/.cache/dr2pipe}/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$(dirname "$venv")"
  # Serialise concurrent first runs (parallel test sessions, make demo + make test).
  exec 9>"$venv.lock"
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    echo "[env] creating $venv from requirements.lock + requirements-test.lock (first run only: ~3.5 GB download)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    pip_install() {  # quiet pip that still fails the script; drops the noise of the machine's file:// indexes
      "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
    }
    # pip itself first, at the version and hashes pinned in requirements-test.lock.
    awk '/^pip==/ {p = 1; print; next} p && /^[^ \t]/ {p = 0} p' "$root/requirements-test.lock" > "$venv/pip.lock"
    pip_install --require-hashes --no-deps -r "$venv/pip.lock"
    # One pip command for both locks: every dependency is pinned and hashed, so nothing drifts (separate
    # resolving installs once let botocore drift past aiobotocore's pin).
    pip_install --require-hashes -r "$root/requirements.lock" -r "$root/requirements-test.lock"
    pip_install --require-hashes --no-deps -r "$root/requirements-nodeps.txt"
    "$venv/bin/python" -c "import torch, torchvision, ray, lpips, cv2, pyarrow, s3fs, facenet_pytorch, pytest, moto" \
      || { echo "[env] install failed: see the messages above" >&2; exit 1; }
    touch "$venv/.complete"
  fi
  flock -u 9
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$@"
