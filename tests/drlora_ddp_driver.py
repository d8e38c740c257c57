"""Launched by test_drlora.py under torchrun: trains DR-LoRA with growth, then each rank saves its adapter state
(masks, statistics, weights) and the expert counts its own router saw before any all-reduce."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from moelora.config import load_config
from moelora.training import train


class CountLocalRouting(TrainerCallback):
    """Counts, per MoE layer, the experts this process's router selected (its local view of routing)."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for index, layer in enumerate(model.base_model.moe_layers()):
            self.counts[index] = torch.zeros(layer.router.num_experts, dtype=torch.int64)
            layer.router.base_layer.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, args, outputs):
            if module.training:
                self.counts[index] += torch.bincount(outputs[2].flatten(), minlength=self.counts[index].numel())

        return count


model_dir, config_path, dump_dir = sys.argv[1:4]
# accelerate only sets up multi-CPU DDP when its (shared, first-created) state is created with cpu=True; the
# pipeline's own PartialState() would otherwise leave every process training alone on all the data.
PartialState(cpu=True)
local = CountLocalRouting()
config = load_config(config_path)
result = train(
    config,
    AutoModelForCausalLM.from_pretrained(model_dir),
    AutoTokenizer.from_pretrained(model_dir),
    callbacks=[local],
)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
state = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if "drlora_" in n}
state.update({f"local_counts_{index}": counts for index, counts in local.counts.items()})
save_file(state, str(Path(dump_dir) / f"rank{rank}.safetensors"))
