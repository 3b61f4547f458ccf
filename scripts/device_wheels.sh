#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks, for its python3 (3.12), into .whl/ (git-ignored).
#
# The GPU machine reaches no package registry; its image has torch, numpy, pandas, pyarrow, fsspec,
# pyyaml, opencv and Ray's other dependencies, but not Ray itself. Run this here, then name .whl in the
# device call's carry; bench/gpu_runbook.sh installs them there with pip --no-index.
# Ray's wheel is 79 MB, over the 64 MiB a device call carries: its Java jars and dashboard web UI are
# dropped (neither is used by Ray Data on Python workers), leaving ~45 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${DEVICE_PYTHON:-3.12}
pin() { grep -iE "^$1==" requirements.lock | sed 's/ .*//;s/\\$//'; }

rm -rf .whl && mkdir -p .whl/full
scripts/env.sh python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/full \
    "$(pin ray)" "$(pin jsonschema)" "$(pin referencing)" "$(pin jsonschema-specifications)" "$(pin rpds-py)"

scripts/env.sh python - <<'EOF'
import glob, os, shutil, zipfile

DROP = ("ray/jars/", "ray/dashboard/client/build/")
for src in glob.glob(".whl/full/*.whl"):
    dst = os.path.join(".whl", os.path.basename(src))
    if not os.path.basename(src).startswith("ray-"):
        shutil.move(src, dst)
        continue
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename.startswith(DROP):
                continue
            data = zin.read(item)
            if item.filename.endswith(".dist-info/RECORD"):  # keep RECORD consistent with what is left
                drop = tuple(d.encode() for d in DROP)
                data = b"".join(line + b"\n" for line in data.splitlines() if not line.startswith(drop))
            zout.writestr(item, data)
shutil.rmtree(".whl/full")
EOF
du -sh .whl; ls -1 .whl
