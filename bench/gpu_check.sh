#!/usr/bin/env bash
# GPU truth (issue 21): one command, at most 9 minutes on one GPU. See bench/gpu_check.py and docs/gpu.md.
#
#   bash bench/gpu_check.sh                      # GPU: writes docs/gpu.md and docs/benchmarks/gpu_check.json
#   bash bench/gpu_check.sh --rehearse           # CPU: same code paths, tiny shapes, report in a temp dir
#   bash bench/gpu_check.sh --carried .gpucheck  # GPU without a registry: install the wheels --pack gathered
#   bash bench/gpu_check.sh --pack .gpucheck     # networked CPU machine: gather those wheels + prepared data
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). The whole run is
# killed at GPU_CHECK_TIMEOUT seconds (default 570: the steps' time boxes sum to 530; --pack: 3600).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
carried=""
args=("$@")
limit="${GPU_CHECK_TIMEOUT:-570}"
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--carried" ] && carried="${args[$((i + 1))]:-}"
  [ "${args[$i]}" = "--pack" ] && limit="${GPU_CHECK_TIMEOUT:-3600}"  # downloads and screens: no 9-minute box
done
if [ -n "$carried" ] && [ -d "$carried/wheels" ]; then
  # Offline: only what the image lacks, from the carried wheels, never from a registry.
  echo "installing carried wheels from $carried/wheels (offline)"
  "$PYTHON" -m pip install -q --no-index --no-deps "$carried"/wheels/*.whl || echo "warning: some carried wheels did not install"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec timeout --signal=TERM --kill-after=15 "$limit" "$PYTHON" bench/gpu_check.py "$@"
