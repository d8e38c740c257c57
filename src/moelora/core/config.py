"""Fields shared by every moelora method config; each method subclasses `MoeLoraConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import PeftConfig


def check_positive(config: object, name: str, minimum: int = 1) -> None:
    """Raise a ValueError naming `Config.field` when an integer field is below `minimum`."""
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{type(config).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class MoeLoraConfig(PeftConfig):
    """Base config of the moelora tuners: rank, scaling, dropout and the modules to adapt.

    Subclasses set `PEFT_TYPE` (the string stored as `peft_type` in `adapter_config.json`) and add their
    own fields; `__post_init__` validates every field and names the offending one in its error.
    """

    PEFT_TYPE: ClassVar[str] = ""

    r: int = field(default=8, metadata={"help": "Rank of every low-rank expert."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability on the adapter input (0 <= p < 1)."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or one regex of the nn.Linear layers to adapt. "
            "Defaults to q_proj, k_proj, v_proj on Llama-style decoders, as in the D2MoRA paper."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (all layers when None)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, with layers_to_transform."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Initialise up-projections to zero so the update is zero at init. False draws them at "
            "random (for tests of non-trivial outputs only)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = self.PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_positive(self, "r")
        name = type(self).__name__
        if self.lora_alpha <= 0:
            raise ValueError(f"{name}.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{name}.layers_pattern requires layers_to_transform to be set")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def check_module_shape(self, module_name: str, in_features: int, out_features: int) -> None:
        """Reject a rank the module cannot hold: a rank above min(d_in, d_out) adds no expressiveness."""
        if self.r > min(in_features, out_features):
            raise ValueError(
                f"{type(self).__name__}.r={self.r} exceeds min(d_in={in_features}, d_out={out_features}) "
                f"of module {module_name!r}"
            )
