#!/usr/bin/env bash
# VNN-COMP: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Writes RESULTS_FILE: sat (with the counterexample), unsat, timeout, unknown or error.
set -u
[ "${1:-}" = "v1" ] && [ $# -eq 6 ] || { echo "usage: $0 v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2; exit 1; }
# the verifier keeps a margin of its own; this outer limit only guards against a hang
limit=$(python -c "import sys; print(max(1, int(float(sys.argv[1]) + 10)))" "$6")
timeout --signal=KILL "$limit" python -m verifier vnncomp-run "$2" "$3" "$4" "$5" "$6"
rc=$?
if [ $rc -eq 137 ] || [ $rc -eq 124 ]; then
  echo "timeout" > "$5"
elif [ $rc -ne 0 ] || [ ! -s "$5" ]; then
  echo "error" > "$5"
fi
exit 0
