"""D2MoRA (AAAI 2026): M down-projection experts, N up-projection experts, two routers (specs: d2mora.md).

Per token x in R^{d_in}, with A_i in R^{r x d_in} (i = 1..M), B_j in R^{d_out x r} (j = 1..N),
G_A in R^{M x d_in}, G_B in R^{N x r} and s = alpha / r:

    p(x) = softmax(G_A x)                              router over the A experts, sees x without dropout
    z(x) = sum_i p_i(x) A_i drop_i(x)                  independent dropout mask per A expert
    q(x) = softmax(G_B z(x))                           router over the B experts, on the low-rank embedding
    h    = W0 x + s * sum_j q_j(x) B_j z(x)

Fast form (d2mora.md §2.1), the only one here: one GEMM against the stacked A_cat = [A_1; ...; A_M] gives
all M projections (in training with the router G_A too, each expert under its own mask, no dropped copy of x
kept for backward; on a CPU the masks are a sparse correction: core/dropout.py); z mixes them;
Δh = s * B_cat vec(q ⊗ z) with B_cat = [B_1 | ... | B_N], so no [tokens, d_out] tensor is built per expert.
Routers, softmaxes and z run in fp32 even under bf16/fp16 autocast.

Init (§3): A_i and G_A ~ U(±1/sqrt(d_in)), G_B ~ U(±1/sqrt(r)), B_j = 0, so Δh = 0 at init.
Dual orthogonality loss (§4): λ Σ_{i<i'} |cos(vec A_i, vec A_i')| + λ Σ_{j<j'} |cos(vec B_j, vec B_j')| per module,
summed over modules, λ = `orthogonal_loss_weight`; computed for all modules of one shape at once (a stack and a
batched Gram matrix), which is the same sum in a handful of kernels instead of ~70 per module and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.config import MoeLoraConfig, check_positive
from ..core.dropout import routed_projections
from ..core.layer import MoeLoraLayer
from ..core.losses import pairwise_abs_cosine
from ..core.tuner import MoeLoraTuner


@dataclass
class D2MoRAConfig(MoeLoraConfig):
    """D2MoRA adapter config. Paper settings: {M3,N8,r8}, {M3,N4,r16}, {M4,N3,r16} with alpha = 2r."""

    PEFT_TYPE = "D2MORA"

    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout before the A experts (official: 0.05); routers see x undropped."}
    )
    num_down_experts: int = field(default=3, metadata={"help": "M, the number of down-projection (A) experts."})
    num_up_experts: int = field(default=8, metadata={"help": "N, the number of up-projection (B) experts."})
    orthogonal_loss_weight: float = field(
        default=1e-4,
        metadata={"help": "λ of the dual orthogonality loss (official: 1e-4, hard-coded there); 0 turns it off."},
    )
    shared_dropout_mask: bool = field(
        default=False,
        metadata={
            "help": "Use one dropout mask for all A experts (fewer mask draws). Deviation: the official "
            "code draws an independent mask per expert, which is the default."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_down_experts")
        check_positive(self, "num_up_experts")
        if self.orthogonal_loss_weight < 0:
            raise ValueError(f"D2MoRAConfig.orthogonal_loss_weight must be >= 0, got {self.orthogonal_loss_weight!r}")


class D2MoRALinear(MoeLoraLayer):
    adapter_layer_names = ("d2mora_A", "d2mora_B", "d2mora_router_A", "d2mora_router_B")

    def create_parameters(self, config: D2MoRAConfig) -> dict[str, torch.Tensor]:
        m, n, r, d_in = config.num_down_experts, config.num_up_experts, config.r, self.in_features
        up = self.up_init(n, self.out_features, r, config=config)
        return {
            "d2mora_A": self.linear_init(m, r, d_in, fan_in=d_in),
            "d2mora_B": up,
            "d2mora_router_A": self.linear_init(m, d_in, fan_in=d_in),
            "d2mora_router_B": self.linear_init(n, r, fan_in=r),
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config: D2MoRAConfig = self.adapter_config[adapter_name]
        A, B = self.d2mora_A[adapter_name], self.d2mora_B[adapter_name]  # [M, r, d_in], [N, d_out, r]
        (m, r, d_in), n, tokens = A.shape, B.shape[0], x.shape[0]

        # a dropout mask per A expert, or one for all ([1, M·r, d_in]); router_A sees x undropped
        experts = A.reshape(1, m * r, d_in) if config.shared_dropout_mask else A
        router_A, key = self.d2mora_router_A[adapter_name], f"{adapter_name}/router_A"
        p, projections = routed_projections(self, x, experts, router_A, key, config.lora_dropout)  # [T, M]
        projections = projections.reshape(tokens, m, r)
        z = (p.unsqueeze(-1) * projections.float()).sum(1)  # [T, r], fp32

        q = self.softmax_router(z, self.d2mora_router_B[adapter_name], f"{adapter_name}/router_B")  # [T, N]

        mixed = (q.unsqueeze(-1) * z.unsqueeze(1) * config.scaling).reshape(tokens, n * r)  # vec(q ⊗ z), j-major
        return F.linear(mixed.to(x.dtype), B.transpose(0, 1).reshape(B.shape[1], n * r))

    def auxiliary_losses(self, adapter_name: str) -> dict[str, torch.Tensor]:
        weight = self.adapter_config[adapter_name].orthogonal_loss_weight
        if weight == 0:
            return {}
        A, B = self.d2mora_A[adapter_name], self.d2mora_B[adapter_name]
        return {"orthogonality": weight * (pairwise_abs_cosine(A) + pairwise_abs_cosine(B))}

    @classmethod
    def batched_auxiliary_losses(cls, layers: list[MoeLoraLayer], adapter_name: str) -> dict[str, torch.Tensor]:
        """`auxiliary_losses` summed over `layers`, with the experts of all layers of one shape (and λ) stacked."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for layer in layers:
            weight = layer.adapter_config[adapter_name].orthogonal_loss_weight
            if weight == 0:
                continue
            for experts in (layer.d2mora_A[adapter_name], layer.d2mora_B[adapter_name]):
                groups.setdefault((weight, tuple(experts.shape), experts.device), []).append(experts)
        terms = [weight * pairwise_abs_cosine(torch.stack(same), batch_dims=1) for (weight, *_), same in groups.items()]
        return {"orthogonality": sum(terms[1:], terms[0])} if terms else {}


class D2MoRATuner(MoeLoraTuner):
    prefix = "d2mora_"
    tuner_layer_cls = D2MoRALinear
