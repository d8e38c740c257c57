#!/usr/bin/env bash
# Build, here, what the two device calls carry (scripts/device/README.md): the default model's GGUF file in two
# halves (one call may carry 64 MiB, the file is 98 MB), its sha256, the commonsense data as one archive (with the
# first half: call 1 unpacks it, so a lease finds out there that it can, before the long call), and the
# Python packages the device lacks as wheels. Everything goes to $MOELORA_DEVICE_PAYLOAD (default .device/, which
# git ignores). --no-wheels skips the download (the test does; it needs a package registry); --gpu-checks adds
# bitsandbytes in gpu-wheels/ for gpu_checks.sh (issue 17), whose call carries the two wheel folders alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
PAYLOAD="${MOELORA_DEVICE_PAYLOAD:-.device}"
PYTHON="${PYTHON:-.venv/bin/python}"
DATA="${MOELORA_SHARED_DATA:-../shared/data}"
mkdir -p "$PAYLOAD/part1" "$PAYLOAD/part2"
rm -f "$PAYLOAD"/part1/* "$PAYLOAD"/part2/*

gguf="$("$PYTHON" -c 'from moelora.models import smollm2_gguf_path; print(smollm2_gguf_path())')"
name="$(basename "$gguf")"
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > "$PAYLOAD/part1/$name.part1"
tail -c +"$((half + 1))" "$gguf" > "$PAYLOAD/part2/$name.part2"
sha256sum "$gguf" | cut -d' ' -f1 > "$PAYLOAD/part2/gguf.sha256"
XZ_OPT="${XZ_OPT:--T0}" tar -C "$DATA" -cJf "$PAYLOAD/part1/commonsense.tar.xz" commonsense

if [ "${1:-}" != "--no-wheels" ]; then
  # the device has torch, transformers 5.17, accelerate, pyarrow, fsspec, xxhash, pandas; not these
  rm -rf "$PAYLOAD/wheels" && mkdir -p "$PAYLOAD/wheels"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PAYLOAD/wheels" peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
fi
if [ "${1:-}" = "--gpu-checks" ]; then
  # gpu_checks.sh's QLoRA check; 43 MB, so in its own folder, which only the issue 17 call carries
  rm -rf "$PAYLOAD/gpu-wheels" && mkdir -p "$PAYLOAD/gpu-wheels"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d "$PAYLOAD/gpu-wheels" bitsandbytes==0.50.2
fi
tree_bytes=$(git ls-files -z | xargs -0 cat | wc -c)
if [ "${1:-}" = "--gpu-checks" ]; then
  total=$(( $(du -cb "$PAYLOAD/wheels" "$PAYLOAD/gpu-wheels" | tail -1 | cut -f1) + tree_bytes ))
  echo "gpu_checks.sh carries $((total / 1048576)) MiB (limit 64)"
  [ "$total" -lt $((64 * 1048576)) ] || { echo "the gpu_checks.sh call is over the 64 MiB limit" >&2; exit 1; }
  exit 0
fi
for call in 1 2; do
  carried=$(du -cb "$PAYLOAD/part$call" $([ "$call" = 1 ] && [ -d "$PAYLOAD/wheels" ] && echo "$PAYLOAD/wheels") | tail -1 | cut -f1)
  total=$(( carried + tree_bytes ))
  echo "call $call carries $((total / 1048576)) MiB (limit 64)"
  [ "$total" -lt $((64 * 1048576)) ] || { echo "call $call is over the 64 MiB limit" >&2; exit 1; }
done
