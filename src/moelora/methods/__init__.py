"""Every method: its config, layer and tuner, registered with PEFT under its peft_type on import."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import MoeLoraConfig
from ..core.tuner import MoeLoraTuner
from ..peft_compat import register_peft_method
from .comol import CoMoLConfig, CoMoLLinear, CoMoLTuner
from .d2mora import D2MoRAConfig, D2MoRALinear, D2MoRATuner
from .hydralora import HydraLoRAConfig, HydraLoRALinear, HydraLoRATuner
from .lora import LoraConfig, LoraLinear, LoraTuner
from .molora import MoLoRAConfig, MoLoRALinear, MoLoRATuner
from .moslora import MoSLoRAConfig, MoSLoRALinear, MoSLoRATuner
from .teamlora import TeamLoRAConfig, TeamLoRALinear, TeamLoRATuner


@dataclass(frozen=True)
class Method:
    """A method as the CLI and configs name it."""

    name: str
    config_cls: type[MoeLoraConfig]
    tuner_cls: type[MoeLoraTuner]
    summary: str


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
    )
}

for _method in METHODS.values():
    register_peft_method(_method.config_cls.PEFT_TYPE, _method.config_cls, _method.tuner_cls, _method.tuner_cls.prefix)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


__all__ = [
    "METHODS",
    "CoMoLConfig",
    "CoMoLLinear",
    "CoMoLTuner",
    "D2MoRAConfig",
    "D2MoRALinear",
    "D2MoRATuner",
    "HydraLoRAConfig",
    "HydraLoRALinear",
    "HydraLoRATuner",
    "LoraConfig",
    "LoraLinear",
    "LoraTuner",
    "Method",
    "MoLoRAConfig",
    "MoLoRALinear",
    "MoLoRATuner",
    "MoSLoRAConfig",
    "MoSLoRALinear",
    "MoSLoRATuner",
    "TeamLoRAConfig",
    "TeamLoRALinear",
    "TeamLoRATuner",
    "get_method",
]
