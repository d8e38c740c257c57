"""MoA, heterogeneous Mixture of Adapters (arXiv 2506.05928), soft and sparse (spec: moa.md).

Every adapted decoder layer holds N heterogeneous experts and one router. Each LoRA target is its own expert (default
q, k, v, o, down); a parallel adapter (PA) sits beside the FFN and a prompt expert beside the attention. With u the
block input (the decoder layer's input, the residual stream), x_a = RMSNorm_attn(u), x_f = RMSNorm_ffn(h) the FFN
input and s = alpha / r:

    router input  v = x_a (router_input="normed", default [INF], spec §9) or v = u ("raw", the native LLaMA3 code)
    R(v) = W v + b                                           swi_x = 0: linear router, default nn.Linear init
    R(v) = W2 (SiLU(W1 v + b1) ⊙ (W3 v + b3)) + b2            swi_x > 0: SwiGLU, hidden N * swi_x, biases 0 at init
    γ(u) = sigmoid(R(v)) in (0, 1)^N                         independent gates, no normalisation (official);
    γ(u) = N * softmax(R(v))                                 gate_activation="softmax", the RQ3 ablation

    LoRA expert i on projection W0_i:   y_i = W0_i x + γ_i s B_i A_i x           (x the projection's own input)
    prompt expert, per head h:          o_h = g_h softmax(q_h K_h^T / sqrt(d_h)) V_h,   added to the input of W_o
        q_h: the head's query after q_proj (LoRA-Q included), q_norm (Qwen3) and RoPE; K = W_k P (k_norm on Qwen3,
        as the official Qwen3 file), V = W_v P with the frozen W_k, W_v (no RoPE, no LoRA) and P in R^{L x d} the L
        learnable prompt tokens; softmax over the L prompt tokens only, in fp32; g_h a zero-init per-head gate;
        under GQA each key/value head serves its group of query heads (repeat per kv group)
        a' = a + γ_prompt o, and LoRA-O sees a' (the prompt contribution included)
    parallel adapter:                   FFN(x_f) + γ_PA (U SiLU(D x_f + b_D) + b_U),   bottleneck 16

Every gate multiplies its expert's narrow hidden (A x, or SiLU(D x_f + b_D)) before the up-projection, which is
linear, so no [T, d_out] product is kept for the gate's gradient (`Routing.apply`).

The same γ(u), computed once per forward from the block input, gates every expert of the layer. Slot order of γ:
[q, k, v, prompt, o, up, gate, down, PA], keeping those present (the native code's order).

Sparse MoA (LLaMA3_sparse_moa): a per-token threshold and a hard mask, the original sigmoid kept as the weight:

    τ(u) = max_threshold * sigmoid(w_τ v + b_τ)      (τ = max_threshold with const_threshold)
    m_i  = 1[γ_i >= τ],   w_i = γ_i m_i              no subtraction of τ, no renormalisation

LoRA and PA experts run only on their selected tokens: one index_select gathers them, the expert runs on the
gathered rows, index_add scatters the gated result back (batched tensor ops, no loop over tokens). The prompt expert
is off by default for sparse MoA (prompt_length 0, the official scripts); if enabled it runs densely, times w.
In the official code τ gets no gradient: the mask is a hard comparison and the weights use the un-thresholded γ.
Here the threshold net is therefore frozen saved state by default (declared to PEFT with `keep_frozen`, like SMoRA's
bias): it is saved and restored but never trained, which is what the official AdamW does with its None gradients.
`adaptive_threshold_grad` [INF, spec §9] makes it trainable with a straight-through term: the forward weights stay
γ_i m_i exactly, and τ receives the gradient it would get from AdaMoLE's (γ_i - τ) m_i weighting.

Init (spec §2): LoRA A ~ U(±1/sqrt(d_in)) (kaiming_uniform(a=√5)), B = 0; PA D, U xavier_uniform with gain 1e-4,
biases 0 (near zero, not exactly zero); prompt P ~ N(0, 1), gate 0; the router and threshold as nn.Linear (the
SwiGLU router's biases 0). `parallel_adapter_zero_init` [INF] zeroes U so the whole update is exactly 0 at init.
No dropout anywhere. All adapter weights are fp32; routers, thresholds and the prompt softmax run in fp32 with
autocast off.

How it fits the shared machinery: the LoRA experts are `MoALinear` tuner layers on the target projections. The
router, threshold, prompt and PA parameters of a decoder layer live in one `MoABlock` tuner layer that wraps the
layer's input_layernorm: its input is u and its output x_a, so it computes γ (and τ) once per forward for the
layer, without hooks. The per-layer values (γ of each adapter, the captured queries) go through a `MoAContext`
shared by the block and the layer's LoRA experts. The PA is a forward hook on the MLP and the prompt expert a forward
pre-hook on o_proj, fed by a forward hook on q_proj (its output) and a forward pre-hook on the attention (its
position_embeddings); no modeling code is copied. The tuner removes every hook on unload. Supported decoder layers:
Llama, Qwen2, Qwen3 (transformers v5). Not mergeable: every expert is scaled per token by γ (spec §7).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from ..core.config import MoeLoraConfig, check_positive
from ..core.layer import ForwardValues, MoeLoraLayer
from ..core.tuner import MoeLoraTuner
from ..peft_compat import check_target_module_exists, keep_frozen

SUPPORTED_DECODER_LAYERS: tuple[type[nn.Module], ...] = (LlamaDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer)
#: Where each LoRA expert sits inside a supported decoder layer.
LORA_EXPERT_PATHS: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "up_proj": "mlp.up_proj",
    "gate_proj": "mlp.gate_proj",
    "down_proj": "mlp.down_proj",
}
PROMPT = "prompt"
PARALLEL_ADAPTER = "parallel_adapter"
#: Column order of γ (the native code's: [Q, K, V, Prompt, O, FFN_UP, FFN_GATE, FFN_DOWN, PA]).
SLOT_ORDER = ("q_proj", "k_proj", "v_proj", PROMPT, "o_proj", "up_proj", "gate_proj", "down_proj", PARALLEL_ADAPTER)
ROUTER_INPUTS = ("normed", "raw")
GATE_ACTIVATIONS = ("sigmoid", "softmax")
THRESHOLD_NAMES = ("moa_threshold_weight", "moa_threshold_bias")
#: The official PA init: xavier_uniform with this gain, so its output starts near zero.
PA_INIT_GAIN = 1e-4


@dataclass
class MoAConfig(MoeLoraConfig):
    """MoA adapter config (soft and sparse). Defaults follow the official code: r = alpha = 8 on q, k, v, o, down,
    PA bottleneck 16, 10 prompt tokens for soft MoA (none for sparse), max_threshold 0.5, no dropout."""

    PEFT_TYPE = "MOA"

    r: int = field(default=8, metadata={"help": "Rank of every LoRA expert (official: 8)."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA scaling numerator: s = alpha / r (official: 8)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Must be 0: MoA uses no dropout."})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        metadata={
            "help": "The LoRA experts, one per matched projection of each decoder layer: any of q_proj, k_proj, "
            "v_proj, o_proj, up_proj, gate_proj, down_proj (official: q, k, v, o, down). A decoder layer with at "
            "least one matched projection also gets the router, the PA and the prompt expert."
        },
    )
    sparse: bool = field(
        default=False,
        metadata={"help": "Sparse MoA: per-token threshold; experts run only on the tokens that pass it."},
    )
    swi_x: int = field(
        default=0,
        metadata={
            "help": "Router form: 0 is a linear router with bias; k > 0 a SwiGLU router of hidden size N * k with "
            "zero-init biases (official scripts: 0 for soft MoA on commonsense, 4 for math and sparse MoA)."
        },
    )
    router_input: str = field(
        default="normed",
        metadata={
            "help": "[INF] 'normed': the router (and threshold) see the input_layernorm output, as the HF version "
            "(spec §9); 'raw': the decoder layer's input, before the norm, as the native LLaMA3 code."
        },
    )
    gate_activation: str = field(
        default="sigmoid",
        metadata={"help": "'sigmoid': independent gates (official); 'softmax': N * softmax (the paper's ablation)."},
    )
    parallel_adapter_size: int = field(
        default=16, metadata={"help": "Bottleneck of the parallel adapter beside the FFN; 0 drops the PA expert."}
    )
    parallel_adapter_zero_init: bool = field(
        default=False,
        metadata={
            "help": "[INF] Zero-init the PA up-projection so the whole update is exactly 0 at init. Default False: "
            "the official xavier_uniform(gain=1e-4) init, whose output is near zero but not zero."
        },
    )
    prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Learnable prompt tokens of the prompt expert; 0 drops it. None: 10 for soft MoA, 0 for sparse "
            "MoA (the official final scripts)."
        },
    )
    max_threshold: float = field(
        default=0.5, metadata={"help": "Sparse MoA: τ = max_threshold * sigmoid(w·v + b), in (0, 1) (official 0.5)."}
    )
    const_threshold: bool = field(
        default=False,
        metadata={"help": "Sparse MoA: use the constant τ = max_threshold instead of the threshold net."},
    )
    adaptive_threshold_grad: bool = field(
        default=False,
        metadata={
            "help": "[INF] Sparse MoA: train the threshold net through a straight-through term (forward unchanged, "
            "τ gets AdaMoLE's (γ - τ) gradient). Default False: the official code, where τ gets no gradient; its "
            "weights are then frozen saved state."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for flag in ("sparse", "parallel_adapter_zero_init", "const_threshold", "adaptive_threshold_grad"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.prompt_length is None:
            self.prompt_length = 0 if self.sparse else 10
        check_positive(self, "swi_x", minimum=0)
        check_positive(self, "parallel_adapter_size", minimum=0)
        check_positive(self, "prompt_length", minimum=0)
        if self.lora_dropout != 0:
            raise ValueError(f"{name}.lora_dropout must be 0 (MoA uses no dropout), got {self.lora_dropout!r}")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"{name}.router_input must be one of {ROUTER_INPUTS}, got {self.router_input!r}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"{name}.gate_activation must be one of {GATE_ACTIVATIONS}, got {self.gate_activation!r}")
        threshold = self.max_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"{name}.max_threshold must be in (0, 1), got {threshold!r}")
        if self.const_threshold and not self.sparse:
            raise ValueError(f"{name}.const_threshold applies to sparse MoA only (sparse=True)")
        if self.adaptive_threshold_grad and (not self.sparse or self.const_threshold):
            raise ValueError(
                f"{name}.adaptive_threshold_grad needs sparse MoA with a learned threshold "
                "(sparse=True, const_threshold=False)"
            )


# --- per-decoder-layer state ----------------------------------------------------------------------------------------


@dataclass
class Routing:
    """One adapter's routing of one decoder layer in the current forward, over its T flattened tokens."""

    #: [T, N] fp32: the factor of each expert's output, γ (soft) or γ·m (sparse).
    weights: torch.Tensor
    #: [T, N] bool: the sparse selection m; None for soft MoA (every expert on every token).
    selected: torch.Tensor | None
    #: Expert name -> column of `weights`.
    slots: dict[str, int]

    def gate(self, expert: str, tokens: int) -> torch.Tensor:
        """The [T] weights of `expert`, checked against the token count of the tensor the expert sees."""
        if self.weights.shape[0] != tokens:
            raise RuntimeError(
                f"MoA expert {expert!r} sees {tokens} tokens but its decoder layer's router saw {self.weights.shape[0]}"
            )
        return self.weights[:, self.slots[expert]]

    def tokens(self, expert: str) -> torch.Tensor | None:
        """Indices of the tokens that selected `expert` (sparse), or None: all of them (soft)."""
        if self.selected is None:
            return None
        return self.selected[:, self.slots[expert]].nonzero().squeeze(1)

    def apply(
        self,
        expert: str,
        x: torch.Tensor,
        down: Callable[[torch.Tensor], torch.Tensor],
        up: torch.Tensor,
        up_bias: torch.Tensor | None = None,
        scaling: float = 1.0,
    ) -> torch.Tensor:
        """w_t · s · (U down(x_t) + b) for every token of x [T, d], U = `up` [d_out, k], b = `up_bias`, s =
        `scaling`. The weight multiplies down's narrow output (k columns) before U, which is the same since U is
        linear: no [T, d_out] product is kept for the weight's gradient. In sparse MoA the expert runs only on
        the selected rows (gathered with index_select, scattered back with index_add), the other rows are 0."""
        weight, index = self.gate(expert, x.shape[0]), self.tokens(expert)
        if index is not None:
            x, weight = x.index_select(0, index), weight.index_select(0, index)
        weight = (weight * scaling).unsqueeze(1)
        hidden = down(x)
        out = F.linear((hidden * weight).to(hidden.dtype), up)
        if up_bias is not None:
            out = out + weight.to(out.dtype) * up_bias
        if index is None:
            return out
        return out.new_zeros(self.weights.shape[0], out.shape[1]).index_add(0, index, out)


class MoAContext:
    """Shared by one decoder layer's MoA tuner layers and hooks: `values` holds what the current forward produced
    (the routing of each adapter, the q_proj output, the attention call). The block empties it at the start of every
    forward; copies and pickles of the model start with it empty, since its tensors carry autograd graphs."""

    def __init__(self) -> None:
        self.values = ForwardValues()

    def routing(self, adapter_name: str) -> Routing | None:
        return self.values.get("routing", {}).get(adapter_name)

    def routed(self, expert: str) -> list[tuple[str, Routing]]:
        """The adapters routed in this forward that have `expert` (none while adapters are disabled)."""
        return [(name, routing) for name, routing in self.values.get("routing", {}).items() if expert in routing.slots]


# --- the tuner layers -----------------------------------------------------------------------------------------------


class MoALayer(MoeLoraLayer):
    """Base of MoA's two tuner layer kinds (the tuner's `tuner_layer_cls`, so PEFT switches, freezes and deletes
    adapters on both)."""

    merge_unsupported_reason = "every expert is scaled per token by the router's gates"


class MoALinear(MoALayer):
    """A LoRA expert: Δy = γ_i(u) s B A x on a projection of a decoder layer (dense, or on the selected tokens)."""

    adapter_layer_names = ("moa_lora_A", "moa_lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoAConfig, expert_name: str) -> None:
        self.expert_name = expert_name
        #: The decoder layer's context; the tuner links it once the layer's block exists.
        self.context: MoAContext | None = None
        super().__init__(base_layer, adapter_name, config)

    def create_parameters(self, config: MoAConfig) -> dict[str, torch.Tensor]:
        return {
            "moa_lora_A": self.linear_init(config.r, self.in_features, fan_in=self.in_features),
            "moa_lora_B": self.up_init(self.out_features, config.r, config=config),
        }

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        routing = self.context.routing(adapter_name) if self.context is not None else None
        if routing is None:
            raise RuntimeError(
                f"MoA expert {self.expert_name!r} ran without its decoder layer's routing: MoA projections only run "
                "inside their decoder layer, after its input_layernorm"
            )
        A, B = self.moa_lora_A[adapter_name], self.moa_lora_B[adapter_name]
        scaling = self.adapter_config[adapter_name].scaling
        return routing.apply(self.expert_name, x, partial(F.linear, weight=A), B, scaling=scaling)


class MoABlock(MoALayer):
    """One decoder layer's router (and sparse threshold), prompt expert and parallel adapter, wrapping the layer's
    input_layernorm: its input is the block input u, its output x_a = RMSNorm_attn(u), so the router runs here once
    per forward. The prompt expert and the PA run from hooks the tuner registers (`capture_attention_call`,
    `capture_queries`, `add_prompt_expert`, `add_parallel_adapter`)."""

    adapter_layer_names = (
        "moa_router_weight",  # the linear router, or W2 of the SwiGLU router
        "moa_router_bias",
        "moa_router_w1",
        "moa_router_b1",
        "moa_router_w3",
        "moa_router_b3",
        *THRESHOLD_NAMES,
        "moa_adapter_down",
        "moa_adapter_down_bias",
        "moa_adapter_up",
        "moa_adapter_up_bias",
        "moa_prompt",
        "moa_prompt_gate",
    )
    other_param_names = ("adapter_config", "expert_slots")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: MoAConfig, decoder_key: str, num_heads: int
    ) -> None:
        #: Name of the decoder layer in the model: with the config it decides which LoRA experts the layer has.
        self.decoder_key = decoder_key
        self.num_heads = num_heads
        self.expert_slots: dict[str, dict[str, int]] = {}
        self.context = MoAContext()
        super().__init__(base_layer, adapter_name, config)

    def base_layer_features(self) -> tuple[int, int]:
        hidden = self.get_base_layer().weight.shape[0]
        return hidden, hidden

    def experts_of(self, config: MoAConfig) -> tuple[str, ...]:
        """The layer's experts for `config`, in slot order: its matched projections, the prompt and the PA."""
        present = {
            name
            for name, path in LORA_EXPERT_PATHS.items()
            if check_target_module_exists(config, f"{self.decoder_key}.{path}")
        }
        if config.prompt_length:
            present.add(PROMPT)
        if config.parallel_adapter_size:
            present.add(PARALLEL_ADAPTER)
        return tuple(name for name in SLOT_ORDER if name in present)

    def update_layer(self, adapter_name: str, config: MoAConfig) -> None:
        self.expert_slots[adapter_name] = {name: i for i, name in enumerate(self.experts_of(config))}
        super().update_layer(adapter_name, config)
        if config.sparse and not config.const_threshold and not config.adaptive_threshold_grad:
            keep_frozen(self, adapter_name, THRESHOLD_NAMES)  # the official τ gets no gradient: saved state

    def create_parameters(self, config: MoAConfig) -> dict[str, torch.Tensor]:
        d, n = self.in_features, len(self.experts_of(config))
        params: dict[str, torch.Tensor] = {}
        if config.swi_x:
            hidden = n * config.swi_x
            params |= {
                "moa_router_w1": self.linear_init(hidden, d, fan_in=d),
                "moa_router_b1": self.new_tensor(hidden).zero_(),
                "moa_router_w3": self.linear_init(hidden, d, fan_in=d),
                "moa_router_b3": self.new_tensor(hidden).zero_(),
                "moa_router_weight": self.linear_init(n, hidden, fan_in=hidden),
                "moa_router_bias": self.new_tensor(n).zero_(),
            }
        else:
            params |= {
                "moa_router_weight": self.linear_init(n, d, fan_in=d),
                "moa_router_bias": self.linear_init(n, fan_in=d),  # nn.Linear's uniform bias, not zero (spec §2)
            }
        if config.sparse and not config.const_threshold:
            params |= {
                "moa_threshold_weight": self.linear_init(1, d, fan_in=d),
                "moa_threshold_bias": self.linear_init(1, fan_in=d),
            }
        if config.parallel_adapter_size:
            size = config.parallel_adapter_size
            gain = PA_INIT_GAIN if config.init_weights else 1.0  # gain 1: a clearly non-zero PA for tests
            up = self.new_tensor(d, size)
            if config.init_weights and config.parallel_adapter_zero_init:
                up.zero_()
            else:
                nn.init.xavier_uniform_(up, gain=gain)
            params |= {
                "moa_adapter_down": nn.init.xavier_uniform_(self.new_tensor(size, d), gain=gain),
                "moa_adapter_down_bias": self.new_tensor(size).zero_(),
                "moa_adapter_up": up,
                "moa_adapter_up_bias": self.new_tensor(d).zero_(),
            }
        if config.prompt_length:
            gate = self.new_tensor(self.num_heads)
            params |= {
                "moa_prompt": self.new_tensor(config.prompt_length, d).normal_(),
                "moa_prompt_gate": gate.zero_() if config.init_weights else gate.normal_(),
            }
        return params

    # --- the router ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        normed = self.base_layer(x, *args, **kwargs)
        self.context.values.clear()
        if self.disable_adapters:
            return normed
        routings = {}
        for adapter_name in self.active_adapters:
            config = self.adapter_config.get(adapter_name)
            if config is None:
                continue
            source = normed if config.router_input == "normed" else x
            routings[adapter_name] = self.route(source.reshape(-1, source.shape[-1]), adapter_name)
        self.context.values["routing"] = routings
        return normed

    def route(self, v: torch.Tensor, adapter_name: str) -> Routing:
        """γ, and in sparse MoA τ, m and w = γ m, for router inputs v [T, d]; fp32 with autocast off."""
        config: MoAConfig = self.adapter_config[adapter_name]

        def param(name: str) -> torch.Tensor:
            return getattr(self, name)[adapter_name].float()

        with torch.autocast(v.device.type, enabled=False):
            v = v.float()
            hidden = v
            if config.swi_x:
                gate = F.linear(v, param("moa_router_w1"), param("moa_router_b1"))
                hidden = F.silu(gate) * F.linear(v, param("moa_router_w3"), param("moa_router_b3"))
            logits = F.linear(hidden, param("moa_router_weight"), param("moa_router_bias"))
            if config.gate_activation == "sigmoid":
                gates = torch.sigmoid(logits)
            else:
                gates = logits.shape[-1] * torch.softmax(logits, dim=-1)
            weights, selected = gates, None
            if config.sparse:
                if config.const_threshold:
                    threshold = torch.full_like(gates[:, :1], config.max_threshold)
                else:
                    logit = F.linear(v, param("moa_threshold_weight"), param("moa_threshold_bias"))
                    threshold = config.max_threshold * torch.sigmoid(logit)  # [T, 1]
                selected = gates >= threshold
                weights = gates * selected
                if config.adaptive_threshold_grad:
                    # zero in value; gives τ the gradient of -τ m, i.e. that of AdaMoLE's (γ - τ) m weighting
                    weights = weights + selected * (threshold.detach() - threshold)
        if self.routing.enabled:
            # the share of each expert in the token's total gate (sigmoid gates do not sum to 1)
            shares = weights.detach()
            self.routing.record(f"{adapter_name}/router", shares / shares.sum(-1, keepdim=True).clamp_min(1e-12))
        return Routing(weights, selected, self.expert_slots[adapter_name])

    # --- the parallel adapter (forward hook on the MLP) -------------------------------------------------------------

    def add_parallel_adapter(self, mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """FFN(x_f) + Σ_adapters γ_PA (U SiLU(D x_f + b_D) + b_U), x_f the MLP input."""
        routed = self.context.routed(PARALLEL_ADAPTER)
        if not routed:
            return None
        x = args[0]
        delta = None
        for adapter_name, routing in routed:
            down, down_bias = self.moa_adapter_down[adapter_name], self.moa_adapter_down_bias[adapter_name]
            out = routing.apply(
                PARALLEL_ADAPTER,
                self._cast_input_dtype(x, down.dtype).reshape(-1, x.shape[-1]),
                lambda h, down=down, down_bias=down_bias: F.silu(F.linear(h, down, down_bias)),
                self.moa_adapter_up[adapter_name],
                self.moa_adapter_up_bias[adapter_name],
            )
            delta = out if delta is None else delta + out
        return output + delta.reshape(output.shape).to(output.dtype)

    # --- the prompt expert (hooks on the attention, q_proj and o_proj) ------------------------------------------

    def capture_attention_call(self, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the attention: keep the module and its position_embeddings (cos, sin) for the
        prompt expert's queries."""
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self.context.values["attention_call"] = (attention, position_embeddings)

    def capture_queries(self, q_proj: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Forward hook on q_proj: keep its output (LoRA-Q included) for the prompt expert."""
        self.context.values["queries"] = output

    def add_prompt_expert(self, o_proj: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook on o_proj: a' = a + Σ_adapters γ_prompt o, so W_o and LoRA-O both see a'."""
        values = self.context.values
        queries, call = values.pop("queries", None), values.pop("attention_call", None)
        routed = self.context.routed(PROMPT)
        if not routed:
            return None
        if queries is None or call is None or call[1] is None:
            raise RuntimeError(
                "MoA's prompt expert needs q_proj's output and the attention's position_embeddings of this forward"
            )
        attention, (cos, sin) = call
        q = rotated_queries(attention, queries, cos, sin)
        a = args[0]
        delta = sum(self.prompt_expert(attention, q, adapter_name, routing) for adapter_name, routing in routed)
        return (a + delta.to(a.dtype), *args[1:])

    def prompt_expert(self, attention: nn.Module, q: torch.Tensor, adapter_name: str, routing: Routing) -> torch.Tensor:
        """γ_prompt · [g_h softmax(q_h K_h^T / sqrt(d_h)) V_h]_h for queries q [B, H, S, d_h]; returns [B, S, H d_h]."""
        prompt, gate = self.moa_prompt[adapter_name], self.moa_prompt_gate[adapter_name]
        head_dim = attention.head_dim
        keys = frozen_projection(attention.k_proj, prompt).view(prompt.shape[0], -1, head_dim)  # [L, KV, d_h]
        k_norm = getattr(attention, "k_norm", None)
        if k_norm is not None:
            keys = k_norm(keys)
        values = frozen_projection(attention.v_proj, prompt).view(prompt.shape[0], -1, head_dim)
        batch, heads, seq, _ = q.shape
        kv_heads = keys.shape[1]
        groups = heads // kv_heads
        with torch.autocast(q.device.type, enabled=False):
            # query head h uses key/value head h // groups, as transformers' repeat_kv: [B, KV, G·S, d_h]
            grouped = q.float().reshape(batch, kv_heads, groups * seq, head_dim)
            keys_by_head = keys.float().transpose(0, 1) * attention.scaling  # [KV, L, d_h]
            scores = torch.matmul(keys_by_head, grouped.transpose(-1, -2))  # [B, KV, L, G·S]
            # over the L prompt tokens as a middle dim, vectorised along G·S: over a last dim of 10 the softmax
            # took 20x as long on a CPU
            probs = torch.softmax(scores, dim=2)
            # g_h and the token's γ_prompt scale the L probabilities of each (token, head), not its d_h outputs
            token_gate = routing.gate(PROMPT, batch * seq).view(batch, 1, 1, seq)
            weight = (gate.float().view(1, kv_heads, groups, 1) * token_gate).view(batch, kv_heads, 1, groups * seq)
            out = torch.matmul((probs * weight).transpose(-1, -2), values.float().transpose(0, 1))  # [B, KV, G·S, d_h]
        return out.view(batch, heads, seq, head_dim).transpose(1, 2).reshape(batch, seq, heads * head_dim)


def frozen_projection(projection: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen base projection (bias included, any LoRA left out) applied to x in the base weight's dtype."""
    base = projection.get_base_layer() if isinstance(projection, BaseTunerLayer) else projection
    return base(x.to(base.weight.dtype))


def rotated_queries(attention: nn.Module, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The attention's per-head queries [B, H, S, d_h] from the q_proj output [B, S, H d_h]: q_norm where the model has
    one (Qwen3), then RoPE with the model's own `apply_rotary_pos_emb`."""
    q = queries.view(*queries.shape[:-1], -1, attention.head_dim)
    q_norm = getattr(attention, "q_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    q = q.transpose(1, 2)
    apply_rotary_pos_emb = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    return apply_rotary_pos_emb(q, q[:, :1], cos, sin)[0]  # it rotates a (q, k) pair; one query head stands in for k


# --- the tuner ------------------------------------------------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's supported decoder layers with their names; a ValueError naming the decoder layer class otherwise."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, SUPPORTED_DECODER_LAYERS)]
    if layers:
        return layers
    stacks = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module)]
    found = type(stacks[0][0]).__name__ if stacks else "none found"
    supported = ", ".join(cls.__name__ for cls in SUPPORTED_DECODER_LAYERS)
    raise ValueError(
        f"MoA does not support {type(model).__name__}: its decoder layer class is {found}; MoA supports the decoder "
        f"layers {supported}"
    )


def plan_blocks(model: nn.Module, config: MoAConfig) -> dict[str, int]:
    """{input_layernorm name: attention heads} of each decoder layer with a matched projection; every matched
    projection must be one of MoA's LoRA experts inside a supported decoder layer."""
    decoders = find_decoder_layers(model)
    blocks: dict[str, int] = {}
    for name, module in model.named_modules():
        if ".base_layer" in name or not isinstance(module, (nn.Linear, MoALinear)):
            continue
        if not check_target_module_exists(config, name):
            continue
        expert = name.rsplit(".", 1)[-1]
        owner = next(((key, layer) for key, layer in decoders if name.startswith(key + ".")), None)
        if owner is None or name != f"{owner[0]}.{LORA_EXPERT_PATHS.get(expert)}":
            raise ValueError(
                f"{type(config).__name__}.target_modules matches {name!r}, which is not one of MoA's LoRA experts "
                f"({', '.join(LORA_EXPERT_PATHS.values())} of a decoder layer)"
            )
        key, layer = owner
        blocks[f"{key}.input_layernorm"] = layer.self_attn.config.num_attention_heads
    return blocks


class MoATuner(MoeLoraTuner):
    prefix = "moa_"
    tuner_layer_cls = MoALayer

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        #: Hooks of the prompt experts and parallel adapters, registered after every injection.
        self._moa_hooks: list[RemovableHandle] = []
        #: The blocks (input_layernorm names -> attention heads) the adapter being injected adds.
        self._planned_blocks: dict[str, int] = {}
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def _pre_injection_hook(self, model: nn.Module, config: MoAConfig, adapter_name: str) -> None:
        find_decoder_layers(model)  # an unsupported architecture fails first, naming its decoder layer
        super()._pre_injection_hook(model, config, adapter_name)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, with each adapted decoder layer's input_layernorm as an extra target (its block), then
        the wiring of the decoder layers' contexts and hooks (again after every added adapter)."""
        self._planned_blocks = plan_blocks(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._wire(model)

    def _check_target_module_exists(self, config: MoAConfig, key: str) -> Any:
        return key in self._planned_blocks or super()._check_target_module_exists(config, key)

    def create_tuner_layer(self, target: nn.Module, adapter_name: str, config: MoAConfig, current_key: str) -> MoALayer:
        if current_key in self._planned_blocks:
            decoder_key = current_key.rsplit(".", 1)[0]
            return MoABlock(target, adapter_name, config, decoder_key, self._planned_blocks[current_key])
        return MoALinear(target, adapter_name, config, expert_name=current_key.rsplit(".", 1)[-1])

    def _wire(self, model: nn.Module) -> None:
        """Link each adapted decoder layer's LoRA experts to its block's context, and (re)register the hooks on the
        modules now in place (a later adapter may have wrapped q_proj or o_proj since the last wiring)."""
        self._remove_moa_hooks()
        for _, decoder in find_decoder_layers(model):
            block = decoder.input_layernorm
            if not isinstance(block, MoABlock):
                continue
            for module in decoder.modules():
                if isinstance(module, MoALinear):
                    module.context = block.context
            configs = block.adapter_config.values()
            attention = decoder.self_attn
            if any(config.prompt_length for config in configs):
                self._moa_hooks += [
                    attention.register_forward_pre_hook(block.capture_attention_call, with_kwargs=True),
                    attention.q_proj.register_forward_hook(block.capture_queries),
                    attention.o_proj.register_forward_pre_hook(block.add_prompt_expert),
                ]
            if any(config.parallel_adapter_size for config in configs):
                self._moa_hooks.append(decoder.mlp.register_forward_hook(block.add_parallel_adapter))

    def _remove_moa_hooks(self) -> None:
        for handle in self._moa_hooks:
            handle.remove()
        self._moa_hooks.clear()

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_moa_hooks()
        return result
