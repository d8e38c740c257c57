"""Pack an experiment folder's results for the trip back from the device: `OUT/results.tar.xz` with every run's
config, metrics, training log, result files and per-item predictions (without the instruction text, which the
test files hold under each row's index), the experiment's logs and comparisons; and each D2MoRA run's adapter as
`OUT/adapter_<group>_<run>_<seed>.safetensors` beside its config (the expert-similarity report needs them).
Checkpoints stay behind. Written to a temporary name and renamed, so a call stopped mid-pack keeps the last one.

    python scripts/device/pack.py EXPERIMENT_DIR OUT
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

KEEP = ("moelora_run.yaml", "train_metrics.json", "train_log.json", "results.md", "adapter_config.json")


def wanted(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    if any(part.startswith("checkpoint-") for part in parts):
        return False
    if path.name in KEEP or path.suffix in (".md", ".png", ".log") or parts[0] == "configs":
        return True
    return path.parent.name.startswith("eval_") and path.name.startswith(("results_", "predictions_"))


def without_instructions(path: Path) -> bytes:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return "".join(json.dumps({k: v for k, v in row.items() if k != "instruction"}) + "\n" for row in rows).encode()


def pack(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.tar.xz.partial"
    with tarfile.open(partial, "w:xz", preset=3) as archive:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and wanted(p, root)):
            name = str(path.relative_to(root.parent))
            if path.suffix == ".jsonl":
                data = without_instructions(path)
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.add(path, arcname=name)
    partial.rename(out / "results.tar.xz")
    for config in root.rglob("adapter_config.json"):
        run = config.parent
        if "checkpoint-" in str(run) or json.loads(config.read_text()).get("peft_type") != "D2MORA":
            continue
        weights = run / "adapter_model.safetensors"
        if weights.is_file():
            key = "_".join(run.relative_to(root).parts)
            shutil.copyfile(weights, out / f"adapter_{key}.safetensors.partial")
            (out / f"adapter_{key}.safetensors.partial").rename(out / f"adapter_{key}.safetensors")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    if root.is_dir():
        pack(root, Path(sys.argv[2]))
