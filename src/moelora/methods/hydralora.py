"""HydraLoRA (Tian et al., NeurIPS 2024): one shared A, K up-projection heads B_k, a token router (specs:
baselines.md §2.2, performance.md §1.1 and §5).

Per token x in R^{d_in}, with A in R^{r x d_in}, B_k in R^{d_out x r} (k = 1..K), W_r in R^{K x d_in} and
s = alpha / r:

    g(x) = softmax(W_r x)                              router on x without dropout, softmax in fp32
    h    = W0 x + s * sum_k g_k(x) B_k A drop(x)

Efficient form (§2.2, performance.md §5 item 2): A drop(x) is computed once (one GEMM), the router weights
scale it in the r-space, and one GEMM against the concatenated heads B_cat = [B_1 | ... | B_K] gives
Δh = s * B_cat vec(g ⊗ A drop(x)); no [tokens, d_out] tensor is built per head.

Dropout: one mask shared by all heads by default (A·x is then computed once). Deviation, documented: the
official layer re-applies dropout inside its per-head loop, i.e. draws an independent mask per head;
`shared_dropout_mask=False` reproduces that. Either way core/dropout.py computes the router's logits and the
dropped projection(s) without keeping a dropped copy of x (on a CPU in one GEMM over x, the dropout a sparse
correction).

Init (§5 item 4): A and the router ~ U(±1/sqrt(d_in)) (nn.Linear's default, kaiming_uniform(a=√5)), B_k = 0,
so Δh = 0 at init. No auxiliary loss: the official code's cv² balance term is defined but unused.
Not mergeable: the update depends on the input through the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.config import MoeLoraConfig, check_positive
from ..core.dropout import routed_projections
from ..core.layer import MoeLoraLayer
from ..core.tuner import MoeLoraTuner


@dataclass
class HydraLoRAConfig(MoeLoraConfig):
    """HydraLoRA adapter config. Settings in the literature: official {r4, alpha 32, K4} on gate/up/down;
    DCD {r8, K8}; D2MoRA table {r12, K8} and {r16, K6} on q/k/v."""

    PEFT_TYPE = "HYDRALORA"

    r: int = field(default=8, metadata={"help": "Rank of the shared A (and of every B head)."})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the input before A (official script: 0.05); the router sees x."}
    )
    num_experts: int = field(default=8, metadata={"help": "K, the number of B heads (DCD and D2MoRA settings: 8)."})
    shared_dropout_mask: bool = field(
        default=True,
        metadata={
            "help": "One dropout mask for all heads, so A·x is computed once (the efficient form). False draws an "
            "independent mask per head, as the official per-head loop does (K copies of x, more memory)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_experts")


class HydraLoRALinear(MoeLoraLayer):
    adapter_layer_names = ("hydra_A", "hydra_B", "hydra_router")

    def create_parameters(self, config: HydraLoRAConfig) -> dict[str, torch.Tensor]:
        k, r, d_in = config.num_experts, config.r, self.in_features
        heads = self.up_init(k, self.out_features, r, config=config)
        return {
            "hydra_A": self.linear_init(r, d_in, fan_in=d_in),
            "hydra_B": heads,
            "hydra_router": self.linear_init(k, d_in, fan_in=d_in),
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config: HydraLoRAConfig = self.adapter_config[adapter_name]
        A, B = self.hydra_A[adapter_name], self.hydra_B[adapter_name]  # [r, d_in], [K, d_out, r]
        (k, d_out, r), tokens = B.shape, x.shape[0]

        # A·x once under one mask ([T, 1, r]), or in training once per head under its own ([T, K, r]); the router
        # sees x undropped
        heads = k if self.training and not config.shared_dropout_mask else 1
        router, key = self.hydra_router[adapter_name], f"{adapter_name}/router"
        g, z = routed_projections(self, x, A.expand(heads, *A.shape), router, key, config.lora_dropout)  # [T, K]
        z = z.float()
        mixed = (g.unsqueeze(-1) * z * config.scaling).reshape(tokens, k * r)  # vec(g ⊗ Ax), head-major
        return F.linear(mixed.to(x.dtype), B.transpose(0, 1).reshape(d_out, k * r))


class HydraLoRATuner(MoeLoraTuner):
    prefix = "hydra_"
    tuner_layer_cls = HydraLoRALinear
