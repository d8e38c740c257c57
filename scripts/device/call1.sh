#!/usr/bin/env bash
# Device call 1 of 2, run there from the repository root with carry [.device/part1, .device/wheels]: keep the
# first half of the GGUF file outside the checkout (the machine keeps it while warm, 30 s), unpack the data where
# the experiment file looks (../shared/data), install the carried wheels, and check that moelora imports and
# reaches the GPU. Writes env.txt to $OUT.
#
# Then it starts NVIDIA's multi-process service (MPS), unless MOELORA_MPS=0: without it the GPU time-slices
# between the runs of an experiment, and small kernels from three runs side by side ran one after the other (the
# first lease: 8.7 µs per kernel, GPU "100 % busy" at 330 W). Two processes must then run CUDA through it within
# 60 s, else the service is stopped again. The daemon outlives this call (it starts its own session); call 2's
# runs use it without being told. $STORE/mps says which way it went.
set -euo pipefail
cd "$(dirname "$0")/../.."
PAYLOAD="${MOELORA_DEVICE_PAYLOAD:-.device}"
STORE="${MOELORA_DEVICE_STORE:-$HOME/moelora-device}"
mkdir -p "$STORE/site" "${OUT:?OUT must name the folder whose files come back}"
cp "$PAYLOAD"/part1/*.part1 "$STORE/"
if [ ! -d ../shared/data/commonsense ]; then
  mkdir -p ../shared/data
  # Python's tarfile: the machine may have no xz program
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$PAYLOAD/part1/commonsense.tar.xz" ../shared/data
fi
if compgen -G "$PAYLOAD/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STORE/site" \
    "$PAYLOAD"/wheels/*.whl
fi
export PYTHONPATH="$PWD/src:$STORE/site${PYTHONPATH:+:$PYTHONPATH}"
python3 scripts/device/environment.py | tee "$OUT/env.txt"

mps=off
if [ "${MOELORA_MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d >/dev/null 2>&1; then
  python3 scripts/device/cuda_check.py > "$STORE/mps-check-1.log" 2>&1 & first=$!
  python3 scripts/device/cuda_check.py > "$STORE/mps-check-2.log" 2>&1 & second=$!
  ( sleep 60; kill "$first" "$second" ) >/dev/null 2>&1 & watchdog=$!
  if wait "$first" && wait "$second"; then
    mps=on
  else
    echo quit | nvidia-cuda-mps-control || true
    cat "$STORE"/mps-check-*.log
  fi
  kill "$watchdog" 2>/dev/null || true
fi
echo "$mps" > "$STORE/mps"
echo "mps: $mps" | tee -a "$OUT/env.txt"
