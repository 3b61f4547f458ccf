#!/usr/bin/env bash
# Pre-flight check before deploying: refuse deployment files that still hold a placeholder.
#   infra/preflight.sh                       # both files: infra/kuberay-rayjob.yaml infra/cluster-aws.yaml
#   infra/preflight.sh path/to/my-rayjob.yaml
# Placeholders are <...> (e.g. <registry>, <aws-region>) and, inside shell commands such as the RayJob
# entrypoint, upper-case YOUR-... names (YOUR-INPUT-BUCKET): there bash would read an unfilled <x> as a
# redirect, and an upper-case S3 bucket name cannot exist. YAML comments are not checked (they hold
# examples such as `kubectl apply -n <namespace>`). Exit status 1 lists each placeholder left as FILE:LINE.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
files=("$@")
if [ ${#files[@]} -eq 0 ]; then files=("$here/kuberay-rayjob.yaml" "$here/cluster-aws.yaml"); fi
found=0
for f in "${files[@]}"; do
  [ -r "$f" ] || { echo "preflight: cannot read $f" >&2; exit 2; }
  # Drop comments (a # at the start of a line or after whitespace), then look for placeholders.
  hits="$(sed -E 's/(^|[[:space:]])#.*$//' "$f" | grep -noE '<[^<>[:space:]]+>|YOUR-[A-Z0-9-]+' || true)"
  if [ -n "$hits" ]; then
    found=1
    while IFS= read -r hit; do echo "$f:$hit" >&2; done <<< "$hits"
  fi
done
if [ "$found" -ne 0 ]; then
  echo "preflight: fill in the placeholders above before deploying" >&2
  exit 1
fi
echo "preflight: no placeholders left in ${files[*]}"
