#!/usr/bin/env bash
# VNN-COMP: prepare_instance.sh v1 CATEGORY ONNX VNNLIB — no analysis happens here; it only
# checks that both files exist (plain or .gz) and stops leftovers of an earlier instance.
set -u
[ "${1:-}" = "v1" ] && [ $# -eq 4 ] || { echo "usage: $0 v1 CATEGORY ONNX VNNLIB" >&2; exit 1; }
pkill -f "verifier vnncomp-run" 2>/dev/null || true
for f in "$3" "$4"; do
  [ -f "$f" ] || { echo "no such file: $f" >&2; exit 1; }
done
exit 0
