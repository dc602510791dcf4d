#!/usr/bin/env bash
# The GPU proof in one short window: the FIRST command on a GPU machine (docs/benchmarks.md, "The GPU window").
#   bash scripts/gpu_window.sh [--budget_s 480] [window flags]      # report: $OUT/gpu-window.md (else outputs/)
# Wheels the machine lacks (diffusers, open_clip_torch, ftfy, omegaconf, ...) are installed from .whl/ when that
# folder exists (README: "Carrying wheels to a GPU machine"); without diffusers the peer's rows are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_window: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
out="${OUT:-outputs}/gpu-window.md"
python3 -m ldm.benchmark.window --out "$out" "$@"
