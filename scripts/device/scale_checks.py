"""Issue 17 item 4 in a device lease: `moelora train` with D2MoRA on a 4-bit (QLoRA) base model, and under
`accelerate launch` with the shipped FSDP config on the one GPU, a few steps each. Each check is the real CLI in a
subprocess with a time limit; what it printed, its exit status and its train_metrics.json go to
`<out>/scale_checks.json`.

The base is a random Llama (`--hidden`, `--layers`; the tests' tiny tokenizer), so the lease carries no model. On
a CPU (the dry run of tests/test_device_scripts.py) both checks must be refused with moelora's own messages: 4-bit
needs CUDA, and the FSDP config refuses to run unsharded on CPU processes.

    python3 scripts/device/scale_checks.py --out "$OUT" [--hidden 2048 --layers 4 --steps 3 --timeout 120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_llama, train_tiny_tokenizer  # noqa: E402  (the tests' random model and tokenizer)

from moelora.data import bundled_train_sources  # noqa: E402


def model_folder(folder: Path, hidden: int, layers: int) -> Path:
    tokenizer = train_tiny_tokenizer()
    shape = {"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers}
    heads = max(hidden // 128, 1)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(model: Path, output_dir: Path, steps: int, **top_level) -> dict:
    train_files = [f"{task}={path}" for task, path in bundled_train_sources(include_approx=False).items()]
    return {
        "model": str(model),
        "method": "d2mora",
        "adapter": {"r": 8, "lora_alpha": 16, "num_down_experts": 3, "num_up_experts": 8},
        "data": {"train_files": train_files, "max_records_per_task": 16, "val_size": 0, "cutoff_len": 128},
        "training": {
            "output_dir": str(output_dir),
            "max_steps": steps,
            "warmup_steps": 0,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "save_steps": 1000,
            "report_to": [],
        },
        "evaluation": {"protocols": ["likelihood"], "max_items": 2},
        **top_level,
    }


def check(name: str, command: list[str], config: dict, work: Path, timeout: int) -> dict:
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    start = time.monotonic()
    try:
        done = subprocess.run([*command, str(config_path)], capture_output=True, text=True, timeout=timeout)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        status, stdout, stderr = "timeout", str(expired.stdout or ""), str(expired.stderr or "")
    metrics_file = Path(config["training"]["output_dir"]) / "train_metrics.json"
    return {
        "command": " ".join([*command, str(config_path)]),
        "exit": status,
        "seconds": round(time.monotonic() - start, 1),
        "train_metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
        "stdout_tail": stdout[-3000:],
        "stderr_tail": stderr[-3000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per check")
    args = parser.parse_args()
    work = args.out / "scale_checks"
    work.mkdir(parents=True, exist_ok=True)
    model = model_folder(work / "model", args.hidden, args.layers)
    cli = [sys.executable, "-m", "moelora.cli", "train"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    fsdp = [*launch, str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "moelora.cli"]
    results = {
        "qlora": check(
            "qlora",
            cli,
            run_config(model, work / "qlora", args.steps, model_quantization="4bit", model_dtype="bf16"),
            work,
            args.timeout,
        ),
        "fsdp": check("fsdp", [*fsdp, "train"], run_config(model, work / "fsdp", args.steps), work, args.timeout),
        "model": {"hidden": args.hidden, "layers": args.layers, "steps": args.steps},
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    (args.out / "scale_checks.json").write_text(json.dumps(results, indent=2))
    for name in ("qlora", "fsdp"):
        print(f"{name}: exit {results[name]['exit']} in {results[name]['seconds']} s")


if __name__ == "__main__":
    main()
