"""Regenerate the bundled data sample `src/moelora/sample_data/` from the shared LLM-Adapters files.

A fixed seed picks the same records every time (kept in their original file order), and files are written
exactly as LLM-Adapters writes them (`json.dumps(records, indent=4)`, no trailing newline), so rerunning the
script reproduces the shipped sample byte for byte. The sample's README.md is written by hand and is left
alone.

    python scripts/make_sample.py [--source ../shared/data/commonsense] [--seed 42]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "commonsense"
DEFAULT_DEST = ROOT / "src" / "moelora" / "sample_data"
MAX_BYTES = 3 * 1024 * 1024

#: (path in the sample, path in the source folder). Approximate sources keep `.approx` in the sample name.
TRAIN_FILES = [
    (f"train/{task}/train.json", f"train/per_task/{task}/train.json")
    for task in ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa")
] + [("train/winogrande/train.approx.json", "train/per_task/winogrande/train.approx.json")]
TEST_FILES = [
    (f"test/{task}/test.json", f"test/{task}/test.json")
    for task in ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")
] + [("test/hellaswag/test.approx.json", "test/hellaswag/test.approx.json")]


def sample_file(source: Path, dest: Path, size: int, seed: int) -> int:
    """Write a seeded sample of `size` records of `source` to `dest`; returns the bytes written."""
    records = json.loads(source.read_text(encoding="utf-8"))
    keep = sorted(random.Random(seed).sample(range(len(records)), min(size, len(records))))
    text = json.dumps([records[index] for index in keep], indent=4)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="shared commonsense data folder")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="sample folder to (re)write")
    parser.add_argument("--train-size", type=int, default=300, help="training records per task")
    parser.add_argument("--test-size", type=int, default=100, help="test records per task")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    total = 0
    for files, size in ((TRAIN_FILES, args.train_size), (TEST_FILES, args.test_size)):
        for sample_path, source_path in files:
            written = sample_file(args.source / source_path, args.dest / sample_path, size, args.seed)
            print(f"{sample_path}: {written} bytes")
            total += written
    print(f"total: {total} bytes")
    if total >= MAX_BYTES:
        raise SystemExit(f"sample is {total} bytes, over the {MAX_BYTES}-byte budget: lower the sizes")


if __name__ == "__main__":
    main()
