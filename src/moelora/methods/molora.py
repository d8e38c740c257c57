"""MoLoRA (Zadouri et al. 2023) and its top-k variant ("MoLE" in the CoMoL code): E full LoRA experts mixed
by a token router (specs: baselines.md §2.1 and §2.3, performance.md §5).

Per token x in R^{d_in}, with A_i in R^{r x d_in}, B_i in R^{d_out x r} (i = 1..E), W_g in R^{E x d_in} and
s = alpha / r:

    p(x) = softmax(W_g x)                              router on x without dropout, softmax in fp32
    w(x) = p(x)                                        dense soft mixture (top_k = None, §2.1)
    w(x) = p(x) on the top-k experts / their sum, 0 elsewhere            (top_k = k, §2.3)
    h    = W0 x + s * sum_i w_i(x) B_i A_i drop_i(x)

Fused form (performance.md §5 item 1): one GEMM against the stacked A_cat = [A_1; ...; A_E] gives every
expert's projection (a batched matmul over E dropped copies of x when the masks are independent), w scales
them in the r-space, and one GEMM against B_cat = [B_1 | ... | B_E] gives Δh = s * B_cat vec(w ⊗ A x).
Top-k is dense-masked (the unselected experts get weight 0 and hence no gradient): the recommended form for
E·r <= 128 (performance.md §5 item 2); it computes every expert, so it costs as much as dense MoLoRA
(sparse per-expert dispatch for larger E·r is not implemented).

Dropout: an independent mask per expert, as in the CoMoL code (`shared_dropout_mask` for one mask); no dropped
copy of x is kept for backward, and on a CPU the router and the experts share one GEMM over x (core/dropout.py).

Load-balancing loss (top-k only, §2.3), per layer and summed over layers by the tuner:

    L_lb = λ * E * sum_i f_i P_i,   f_i = (top-k selections of expert i) / N_tokens  (so sum_i f_i = k),
                                    P_i = mean over tokens of p_i(x)

f is a count (no gradient); the gradient flows through P. With uniform routing (P_i = 1/E) L_lb = λ k
whatever f is; routing collapsed onto k experts drives it to λ E. Padding tokens count, as in the source code;
`load_balance_mask_padding` leaves them out (the tuner shares the model call's attention mask). The value is
kept only from a forward in training mode and dropped at the start of every forward (`keep_for_auxiliary_loss`),
so an eval forward never leaves a stale term behind. Under gradient checkpointing use `use_reentrant=False`
(transformers' default): the reentrant variant runs the first forward without autograd, so the term would reach
the loss without a gradient.

Init (§5 item 4): A_i and the router ~ U(±1/sqrt(d_in)), B_i = 0, so Δh = 0 at init.
Not mergeable: the update depends on the input through the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.config import MoeLoraConfig, check_positive
from ..core.dropout import routed_projections
from ..core.layer import MoeLoraLayer
from ..core.losses import switch_load_balance
from ..core.routing import top_k_renormalized
from ..core.tuner import MoeLoraTuner


@dataclass
class MoLoRAConfig(MoeLoraConfig):
    """MoLoRA adapter config; defaults follow the DCD setting (8 experts × r8, alpha = r, dropout 0.1)."""

    PEFT_TYPE = "MOLORA"

    r: int = field(default=8, metadata={"help": "Rank of every expert (DCD setting: 8)."})
    lora_alpha: float = field(
        default=8, metadata={"help": "Scaling numerator, update scaled by alpha / r (DCD code: alpha = r, s = 1)."}
    )
    lora_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the input before the A experts (CoMoL train.py: 0.1)."}
    )
    num_experts: int = field(default=8, metadata={"help": "E, the number of LoRA experts (DCD setting: 8)."})
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "None: dense softmax mixture over all experts (MoLoRA). k: keep the k most probable experts "
            "per token and renormalise their weights to sum to 1 (top-k MoE-LoRA, CoMoL's MoLE uses 2 of 8)."
        },
    )
    load_balance_loss_weight: float = field(
        default=1e-3,
        metadata={
            "help": "λ of the Switch-style load-balancing loss λ·E·Σ f_i P_i (CoMoL configs: 1e-3); only used "
            "with top_k, as dense MoLoRA has no auxiliary loss. 0 turns it off."
        },
    )
    load_balance_mask_padding: bool = field(
        default=False,
        metadata={
            "help": "Leave padding (the model call's attention_mask) out of f and P. Deviation: the source code "
            "counts every token, padding included (baselines.md §5 item 5)."
        },
    )
    shared_dropout_mask: bool = field(
        default=False,
        metadata={
            "help": "Use one dropout mask for all experts (one GEMM, less memory). Default False: an independent "
            "mask per expert, as in the CoMoL code."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_experts")
        if self.top_k is not None:
            check_positive(self, "top_k")
            if self.top_k > self.num_experts:
                raise ValueError(f"MoLoRAConfig.top_k must be <= num_experts={self.num_experts}, got {self.top_k!r}")
        if not self.load_balance_loss_weight >= 0:
            raise ValueError(
                f"MoLoRAConfig.load_balance_loss_weight must be >= 0, got {self.load_balance_loss_weight!r}"
            )


class MoLoRALinear(MoeLoraLayer):
    adapter_layer_names = ("molora_A", "molora_B", "molora_router")

    def create_parameters(self, config: MoLoRAConfig) -> dict[str, torch.Tensor]:
        e, r, d_in = config.num_experts, config.r, self.in_features
        up = self.up_init(e, self.out_features, r, config=config)
        return {
            "molora_A": self.linear_init(e, r, d_in, fan_in=d_in),
            "molora_B": up,
            "molora_router": self.linear_init(e, d_in, fan_in=d_in),
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config: MoLoRAConfig = self.adapter_config[adapter_name]
        A, B = self.molora_A[adapter_name], self.molora_B[adapter_name]  # [E, r, d_in], [E, d_out, r]
        (e, r, d_in), d_out, tokens = A.shape, B.shape[1], x.shape[0]

        # a dropout mask per expert, or one for all ([1, E·r, d_in]); the router sees x undropped
        experts = A.reshape(1, e * r, d_in) if config.shared_dropout_mask else A
        router, key = self.molora_router[adapter_name], f"{adapter_name}/router"
        p, projections = routed_projections(self, x, experts, router, key, config.lora_dropout)  # [T, E]
        projections = projections.reshape(tokens, e, r)
        w = p if config.top_k is None else self._top_k_weights(p, config, adapter_name)
        mixed = (w.unsqueeze(-1) * projections.float() * config.scaling).reshape(tokens, e * r)  # expert-major
        return F.linear(mixed.to(x.dtype), B.transpose(0, 1).reshape(d_out, e * r))

    def _top_k_weights(self, p: torch.Tensor, config: MoLoRAConfig, adapter_name: str) -> torch.Tensor:
        """Dense [T, E] weights: the top-k probabilities renormalised to sum to 1, zeros elsewhere; in training
        also stores the weighted load-balancing term of this forward."""
        weights, selected = top_k_renormalized(p, config.top_k)
        if self.training and config.load_balance_loss_weight > 0:
            balance = switch_load_balance(p, selected, lambda v: self.token_mean(v, config.load_balance_mask_padding))
            self.keep_for_auxiliary_loss(adapter_name, config.load_balance_loss_weight * balance)
        return weights

    def auxiliary_losses(self, adapter_name: str) -> dict[str, torch.Tensor]:
        term = self.kept_for_auxiliary_loss(adapter_name)
        return {} if term is None else {"load_balance": term}


class MoLoRATuner(MoeLoraTuner):
    prefix = "molora_"
    tuner_layer_cls = MoLoRALinear
