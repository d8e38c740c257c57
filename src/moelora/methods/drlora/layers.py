"""DR-LoRA tuner layers: LoRA on fused routed experts (batched over experts) and a statistics-reading router.

Experts (`DRLoRAExperts`, wraps a transformers v5 `...Experts` module). For every adapted matrix W_e of expert e
(gate, up: d_in = H, d_out = I; down: d_in = I, d_out = H):

    W'_e x = W_e x + c * B_e diag(m_e) A_e drop(x)      A_e in R^{r_max x d_in}, B_e in R^{d_out x r_max}

- m_e in {0,1}^{r_max}: the active-rank mask, its first R_e entries 1 (saved state, never trained);
- c = alpha / r_target (scaling_rank='target'), independent of R_e, so activating a slice whose B column is
  still zero changes nothing: growth is function-preserving; c = alpha / R_e with scaling_rank='active';
- A: all r_max rows drawn at init; B = 0, so the update is zero at init.
- Masked slices get exactly zero gradient: u = A x is multiplied by m before B, so dL/dA[k] = m_k (...) and
  dL/dB[:, k] = (...) m_k u_k vanish for m_k = 0.

The forward is the base MoE expert computation with the LoRA terms inserted, batched over experts like
transformers' `grouped_mm` implementation: the token-expert assignments are sorted by expert, and every matmul
(base and LoRA) is one grouped GEMM over all experts (`layout.grouped_linear`). With the model's default
`grouped_mm` experts implementation the output at init equals the base output bit for bit. The LoRA GEMMs run
at r_max whatever the active ranks: stopping at the layer's largest active rank would save FLOPs early in
training, but every growth event would change the reduction length and with it the floating-point summation
order, so the output would no longer be bit-identical across a growth event.

Router (`DRLoRARouter`, wraps the block's router). It returns the base router's own outputs (logits, top-k
weights, top-k indices), unchanged, and reads them for the routing statistics in training mode:

    w_i = (1/|tokens|) sum_tokens p_i(x) 1[i in TopK(x)]     p = softmax(router logits)  (frequency_weight='top_k')

After the warmup the router can train (`unfreeze_router`): the base router then runs with weight W_G + Δ_G
(a saved delta, zero at init; gradients to Δ_G are blocked while the router is frozen).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from ...core.layer import AdapterStateLayer, ModelCall, compute_dtype, in_backward_pass
from .config import DRLoRAConfig
from .layout import ExpertLayout, ExpertShapes, grouped_linear, shapes_of


class _GradientGate(torch.autograd.Function):
    """Identity whose backward passes the gradient only when open: the router delta keeps its value (and its
    place in the graph, which DDP without find_unused_parameters requires) while the router is frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, is_open: bool) -> torch.Tensor:
        ctx.is_open = is_open
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad if ctx.is_open else torch.zeros_like(grad)), None


class DRLoRALayer(AdapterStateLayer):
    """The two DR-LoRA layers: adapter state as every moelora layer keeps it (core), and the model call the
    tuner shares. `update_layer` waits for the subclass, which must first read the wrapped module's layout."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, model_call: ModelCall) -> None:
        super().__init__(base_layer, adapter_name)
        self.model_call = model_call


class DRLoRAExperts(DRLoRALayer):
    """LoRA at r_max with an active-rank mask on every expert's gate/up/down of a fused experts module."""

    adapter_layer_names = (
        "drlora_A_gate", "drlora_B_gate", "drlora_A_up", "drlora_B_up", "drlora_A_down", "drlora_B_down",
        "drlora_mask", "drlora_activation_step", "drlora_importance",
    )  # fmt: skip
    #: mask [U, r_max] (0/1); activation_step [U, r_max]: the optimizer step at which each slice was switched on
    #: (0 from the start, -1 while inactive); importance [U, r_max]: the EMA of |w * grad| per rank component.
    state_layer_names = ("drlora_mask", "drlora_activation_step", "drlora_importance")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: DRLoRAConfig,
        layout: ExpertLayout,
        model_call: ModelCall,
    ) -> None:
        super().__init__(base_layer, adapter_name, model_call)
        self.layout = layout
        self.shapes: ExpertShapes = shapes_of(base_layer, layout, "experts")
        self.update_layer(adapter_name, config)

    # --- parameters ---------------------------------------------------------------------------------------

    def num_units(self, config: DRLoRAConfig) -> int:
        """U, the growth units: one per expert, or one per (adapted matrix, expert) with rank_unit='matrix'."""
        per_expert = 1 if config.rank_unit == "expert" else len(config.expert_matrices)
        return per_expert * self.shapes.num_experts

    def create_parameters(self, config: DRLoRAConfig) -> dict[str, torch.Tensor]:
        experts, r_max = self.shapes.num_experts, config.r_max
        params: dict[str, torch.Tensor] = {}
        for matrix in config.expert_matrices:
            d_out, d_in = self.shapes.matrix_shape(matrix)
            config.check_module_shape(f"{matrix} of {type(self.get_base_layer()).__name__}", d_in, d_out)
            a = self.new_tensor(experts, r_max, d_in)
            if config.a_init == "uniform":
                bound = 1.0 / math.sqrt(d_in)  # explicit fan_in: torch would read it wrongly off a 3-D tensor
                a.uniform_(-bound, bound)
            else:
                a.normal_(std=1.0 / r_max)
            b = self.new_tensor(experts, d_out, r_max)
            params[f"drlora_A_{matrix}"] = a
            params[f"drlora_B_{matrix}"] = b.zero_() if config.init_weights else b.normal_(std=0.02)
        units = self.num_units(config)
        active = torch.arange(r_max, device=self.base_device()) < config.r_init
        params["drlora_mask"] = active.float().expand(units, r_max).clone()
        params["drlora_activation_step"] = torch.where(active, 0.0, -1.0).expand(units, r_max).clone()
        params["drlora_importance"] = self.new_tensor(units, r_max).zero_()
        return params

    def lora_weights(self, adapter_name: str, matrix: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"drlora_A_{matrix}")[adapter_name], getattr(self, f"drlora_B_{matrix}")[adapter_name]

    def ranks(self, adapter_name: str) -> torch.Tensor:
        """R per unit (int64 [U])."""
        return self.drlora_mask[adapter_name].sum(-1).round().long()

    def unit_rows(self, adapter_name: str, matrix: str) -> slice:
        """The rows of the [U, r_max] state tensors that belong to `matrix`."""
        config = self.adapter_config[adapter_name]
        if config.rank_unit == "expert":
            return slice(None)
        index, experts = config.expert_matrices.index(matrix), self.shapes.num_experts
        return slice(index * experts, (index + 1) * experts)

    def slice_scale(self, adapter_name: str, matrix: str) -> torch.Tensor:
        """c * m per expert and rank component [E, r_max] for `matrix`."""
        config = self.adapter_config[adapter_name]
        mask = self.drlora_mask[adapter_name][self.unit_rows(adapter_name, matrix)]
        if config.scaling_rank == "target":
            return mask * config.scaling
        return mask * (config.lora_alpha / mask.sum(-1, keepdim=True).clamp_min(1.0))

    # --- forward ------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        adapters = self.live_adapters()
        if self.merged or not adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return self._adapted_forward(hidden_states, top_k_index, top_k_weights, adapters)

    def _adapted_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, adapters: list[str]
    ) -> torch.Tensor:
        experts, layout = self.get_base_layer(), self.layout
        tokens, top_k = top_k_index.shape
        # Sort the T*k token-expert assignments by expert; each expert's rows are then one group of the GEMMs.
        expert_ids, order = torch.sort(top_k_index.reshape(-1))
        x = hidden_states[order // top_k]
        # End of each expert's rows; a search, not a bincount, so no device synchronisation on GPUs.
        experts_range = torch.arange(self.shapes.num_experts, device=expert_ids.device)
        offsets = torch.searchsorted(expert_ids, experts_range, right=True).to(torch.int32)
        assignment_weights = top_k_weights.reshape(-1)[order]

        gate_up = grouped_linear(x, getattr(experts, layout.gate_up_attr), offsets)  # [S, 2I]
        gate, up = (self._lora(matrix, x, expert_ids, offsets, adapters) for matrix in ("gate", "up"))
        if gate is not None or up is not None:
            zeros = (gate if gate is not None else up).new_zeros(x.shape[0], self.shapes.intermediate)
            delta = torch.cat([gate if gate is not None else zeros, up if up is not None else zeros], dim=-1)
            gate_up = gate_up + delta.to(gate_up.dtype)
        hidden = experts._apply_gate(gate_up)  # the model's own gating: act(gate) * up
        out = grouped_linear(hidden, getattr(experts, layout.down_attr), offsets)  # [S, H]
        down = self._lora("down", hidden, expert_ids, offsets, adapters)
        if down is not None:
            out = out + down.to(out.dtype)

        weighted = out * assignment_weights.unsqueeze(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return weighted[inverse].view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _lora(
        self, matrix: str, x: torch.Tensor, expert_ids: torch.Tensor, offsets: torch.Tensor, adapters: list[str]
    ) -> torch.Tensor | None:
        """sum over adapters of c B_e diag(m_e) A_e drop(x) for the sorted rows x [S, d_in] -> [S, d_out]; None
        when no adapter adapts `matrix`."""
        total = None
        for adapter_name in adapters:
            if matrix not in self.adapter_config[adapter_name].expert_matrices:
                continue
            A, B = self.lora_weights(adapter_name, matrix)
            dtype = compute_dtype(x, A.dtype)
            dropped = F.dropout(x, self.adapter_config[adapter_name].lora_dropout, self.training)
            u = grouped_linear(dropped.to(dtype), A.to(dtype), offsets)  # [S, r_max]
            u = u * self.slice_scale(adapter_name, matrix)[expert_ids].to(dtype)
            delta = grouped_linear(u, B.to(dtype), offsets)
            total = delta if total is None else total + delta
        return total

    # --- merging: the update does not depend on the input ----------------------------------------------------

    def get_delta_weight(self, adapter_name: str, matrix: str) -> torch.Tensor:
        """c B_e diag(m_e) A_e for every expert [E, d_out, d_in]."""
        A, B = self.lora_weights(adapter_name, matrix)
        return torch.einsum("eor,er,eri->eoi", B, self.slice_scale(adapter_name, matrix), A)

    @torch.no_grad()
    def _add_to_base(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        experts, intermediate = self.get_base_layer(), self.shapes.intermediate
        updates = []
        for matrix in self.adapter_config[adapter_name].expert_matrices:
            weight = getattr(experts, self.layout.down_attr if matrix == "down" else self.layout.gate_up_attr)
            rows = {"gate": slice(0, intermediate), "up": slice(intermediate, None), "down": slice(None)}[matrix]
            updates.append((weight, rows, sign * self.get_delta_weight(adapter_name, matrix).to(weight.dtype)))
        if safe_merge:
            for weight, rows, delta in updates:
                if not torch.isfinite(weight.data[:, rows] + delta).all():
                    raise ValueError(f"merging adapter {adapter_name!r} would produce non-finite weights")
        for weight, rows, delta in updates:
            weight.data[:, rows] += delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name in self.adapter_config:
                self._add_to_base(adapter_name, 1.0, safe_merge)
                self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_to_base(self.merged_adapters.pop(), -1.0)

    # --- statistics ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def rank_importance(self, adapter_name: str) -> torch.Tensor | None:
        """I [U, r_max]: |A[k,:] * dL/dA[k,:]| + |B[:,k] * dL/dB[:,k]| summed over each unit's matrices; None
        before any backward."""
        config = self.adapter_config[adapter_name]
        per_matrix = []
        for matrix in config.expert_matrices:
            A, B = self.lora_weights(adapter_name, matrix)
            if A.grad is None or B.grad is None:
                return None
            per_matrix.append((A * A.grad).abs().sum(-1) + (B * B.grad).abs().sum(-2))  # [E, r_max]
        if config.rank_unit == "expert":
            return torch.stack(per_matrix).sum(0)
        return torch.cat(per_matrix)


class DRLoRARouter(DRLoRALayer):
    """The block's router, unchanged in output; accumulates the routing mass per expert in training mode."""

    adapter_layer_names = ("drlora_router_delta", "drlora_frequency")
    #: frequency [E]: the EMA f of the routing weight w per expert.
    state_layer_names = ("drlora_frequency",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: DRLoRAConfig,
        layout: ExpertLayout,
        model_call: ModelCall,
    ) -> None:
        super().__init__(base_layer, adapter_name, model_call)
        self.layout = layout
        self.num_experts: int = getattr(base_layer, layout.router_weight).shape[0]
        #: Whether gradients reach the router delta (set by the tuner: False during the warmup).
        self.trainable = False
        #: Routing mass per expert and token count since the last optimizer step (fp64, detached; not saved).
        self.mass: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.update_layer(adapter_name, config)

    def create_parameters(self, config: DRLoRAConfig) -> dict[str, torch.Tensor]:
        params = {"drlora_frequency": self.new_tensor(self.num_experts).zero_()}
        if config.unfreeze_router:
            params["drlora_router_delta"] = self.new_tensor(*getattr(self.base_layer, self.layout.router_weight).shape)
            params["drlora_router_delta"].zero_()
        return params

    def forward(self, hidden_states: torch.Tensor) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states)
        adapters = self.live_adapters()
        deltas = [self.drlora_router_delta[name] for name in adapters if name in self.drlora_router_delta]
        if self.merged or not deltas:
            outputs = self.base_layer(hidden_states)
        else:
            weight = getattr(self.base_layer, self.layout.router_weight)
            delta = _GradientGate.apply(torch.stack(deltas).sum(0), self.trainable)
            # The base router's own forward (jitter, softmax, top-k, renormalisation) with W_G + Δ_G.
            outputs = functional_call(
                self.base_layer, {self.layout.router_weight: weight + delta.to(weight.dtype)}, (hidden_states,)
            )
        if self.training and adapters and not in_backward_pass():
            self._accumulate(outputs, self.adapter_config[adapters[0]])
        return outputs

    @torch.no_grad()
    def _accumulate(self, outputs: tuple, config: DRLoRAConfig) -> None:
        logits, _, indices = outputs
        probs = torch.softmax(logits.detach().double(), dim=-1)  # [T, E]
        if config.frequency_weight == "top_k":
            probs = torch.zeros_like(probs).scatter_(-1, indices, probs.gather(-1, indices))
        keep = probs.new_ones(probs.shape[0])
        mask = self.model_call.attention_mask if config.frequency_mask_padding else None
        if mask is not None:
            if mask.numel() != probs.shape[0]:
                raise ValueError(
                    f"DRLoRAConfig.frequency_mask_padding: the attention mask has {mask.numel()} entries but the "
                    f"router saw {probs.shape[0]} tokens; set frequency_mask_padding=False"
                )
            keep = mask.reshape(-1).to(probs)
        mass, tokens = (probs * keep.unsqueeze(-1)).sum(0), keep.sum()
        self.mass = mass if self.mass is None else self.mass + mass
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = getattr(self.get_base_layer(), self.layout.router_weight)
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name in self.drlora_router_delta:
                delta = self.drlora_router_delta[adapter_name].detach().to(weight.dtype)
                if safe_merge and not torch.isfinite(weight.data + delta).all():
                    raise ValueError(f"merging adapter {adapter_name!r} would produce non-finite weights")
                weight.data += delta
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        weight = getattr(self.get_base_layer(), self.layout.router_weight)
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.drlora_router_delta:
                weight.data -= self.drlora_router_delta[adapter_name].detach().to(weight.dtype)
