#!/usr/bin/env bash
# kiln's one-command GPU check (see bench/gpu_check.py for the parts and docs/benchmarks.md for how to read it).
#
#   bash bench/gpu_check.sh [--out DIR] [--budget SECONDS] [more gpu_check.py options]   # one CUDA GPU, <= 8 min
#   bash bench/gpu_check.sh --cpu                                                        # CPU smoke mode
#
# Installs only what it can get quickly and never lets pip touch torch: flash-attn from a prebuilt
# wheel (from the index or a local wheelhouse in $KILN_WHEELS, binary only, with a timeout); it is
# never built from source (that takes far longer than the budget). Without it the flash rows are
# skipped and the table says why. The whole check, install included, stays within --budget
# (default 480 s); each part has its own timeout inside what is left.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
start=$(date +%s)
budget=480
cpu=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1; args+=("$1") ;;
    --budget) budget="$2"; shift ;;
    --budget=*) budget="${1#--budget=}" ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ "$cpu" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  echo "gpu_check: $PY's torch sees no CUDA device; run with --cpu for the smoke mode" >&2
  exit 2
fi
note=""
if [ "$cpu" = 0 ] && ! "$PY" -c "import flash_attn, flash_attn_2_cuda" >/dev/null 2>&1; then
  install_s=$(( budget / 8 ))  # at most an eighth of the budget for the install
  links=()
  [ -n "${KILN_WHEELS:-}" ] && links=(--find-links "$KILN_WHEELS")
  timeout "$install_s" "$PY" -m pip install --quiet --no-deps --only-binary=:all: ${links[@]+"${links[@]}"} flash-attn einops \
    >/dev/null 2>&1 || true
  if ! "$PY" -c "import flash_attn, flash_attn_2_cuda" >/dev/null 2>&1; then
    note="no flash-attn wheel installed within ${install_s}s for this torch/CUDA/Python (KILN_WHEELS=${KILN_WHEELS:-unset}); not built from source"
  fi
fi
left=$(( budget - ($(date +%s) - start) ))
exec "$PY" bench/gpu_check.py --budget "$left" ${note:+--flash-note "$note"} ${args[@]+"${args[@]}"}
