#!/usr/bin/env bash
# Re-lock the dependencies after editing requirements.in or requirements-test.in. One resolve, two files:
#   requirements.lock       runtime: what workflows/, tasks/, models/ need (the image installs only this)
#   requirements-test.lock  test/dev tools ON TOP of it: only packages that requirements.lock lacks
# The test set is resolved together with the runtime set and constrained by requirements.lock, so a package
# both need has one version, and `pip install --require-hashes -r requirements.lock -r requirements-test.lock`
# finds every dependency pinned and hashed. Existing pins are kept unless a change to an .in file forces a
# new one (uv reads the previous output as preferences); check `git diff` for version moves.
#
# uv comes from PyPI in a scratch venv, never the project's:
#   python3 -m venv /tmp/uv && /tmp/uv/bin/pip install uv && UV=/tmp/uv/bin/uv scripts/lock.sh
# The target is CPython 3.11 on x86-64 Linux: the interpreter of rayproject/ray:2.60.0-py311-* (the image)
# and the one scripts/env.sh is run with.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
uv="${UV:-uv}"
common=(--quiet --no-config --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
        --index-url https://pypi.org/simple --custom-compile-command "scripts/lock.sh")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$uv" pip compile "${common[@]}" requirements.in -o requirements.lock

# Preferences for the joint resolve: the previous pins of both files.
cat requirements.lock > "$tmp/all.txt"
if [ -f requirements-test.lock ]; then cat requirements-test.lock >> "$tmp/all.txt"; fi
"$uv" pip compile "${common[@]}" requirements.in requirements-test.in -c requirements.lock -o "$tmp/all.txt"

python3 - requirements.lock "$tmp/all.txt" > "$tmp/test.lock" <<'EOF'
"""Print the joint resolve minus the packages of the runtime lock; refuse a shared package at two versions."""
import re
import sys


def blocks(path):
    """{normalised name: (version, text)} for each `name==version` entry with its hash and via lines."""
    out, name = {}, None
    for line in open(path):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[name] = [m.group(2), line]
        elif name and line.startswith((" ", "\t")):
            out[name][1] += line
        else:
            name = None
    return out


runtime, joint = blocks(sys.argv[1]), blocks(sys.argv[2])
clash = {n: (runtime[n][0], v) for n, (v, _) in joint.items() if n in runtime and runtime[n][0] != v}
if clash:
    sys.exit(f"runtime and test resolves disagree: {clash}")
print("# Test and dev tools on top of requirements.lock: only packages that file lacks, resolved together")
print("# with it (scripts/lock.sh). Install both in ONE command:")
print("#   pip install --require-hashes -r requirements.lock -r requirements-test.lock")
for n in sorted(joint):
    if n not in runtime:
        print(joint[n][1], end="")
EOF
mv "$tmp/test.lock" requirements-test.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) packages; requirements-test.lock: $(grep -c '==' requirements-test.lock)" >&2
