"""Print the versions every GPU figure is published with, and check that the training path imports and runs a
few datasets operations (the carried `datasets` against the device's pyarrow)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess

import datasets
import torch

import moelora  # noqa: F401  (registers the methods with PEFT)

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "pyarrow")

print(f"python {platform.python_version()}")
for name in PACKAGES:
    print(f"{name} {importlib.metadata.version(name)}")
print(f"cuda {torch.version.cuda}, available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name(0)}")
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"], capture_output=True
    )
    print(f"driver, memory: {smi.stdout.decode().strip()}")
table = datasets.Dataset.from_dict({"x": [3, 1, 2]}).shuffle(seed=0).map(lambda row: {"y": row["x"] * 2})
assert sorted(table["y"]) == [2, 4, 6]
print("datasets: ok")
