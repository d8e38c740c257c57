"""MALoRA, Mixture of Asymmetric Low-Rank Adaptation (Wang et al., NAACL'25 Findings, arXiv 2410.22782): routed
LoRA experts whose down-projections live in one subspace shared by the experts of the layer (specs:
baselines.md §2.7, with the routing of §2.1 / §2.3).

Per token x in R^{d_in}, with S_A in R^{d_s x d_in} (shared by the layer's experts), P_t in R^{r_t x d_s} and
B̄_t in R^{d_out x r_t} (t = 1..E), W_g in R^{E x d_in} and s = alpha / r_t:

    p(x) = softmax(W_g x)                              router on x without dropout, softmax in fp32
    w(x) = p(x)                                        dense soft mixture (top_k = None, as MoLoRA §2.1)
    w(x) = p(x) on the top-k experts / their sum, 0 elsewhere        (top_k = k, as top-k MoE-LoRA §2.3)
    h    = W0 x + s * sum_t w_t(x) B̄_t P_t S_A drop(x)

Fused form (performance.md §5, no Python loop over experts): one GEMM u = S_A drop(x) [T, d_s]; one GEMM against
the stacked P_cat = [P_1; ...; P_E] gives every expert's r_t-space vector z_t = P_t u at once ([T, E, r_t], the
batched matmul over experts written as a single GEMM since all experts share u); w scales them in the r-space;
one GEMM against B_cat = [B̄_1 | ... | B̄_E] gives Δh. Top-k is dense-masked, as in MoLoRA (unselected experts
get weight 0 and no gradient; every expert is computed).

The official code is not available, so every choice below is an inference [INF] (documented, and an option where
that makes sense):

- [INF] `r` is the expert rank r_t (the rank of B̄_t, the same for every expert) and s = lora_alpha / r_t; the
  shared subspace rank d_s is `subspace_rank`. Defaults E = 8, r_t = 8, d_s = 16, alpha = r_t: on LLaMA-7B
  q/k/v this has 35% fewer parameters than MoLoRA 8 x r8 (34.70M vs 53.48M), inside the paper's 30-48% claim;
  "expanding" r_t with the saved parameters is left to the user (raise `r`).
- [INF] Routing as MoLoRA (`molora.py`): a bias-free router on the undropped x, softmax in fp32, dense by
  default (`top_k = None`) or top-k renormalised, with the same Switch load-balancing loss
  λ·E·Σ_i f_i P_i (top-k only; `load_balance_loss_weight`, `load_balance_mask_padding`). The top-k weights and the
  loss are MoLoRA's own code, called here.
- [INF] Dropout: one mask on the input before S_A (S_A x is computed once for all experts, so a per-expert mask
  would undo the sharing). No dropout inside the subspace or before B̄.
- [INF] Init: S_A ~ U(±1/sqrt(d_in)) and P_t ~ U(±1/sqrt(d_s)), i.e. kaiming_uniform(a=√5) on their fan-in;
  router ~ U(±1/sqrt(d_in)); B̄_t = 0, so Δh = 0 at init. The unofficial re-implementation's SVD init of S_A
  (from stacked kaiming A matrices) is not implemented.
- [INF] No constraint r_t <= d_s: each expert's update B̄_t P_t S_A has rank <= min(r_t, d_s) either way.
  `subspace_rank` must not exceed d_in of any adapted module.

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
from .molora import MoLoRALinear


@dataclass
class MALoRAConfig(MoeLoraConfig):
    """MALoRA adapter config. Defaults [INF]: E = 8 experts of rank r_t = 8 over a shared subspace d_s = 16,
    alpha = r_t, dense routing."""

    PEFT_TYPE = "MALORA"

    r: int = field(default=8, metadata={"help": "r_t, the rank of every expert's B̄_t (and rows of P_t)."})
    lora_alpha: float = field(
        default=8, metadata={"help": "Scaling numerator, update scaled by alpha / r_t ([INF]: alpha = r, as MoLoRA)."}
    )
    lora_dropout: float = field(
        default=0.1,
        metadata={
            "help": "Dropout on the input before the shared S_A, one mask for all experts ([INF], 0.1 as MoLoRA)."
        },
    )
    num_experts: int = field(default=8, metadata={"help": "E, the number of experts (P_t, B̄_t pairs) per layer."})
    subspace_rank: int = field(
        default=16,
        metadata={
            "help": "d_s, the rank of the down-projection subspace S_A shared by the experts of a layer ([INF])."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "None: dense softmax mixture over all experts. k: keep the k most probable experts per token "
            "and renormalise their weights to sum to 1 (as top-k MoE-LoRA, baselines.md §2.3)."
        },
    )
    load_balance_loss_weight: float = field(
        default=1e-3,
        metadata={
            "help": "λ of the Switch-style load-balancing loss λ·E·Σ f_i P_i, as MoLoRA's; only used with top_k. "
            "0 turns it off."
        },
    )
    load_balance_mask_padding: bool = field(
        default=False,
        metadata={"help": "Leave padding (the model call's attention_mask) out of the load-balancing statistics."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_experts")
        check_positive(self, "subspace_rank")
        if self.top_k is not None:
            check_positive(self, "top_k")
            if self.top_k > self.num_experts:
                raise ValueError(f"MALoRAConfig.top_k must be <= num_experts={self.num_experts}, got {self.top_k!r}")
        if not self.load_balance_loss_weight >= 0:
            raise ValueError(
                f"MALoRAConfig.load_balance_loss_weight must be >= 0, got {self.load_balance_loss_weight!r}"
            )

    def check_module_shape(self, module_name: str, in_features: int, out_features: int) -> None:
        super().check_module_shape(module_name, in_features, out_features)
        if self.subspace_rank > in_features:
            raise ValueError(
                f"MALoRAConfig.subspace_rank={self.subspace_rank} exceeds d_in={in_features} of module {module_name!r}"
            )


class MALoRALinear(MoeLoraLayer):
    adapter_layer_names = ("malora_S", "malora_P", "malora_B", "malora_router")

    def create_parameters(self, config: MALoRAConfig) -> dict[str, torch.Tensor]:
        e, r, d_s, d_in = config.num_experts, config.r, config.subspace_rank, self.in_features
        up = self.up_init(e, self.out_features, r, config=config)
        return {
            "malora_S": self.linear_init(d_s, d_in, fan_in=d_in),  # S_A, shared by the experts
            "malora_P": self.linear_init(e, r, d_s, fan_in=d_s),  # P_t stacked
            "malora_B": up,  # B̄_t stacked
            "malora_router": self.linear_init(e, d_in, fan_in=d_in),
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config: MALoRAConfig = self.adapter_config[adapter_name]
        S, P, B = self.malora_S[adapter_name], self.malora_P[adapter_name], self.malora_B[adapter_name]
        (e, r, d_s), d_out, tokens = P.shape, B.shape[1], x.shape[0]

        # the shared subspace projects x under one mask ([T, 1, d_s], once for all experts); the router sees x
        # undropped
        router, key = self.malora_router[adapter_name], f"{adapter_name}/router"
        p, u = routed_projections(self, x, S.unsqueeze(0), router, key, config.lora_dropout)  # [T, E]
        u = u.squeeze(1)
        w = p if config.top_k is None else self._top_k_weights(p, config, adapter_name)

        z = F.linear(u, P.reshape(e * r, d_s)).view(tokens, e, r)  # every P_t u in one GEMM
        mixed = (w.unsqueeze(-1) * z.float() * config.scaling).reshape(tokens, e * r)  # expert-major
        return F.linear(mixed.to(x.dtype), B.transpose(0, 1).reshape(d_out, e * r))

    # MoLoRA's routing code, reused as is: dense-masked renormalised top-k weights and the Switch balance loss.
    _top_k_weights = MoLoRALinear._top_k_weights
    auxiliary_losses = MoLoRALinear.auxiliary_losses


class MALoRATuner(MoeLoraTuner):
    prefix = "malora_"
    tuner_layer_cls = MALoRALinear
