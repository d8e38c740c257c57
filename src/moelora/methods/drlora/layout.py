"""Where transformers v5 keeps the routed experts of each supported MoE architecture, and the grouped GEMM.

transformers 5.x stores the routed experts of these blocks as fused 3-D parameters in one `...Experts` module
(decorated with `use_experts_implementation`), called as `experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])` by its sparse-MoE block right after the block's router:

    gate_up_proj  [E, 2 I, H]   rows [gate; up] (concatenated, not interleaved), no bias
    down_proj     [E, H, I]     no bias
    output        sum_j w_tj * down_e (act(gate_e x_t) * up_e x_t),  e = top_k_index[t, j]

| experts class    | block                   | router attribute (returns logits, weights, indices) |
|------------------|-------------------------|-----------------------------------------------------|
| MixtralExperts   | MixtralSparseMoeBlock   | gate   (MixtralTopKRouter)                          |
| OlmoeExperts     | OlmoeSparseMoeBlock     | gate   (OlmoeTopKRouter)                            |
| Qwen2MoeExperts  | Qwen2MoeSparseMoeBlock  | gate   (Qwen2MoeTopKRouter; the shared expert is not adapted) |
| Qwen3MoeExperts  | Qwen3MoeSparseMoeBlock  | gate   (Qwen3MoeTopKRouter)                         |
| PhimoeExperts    | PhimoeSparseMoeBlock    | router (PhimoeTopKRouter, sparsemixer routing)      |

Any other class is refused by name: a layout is only listed here once checked against its transformers source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ExpertLayout:
    """How one architecture stores its routed experts and where its router sits."""

    #: The router's attribute name on the sparse-MoE block that holds the experts module.
    router_attr: str
    gate_up_attr: str = "gate_up_proj"
    down_attr: str = "down_proj"
    #: The router's weight [E, H], by parameter name (trained as base + delta after the warmup).
    router_weight: str = "weight"


EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    "MixtralExperts": ExpertLayout(router_attr="gate"),
    "OlmoeExperts": ExpertLayout(router_attr="gate"),
    "Qwen2MoeExperts": ExpertLayout(router_attr="gate"),
    "Qwen3MoeExperts": ExpertLayout(router_attr="gate"),
    "PhimoeExperts": ExpertLayout(router_attr="router"),
}


@dataclass(frozen=True)
class ExpertShapes:
    num_experts: int
    hidden: int
    intermediate: int

    def matrix_shape(self, matrix: str) -> tuple[int, int]:
        """(d_out, d_in) of one expert's gate, up or down matrix."""
        return (self.hidden, self.intermediate) if matrix == "down" else (self.intermediate, self.hidden)


def layout_of(module: nn.Module, name: str) -> ExpertLayout:
    """The layout of a routed-experts module, or a ValueError naming its class (and what does not fit)."""
    cls = type(module).__name__
    layout = EXPERT_LAYOUTS.get(cls)
    if layout is None:
        raise ValueError(
            f"DR-LoRA does not know the expert layout of {cls} ({name!r}); supported routed-experts classes: "
            f"{', '.join(EXPERT_LAYOUTS)}"
        )
    # The flags `use_experts_implementation` sets; a transformers release that changes them changes the math.
    expected = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}
    for flag, value in expected.items():
        if getattr(module, flag, value) != value:
            raise ValueError(f"{cls} ({name!r}) has {flag}={getattr(module, flag)!r}; DR-LoRA expects {value}")
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(f"{cls} ({name!r}) is expert-parallel; DR-LoRA needs all experts on every process")
    shapes_of(module, layout, name)
    return layout


def shapes_of(module: nn.Module, layout: ExpertLayout, name: str) -> ExpertShapes:
    gate_up, down = getattr(module, layout.gate_up_attr, None), getattr(module, layout.down_attr, None)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(
            f"{type(module).__name__} ({name!r}) lacks 3-D {layout.gate_up_attr}/{layout.down_attr} parameters"
        )
    experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (experts, hidden, two_i // 2):
        raise ValueError(
            f"{type(module).__name__} ({name!r}): {layout.gate_up_attr} {tuple(gate_up.shape)} and "
            f"{layout.down_attr} {tuple(down.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    return ExpertShapes(experts, hidden, two_i // 2)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [S, d_in] sorted by expert times their expert's `weight` [E, d_out, d_in]^T -> [S, d_out].

    `offsets` [E] (int32) are the cumulative row counts per expert. The same call as transformers' own
    `grouped_mm` experts implementation (the default of these models), so an adapter that adds zero reproduces the
    base output bit for bit. torch < 2.10 has no grouped GEMM: a loop over the experts, the only Python loop on this
    path, as transformers' own fallback does.
    """
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    pieces = [F.linear(x[s:e].to(weight.dtype), weight[i]) for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    return torch.cat(pieces)
