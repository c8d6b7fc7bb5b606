#!/usr/bin/env bash
# VNN-COMP: prepare_instance.sh v1 CATEGORY ONNX VNNLIB — checks that both files exist and
# starts (once) a warm verifier process that has imported torch, onnx and onnxruntime.
# No analysis of the instance happens here.
set -u
[ "${1:-}" = "v1" ] && [ $# -eq 4 ] || { echo "usage: $0 v1 CATEGORY ONNX VNNLIB" >&2; exit 1; }
for f in "$3" "$4"; do
  [ -f "$f" ] || { echo "no such file: $f" >&2; exit 1; }
done
SOCK="${VERIFIER_SOCKET:-/tmp/verifier-vnncomp-$(id -u).sock}"
# remember the interpreter itself (a version-manager shim costs ~0.1 s per call)
python -c 'import sys; print(sys.executable)' > "$SOCK.python" 2>/dev/null || true
python -m verifier.cli.vnncomp_server start "$SOCK" || true
exit 0
