"""Every method: its config, layer and tuner, registered with PEFT under its peft_type on import."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import MoeLoraConfig
from ..core.tuner import MoeLoraTuner
from ..peft_compat import register_peft_method
from .d2mora import D2MoRAConfig, D2MoRALinear, D2MoRATuner
from .lora import LoraConfig, LoraLinear, LoraTuner


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
    "D2MoRAConfig",
    "D2MoRALinear",
    "D2MoRATuner",
    "LoraConfig",
    "LoraLinear",
    "LoraTuner",
    "Method",
    "get_method",
]
