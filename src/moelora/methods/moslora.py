"""MoSLoRA (Wu et al. 2024): LoRA with a learnable r×r mixer between A and B (specs: baselines.md §2.9).

    h = W0 x + s * B W_mix A drop(x),   A in R^{r x d_in}, W_mix in R^{r x r}, B in R^{d_out x r}, s = alpha / r

Identical to CoMoL's `corelora` (CoMoL with one core, comol.md §3). Init (§1, §5 item 4): A ~ U(±1/sqrt(d_in))
and W_mix ~ U(±1/sqrt(r)) (both kaiming_uniform(a=√5), nn.Linear's default), B = 0, so Δh = 0 at init.
The update does not depend on the input, so it merges exactly: W0 <- W0 + s B W_mix A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import MoeLoraConfig
from ..core.dropout import dropped_projection
from ..core.layer import MoeLoraLayer
from ..core.tuner import MoeLoraTuner


@dataclass
class MoSLoRAConfig(MoeLoraConfig):
    """MoSLoRA adapter config. Official commonsense script: r16, alpha 32; D2MoRA table: r64 on q/k/v."""

    PEFT_TYPE = "MOSLORA"


class MoSLoRALinear(MoeLoraLayer):
    adapter_layer_names = ("moslora_A", "moslora_mixer", "moslora_B")
    merge_unsupported_reason = ""

    def create_parameters(self, config: MoSLoRAConfig) -> dict[str, torch.Tensor]:
        r = config.r
        lora_b = self.up_init(self.out_features, r, config=config)
        return {
            "moslora_A": self.linear_init(r, self.in_features, fan_in=self.in_features),
            "moslora_mixer": self.linear_init(r, r, fan_in=r),
            "moslora_B": lora_b,
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config = self.adapter_config[adapter_name]
        h = dropped_projection(x, self.moslora_A[adapter_name], config.lora_dropout, self.training)  # A drop(x)
        z = F.linear(h, self.moslora_mixer[adapter_name])  # W_mix A x
        return F.linear(z, self.moslora_B[adapter_name]) * config.scaling

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, mixer, B = self.adapter_params(adapter_name)
        return (B @ mixer @ A) * self.adapter_config[adapter_name].scaling


class MoSLoRATuner(MoeLoraTuner):
    prefix = "moslora_"
    tuner_layer_cls = MoSLoRALinear
