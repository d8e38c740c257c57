"""Launched by test_distributed.py under torchrun: trains a few steps, then each rank saves its adapter weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelora.config import load_config
from moelora.training import train

model_dir, config_path, dump_dir = sys.argv[1:4]
config = load_config(config_path)
result = train(config, AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
weights = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if p.requires_grad}
save_file(weights, str(Path(dump_dir) / f"rank{rank}.safetensors"), metadata={"world_size": str(world)})
