#!/usr/bin/env bash
# Regenerates the Python code (and .pyi stubs) for every .proto under proto/.
# The generated files are committed; `scripts/gen_proto.sh --check` fails when
# regenerating would change them (the test command runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=proto
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  mkdir -p "$out/saga/v1"
fi
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/saga/v1/*.proto
if [[ "${1:-}" == "--check" ]]; then
  for f in "$out"/saga/v1/*.py "$out"/saga/v1/*.pyi; do
    name=$(basename "$f")
    if ! cmp -s "$f" "proto/saga/v1/$name"; then
      echo "generated code is stale: proto/saga/v1/$name (run scripts/gen_proto.sh)" >&2
      exit 1
    fi
  done
  echo "generated code is up to date"
fi
