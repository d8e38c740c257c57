#!/usr/bin/env bash
# Issue 17 in one device call (scripts/device/README.md), run there from the repository root with carry
# [.device/wheels, .device/gpu-wheels] (prepare.sh --gpu-checks; gpu-wheels holds bitsandbytes): the method tests on CUDA, the GPU
# benchmarks, and the QLoRA and FSDP checks, each under its own time limit so one that hangs leaves the others
# their minutes. Everything goes to $OUT: env.txt, tests.txt, bench/ (train_step and modules tables),
# scale_checks.json and a summary.txt with one line per step.
#
# The defaults size it to at most about 9.5 minutes on an H200 (each step's limit below).
# MOELORA_CHECKS_DEVICE=cpu turns it into the dry run of tests/test_device_scripts.py: the same steps with tiny
# settings (and the QLoRA and FSDP checks refused, as they must be on a CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
PAYLOAD="${MOELORA_DEVICE_PAYLOAD:-.device}"
STORE="${MOELORA_DEVICE_STORE:-$HOME/moelora-device}"
DEVICE="${MOELORA_CHECKS_DEVICE:-cuda}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$STORE/site" "${OUT:?OUT must name the folder whose files come back}/bench"
if compgen -G "$PAYLOAD/*wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STORE/site" \
    "$PAYLOAD"/*wheels/*.whl
fi
export PYTHONPATH="$PWD/src:$STORE/site${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" scripts/device/environment.py > "$OUT/env.txt" 2>&1

if [ "$DEVICE" = cuda ]; then
  tests="tests/test_d2mora.py tests/test_dropout.py tests/test_hydralora.py tests/test_molora.py tests/test_comol.py
         tests/test_teamlora.py tests/test_moslora.py tests/test_malora.py tests/test_smora.py tests/test_all_methods.py
         tests/test_drlora.py tests/test_moa.py"
  variants="frozen peft_lora peft_lora:r=8 d2mora hydralora comol molora molora:top_k=2 teamlora moa_soft"
  train_step=(--models llama-7b --llama-layers 4 --batches 4x256,8x1024 --precisions bf16 --checkpointing off,on
              --repeats 5 --warmup 2)
  modules=(--dtype bf16 --shapes 4096x2048,4096x8192 --repeats 10)
  scale=(--hidden 2048 --layers 4 --steps 3 --timeout 120)
  limits=(120 210 80 150)  # seconds per step: 560 with the install, inside a 600 s call
else
  tests="tests/test_dropout.py"
  variants="frozen peft_lora d2mora"
  train_step=(--models llama-tiny --quick)
  modules=(--quick)
  scale=(--hidden 64 --layers 2 --steps 1 --timeout 300)
  limits=(300 300 300 600)
fi

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, append its outcome to summary.txt
  local name=$1 seconds=$2 start=$SECONDS
  shift 2
  timeout "$seconds" "$@"
  local status=$?
  echo "$name: exit $status after $((SECONDS - start)) s (limit $seconds)" | tee -a "$OUT/summary.txt"
}

# shellcheck disable=SC2086  # $tests is a list of paths
MOELORA_TEST_DEVICE=$DEVICE step tests "${limits[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider $tests \
  > "$OUT/tests.txt" 2>&1
tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"
step train_step "${limits[1]}" "$PYTHON" bench/train_step.py --device "$DEVICE" "${train_step[@]}" \
  --variants "$variants" --out "$OUT/bench" > "$OUT/bench/train_step.log" 2>&1
step modules "${limits[2]}" "$PYTHON" bench/modules.py --device "$DEVICE" "${modules[@]}" \
  --variants "$variants" --out "$OUT/bench" > "$OUT/bench/modules.log" 2>&1
step scale_checks "${limits[3]}" "$PYTHON" scripts/device/scale_checks.py --out "$OUT" "${scale[@]}" \
  > "$OUT/scale_checks.log" 2>&1
rm -rf "$OUT/scale_checks"  # the random model and the runs: nothing to bring back
cat "$OUT/summary.txt"
