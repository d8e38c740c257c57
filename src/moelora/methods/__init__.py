"""Every method: its config, layer and tuner, registered with PEFT under its peft_type on import.

PEFT's own LoRA and DoRA are methods too (`peft_lora`, `peft_dora`), so comparison tables can include them
trained through the same pipeline; they use PEFT's config and tuner unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft

from ..core.config import MoeLoraConfig
from ..core.tuner import MoeLoraTuner
from ..peft_compat import register_peft_method
from .comol import CoMoLConfig, CoMoLLinear, CoMoLTuner
from .d2mora import D2MoRAConfig, D2MoRALinear, D2MoRATuner
from .drlora import DRLoRAConfig, DRLoRATuner
from .hydralora import HydraLoRAConfig, HydraLoRALinear, HydraLoRATuner
from .lora import LoraConfig, LoraLinear, LoraTuner
from .malora import MALoRAConfig, MALoRALinear, MALoRATuner
from .moa import MoABlock, MoAConfig, MoALinear, MoATuner
from .molora import MoLoRAConfig, MoLoRALinear, MoLoRATuner
from .moslora import MoSLoRAConfig, MoSLoRALinear, MoSLoRATuner
from .smora import SMoRAConfig, SMoRALinear, SMoRATuner
from .teamlora import TeamLoRAConfig, TeamLoRALinear, TeamLoRATuner


@dataclass(frozen=True)
class Method:
    """A method as the CLI and configs name it."""

    name: str
    config_cls: type[MoeLoraConfig] | type[peft.PeftConfig]
    #: The moelora tuner; None for a PEFT-native method, which PEFT already knows.
    tuner_cls: type[MoeLoraTuner] | None
    summary: str
    #: Config fields this method fixes (PEFT's DoRA is its LoRA with use_dora=True).
    preset: dict[str, Any] = field(default_factory=dict)
    #: Adapts the routed experts of MoE models only (DR-LoRA); dense models are refused with an error.
    moe_only: bool = False

    @property
    def native_to_peft(self) -> bool:
        return self.tuner_cls is None


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("lora", LoraConfig, LoraTuner, "LoRA (reference; output-identical to PEFT's LoRA)"),
        Method("d2mora", D2MoRAConfig, D2MoRATuner, "D2MoRA: M down / N up experts, two routers, dual orthogonality"),
        Method("comol", CoMoLConfig, CoMoLTuner, "CoMoL: shared A/B, E r x r core experts soft-merged per token"),
        Method("hydralora", HydraLoRAConfig, HydraLoRATuner, "HydraLoRA: one shared A, K routed B heads"),
        Method("molora", MoLoRAConfig, MoLoRATuner, "MoLoRA: E routed LoRA experts, dense or top-k with balance loss"),
        Method("moslora", MoSLoRAConfig, MoSLoRATuner, "MoSLoRA: LoRA with a learnable r x r mixer (mergeable)"),
        Method("teamlora", TeamLoRAConfig, TeamLoRATuner, "TeamLoRA: block-split A, K B experts, interaction matrix"),
        Method("malora", MALoRAConfig, MALoRATuner, "MALoRA: E routed experts over a shared down-projection subspace"),
        Method("smora", SMoRAConfig, SMoRATuner, "SMoRA: each rank is an expert, top-k of R ranks, loss-free bias"),
        Method("drlora", DRLoRAConfig, DRLoRATuner, "DR-LoRA: MoE expert LoRA, ranks grown by saliency", moe_only=True),
        Method("moa_soft", MoAConfig, MoATuner, "Soft MoA: LoRA, prompt, PA experts, token gates", {"sparse": False}),
        Method("moa_sparse", MoAConfig, MoATuner, "Sparse MoA: experts on tokens past a threshold", {"sparse": True}),
        Method("peft_lora", peft.LoraConfig, None, "PEFT's own LoRA (peft.LoraConfig)", {"use_dora": False}),
        Method("peft_dora", peft.LoraConfig, None, "PEFT's DoRA (peft.LoraConfig, use_dora=True)", {"use_dora": True}),
    )
}

for _method in METHODS.values():
    if not _method.native_to_peft:
        register_peft_method(
            _method.config_cls.PEFT_TYPE, _method.config_cls, _method.tuner_cls, _method.tuner_cls.prefix
        )


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def method_name_of(config: peft.PeftConfig) -> str:
    """The method name of an adapter config, as configs and tables use it."""
    for method in METHODS.values():
        if type(config) is method.config_cls and all(getattr(config, k) == v for k, v in method.preset.items()):
            return method.name
    peft_type = config.peft_type
    return str(getattr(peft_type, "value", peft_type)).lower()


__all__ = [
    "METHODS",
    "CoMoLConfig",
    "CoMoLLinear",
    "CoMoLTuner",
    "D2MoRAConfig",
    "D2MoRALinear",
    "D2MoRATuner",
    "DRLoRAConfig",
    "DRLoRATuner",
    "HydraLoRAConfig",
    "HydraLoRALinear",
    "HydraLoRATuner",
    "LoraConfig",
    "LoraLinear",
    "LoraTuner",
    "MALoRAConfig",
    "MALoRALinear",
    "MALoRATuner",
    "Method",
    "MoABlock",
    "MoAConfig",
    "MoALinear",
    "MoATuner",
    "MoLoRAConfig",
    "MoLoRALinear",
    "MoLoRATuner",
    "MoSLoRAConfig",
    "MoSLoRALinear",
    "MoSLoRATuner",
    "SMoRAConfig",
    "SMoRALinear",
    "SMoRATuner",
    "TeamLoRAConfig",
    "TeamLoRALinear",
    "TeamLoRATuner",
    "get_method",
    "method_name_of",
]
