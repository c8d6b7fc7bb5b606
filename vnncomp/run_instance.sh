#!/usr/bin/env bash
# VNN-COMP: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT
# Writes RESULTS_FILE: sat (with the counterexample), unsat, timeout, unknown or error. The
# instance runs in the warm process that prepare_instance.sh started (or in-process without it).
set -u
[ "${1:-}" = "v1" ] && [ $# -eq 6 ] || { echo "usage: $0 v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2; exit 1; }
SOCK="${VERIFIER_SOCKET:-/tmp/verifier-vnncomp-$(id -u).sock}"
rm -f "$5"
PY=python
[ -s "$SOCK.python" ] && PY=$(cat "$SOCK.python")
# the verifier keeps to the budget itself; this outer limit only guards against a hang
t="${6%.*}"; limit=$(( ${t:-0} + 20 ))
timeout --signal=KILL "$limit" "$PY" -m verifier.cli.vnncomp_server run "$SOCK" "$2" "$3" "$4" "$5" "$6"
rc=$?
if [ $rc -eq 137 ] || [ $rc -eq 124 ]; then
  echo "timeout" > "$5"
  "$PY" -m verifier.cli.vnncomp_server stop "$SOCK" >/dev/null 2>&1 || true
  pkill -f "verifier.cli.vnncomp_server serve $SOCK" 2>/dev/null || true
elif [ ! -s "$5" ]; then
  echo "error" > "$5"
fi
exit 0
