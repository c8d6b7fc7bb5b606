#!/usr/bin/env bash
# VNN-COMP: install_tool.sh v1 — installs the verifier (and its pinned torch) with pip.
set -euo pipefail
[ "${1:-}" = "v1" ] || { echo "usage: $0 v1" >&2; exit 1; }
cd "$(dirname "$0")/.."
pip install -r requirements.txt -e .    # the base install has onnxruntime (replay)
python -c "import verifier, onnxruntime; print('verifier installed')"
