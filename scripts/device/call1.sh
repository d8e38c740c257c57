#!/usr/bin/env bash
# Device call 1 of 2, run there from the repository root with carry [.device/part1, .device/wheels]: keep the
# first half of the GGUF file outside the checkout (the machine keeps it while warm, 30 s), unpack the data where
# the experiment file looks (../shared/data), install the carried wheels, and check that moelora imports and
# reaches the GPU. Writes env.txt to $OUT.
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
