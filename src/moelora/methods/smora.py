"""SMoRA (Zhao et al., arXiv 2501.15103): every rank of one rank-R LoRA is an expert, a token router activates
k of the R ranks, and a loss-free routing bias balances their load (spec: baselines.md §2.8, §2.11).

The official code is not available; the spec rests on the abstract and a summary, so every choice marked
[INF] below is this implementation's, documented here and exposed as a config field where sensible.

Per token x in R^{d_in}, with A in R^{R x d_in}, B in R^{d_out x R}, router W in R^{R x d_in} and the
routing bias b in R^R:

    s(x) = W x                                  router logits, on x without dropout, in fp32 (no router bias)
    S(x) = top-k of (s(x) + b)                  the bias only decides which ranks are selected
    g(x) = softmax(s(x)_S)      gate_activation="softmax" (default): softmax over the k selected logits,
                                                without the bias, so the gates sum to 1 [INF]
    g(x) = sigmoid(s(x)_S)      gate_activation="sigmoid": independent gates, no renormalisation [INF]
    h    = W0 x + (alpha / r') * B diag(g ⊙ 1_S) A drop(x)
           r' = r (scaling_rank="r", default: the standard alpha / r of a rank-R LoRA) or
           r' = top_k (scaling_rank="top_k": alpha / k, the active rank) [INF]

Fused form (baselines.md §5, performance.md §5): one GEMM gives A drop(x) for all R ranks, the gates are a
dense [T, R] matrix that is zero off the top-k (so unselected ranks get neither output nor gradient), and one
GEMM against B gives the update. No Python loops. It costs a rank-R LoRA plus the [T, R] router.

Dropout [INF]: one mask on the adapter input before A, shared by all ranks (it is one LoRA), as in LoRA.

Loss-free load balancing (DeepSeek-V3 style, the update FlyLoRA uses, §2.11):

    load_i = fraction of tokens whose top-k contains rank i   (sum_i load_i = k, mean load = k / R)
    b_i   <- b_i + u * sign(mean load - load_i)                u = bias_update_rate (0 turns it off)

- When [INF]: after every forward in training mode, i.e. once per micro-batch (not per optimizer step), under
  no_grad. Never in eval mode (FlyLoRA's official code wrongly updates in eval mode too, comol.md §10 item 6).
- Padding [INF]: counted, as the sibling methods' sources do; `bias_update_mask_padding` leaves it out via the
  model call's attention mask (`token_mean`).
- Gradient checkpointing: the forward recomputed during backward neither updates the bias again nor sees the
  bias its own forward already updated; it selects with the bias value the original forward used (kept per
  adapter), so the recomputed selection and the gradients match a run without checkpointing. The recompute is
  recognised as a forward running inside an autograd backward pass.
- Distributed [INF]: with torch.distributed initialised the per-process loads are averaged
  with one all_reduce before the sign, so every process applies the same update and the biases stay identical
  (`bias_update_sync_distributed`).

The bias is state, not a trained weight: it lives in the `smora_bias` ParameterDict, so `save_pretrained` saves
it and `PeftModel.from_pretrained` restores it, but it is declared in PEFT's `frozen_peft_weight_names`, which
PEFT re-applies after every path that marks adapter weights trainable (injection, `set_adapter`,
`set_requires_grad`, loading with `is_trainable=True`): it keeps requires_grad False, gets no gradient, is not
counted by `print_trainable_parameters` and never reaches an optimizer built from trainable parameters.

Init (§5 item 4): A and the router ~ U(±1/sqrt(d_in)) (nn.Linear's default), B = 0, b = 0, so Δh = 0 at init.
Router statistics record the selection 1_S / k per token (a distribution over ranks whose mean is load / k).
Not mergeable: the update depends on the input through the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.config import MoeLoraConfig, check_positive
from ..core.dropout import dropped_projection
from ..core.layer import MoeLoraLayer, in_backward_pass
from ..core.tuner import MoeLoraTuner

GATE_ACTIVATIONS = ("softmax", "sigmoid")
SCALING_RANKS = ("r", "top_k")


@dataclass
class SMoRAConfig(MoeLoraConfig):
    """SMoRA adapter config: one rank-R LoRA whose ranks are routed experts (top-k of R per token)."""

    PEFT_TYPE = "SMORA"

    r: int = field(default=64, metadata={"help": "R, the total rank; every rank is an expert (commonly 64)."})
    lora_alpha: float = field(
        default=64, metadata={"help": "Scaling numerator: the update is scaled by alpha / r' (see scaling_rank)."}
    )
    top_k: int = field(
        default=8, metadata={"help": "k, the ranks active per token (1 <= k <= r; about 8 of 64, unverified)."}
    )
    gate_activation: str = field(
        default="softmax",
        metadata={
            "help": "[INF] Gate values on the selected ranks: 'softmax' over the k selected router logits "
            "(without the bias; gates sum to 1) or 'sigmoid' of each selected logit (no renormalisation)."
        },
    )
    scaling_rank: str = field(
        default="r",
        metadata={"help": "[INF] Scaling denominator r': 'r' gives alpha / r (rank-R LoRA), 'top_k' gives alpha / k."},
    )
    bias_update_rate: float = field(
        default=1e-3,
        metadata={
            "help": "u of the loss-free balancing update b_i += u * sign(mean load - load_i), applied after every "
            "training forward (FlyLoRA's value 1e-3). 0 disables balancing."
        },
    )
    bias_update_mask_padding: bool = field(
        default=False,
        metadata={"help": "[INF] Leave padding (the model call's attention_mask) out of the loads. Default counts it."},
    )
    bias_update_sync_distributed: bool = field(
        default=True,
        metadata={
            "help": "[INF] Under torch.distributed, average the loads over processes before the update so every "
            "process keeps the same bias."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "top_k")
        if self.top_k > self.r:
            raise ValueError(f"SMoRAConfig.top_k must be <= r={self.r}, got {self.top_k!r}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(
                f"SMoRAConfig.gate_activation must be one of {GATE_ACTIVATIONS}, got {self.gate_activation!r}"
            )
        if self.scaling_rank not in SCALING_RANKS:
            raise ValueError(f"SMoRAConfig.scaling_rank must be one of {SCALING_RANKS}, got {self.scaling_rank!r}")
        if not (isinstance(self.bias_update_rate, (int, float)) and self.bias_update_rate >= 0):
            raise ValueError(f"SMoRAConfig.bias_update_rate must be >= 0, got {self.bias_update_rate!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r if self.scaling_rank == "r" else self.top_k)


class SMoRALinear(MoeLoraLayer):
    adapter_layer_names = ("smora_A", "smora_B", "smora_router", "smora_bias")
    state_layer_names = ("smora_bias",)  # saved and restored, never trained (see the module docstring)

    def __init__(self, *args, **kwargs) -> None:
        self._bias_used: dict[str, torch.Tensor] = {}
        super().__init__(*args, **kwargs)

    def create_parameters(self, config: SMoRAConfig) -> dict[str, torch.Tensor]:
        r, d_in = config.r, self.in_features
        up = self.up_init(self.out_features, r, config=config)
        return {
            "smora_A": self.linear_init(r, d_in, fan_in=d_in),
            "smora_B": up,
            "smora_router": self.linear_init(r, d_in, fan_in=d_in),
            "smora_bias": self.new_tensor(r).zero_(),
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config: SMoRAConfig = self.adapter_config[adapter_name]
        A, B = self.smora_A[adapter_name], self.smora_B[adapter_name]  # [R, d_in], [d_out, R]
        bias = self.smora_bias[adapter_name]
        recomputing = self.training and in_backward_pass()
        if recomputing and adapter_name in self._bias_used:
            bias = self._bias_used[adapter_name]  # the bias the original forward selected with

        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.smora_router[adapter_name].float())  # [T, R]
            top_i = (logits.detach() + bias.detach().float()).topk(config.top_k, dim=-1).indices  # [T, k]
            selected_logits = logits.gather(-1, top_i)
            if config.gate_activation == "softmax":
                gates = torch.softmax(selected_logits, dim=-1)
            else:
                gates = torch.sigmoid(selected_logits)
            g = torch.zeros_like(logits).scatter(-1, top_i, gates)  # dense, zero off the top-k
            selected = torch.zeros_like(logits).scatter_(-1, top_i, 1.0)
        self.routing.record(f"{adapter_name}/router", selected / config.top_k)

        if self.training and not recomputing and config.bias_update_rate > 0:
            self._bias_used[adapter_name] = bias.detach().clone()
            self._update_bias(adapter_name, selected, config)

        projections = dropped_projection(x, A, config.lora_dropout, self.training)  # [T, R]
        return F.linear((g * projections.float() * config.scaling).to(x.dtype), B)

    @torch.no_grad()
    def _update_bias(self, adapter_name: str, selected: torch.Tensor, config: SMoRAConfig) -> None:
        load = self.token_mean(selected, config.bias_update_mask_padding)  # [R], sums to k
        dist = torch.distributed
        if config.bias_update_sync_distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
            load /= dist.get_world_size()
        bias = self.smora_bias[adapter_name]
        bias.add_((config.bias_update_rate * torch.sign(load.mean() - load)).to(bias.dtype))


class SMoRATuner(MoeLoraTuner):
    prefix = "smora_"
    tuner_layer_cls = SMoRALinear
