"""LoRA on the moelora machinery: the reference case every mixture reduces to.

    h = W0 x + (alpha / r) * B A dropout(x),   A in R^{r x d_in}, B in R^{d_out x r}

A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (nn.Linear's default, as PEFT), B = 0, so the update is zero at init.
The update does not depend on the input, so it merges exactly: W0 <- W0 + (alpha / r) B A.
Numerically identical to PEFT's LoRA given the same A and B (tests copy weights across). In training the dropout
is drawn as core/dropout.py draws it, so no dropped copy of x is kept for backward (PEFT keeps one per module).
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
class LoraConfig(MoeLoraConfig):
    """moelora's own LoRA (peft_type "MOELORA_LORA"), distinct from `peft.LoraConfig` but output-identical."""

    PEFT_TYPE = "MOELORA_LORA"


class LoraLinear(MoeLoraLayer):
    adapter_layer_names = ("lora_A", "lora_B")
    merge_unsupported_reason = ""

    def create_parameters(self, config: LoraConfig) -> dict[str, torch.Tensor]:
        lora_b = self.up_init(self.out_features, config.r, config=config)
        return {"lora_A": self.linear_init(config.r, self.in_features, fan_in=self.in_features), "lora_B": lora_b}

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config = self.adapter_config[adapter_name]
        h = dropped_projection(x, self.lora_A[adapter_name], config.lora_dropout, self.training)
        return F.linear(h, self.lora_B[adapter_name]) * config.scaling

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return (self.lora_B[adapter_name] @ self.lora_A[adapter_name]) * self.adapter_config[adapter_name].scaling


class LoraTuner(MoeLoraTuner):
    prefix = "lora_"
    tuner_layer_cls = LoraLinear
