"""The tuner layer every method shares: wraps a frozen nn.Linear and adds `compute_delta(x)` to its output.

A method subclasses `MoeLoraLayer` and writes only its math:

- `adapter_layer_names`: names of the per-adapter `nn.ParameterDict`s holding its trainable tensors
  (PEFT selects, saves and freezes adapter state structurally through these dicts);
- `create_parameters(config)`: the initialised tensors, one per name;
- `compute_delta(x, adapter_name)`: the update for a 2-D input [tokens, d_in] already in the adapter dtype;
- optionally `auxiliary_losses(adapter_name)` (weighted terms added to the training loss) and
  `get_delta_weight(adapter_name)` (only for updates that do not depend on the input, which can merge).

A loss that needs values of the forward pass (router usage for load balancing) keeps them with
`keep_for_auxiliary_loss` and reads them with `kept_for_auxiliary_loss`; `token_mean` averages over tokens,
leaving out padding when asked (the tuner shares each model call's attention mask with its layers).

The base layer handles inputs of any rank, dtypes (fp32 adapter weights, result cast back to the base
dtype), several adapters, disabling, merging and router statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..peft_compat import keep_frozen
from .config import MoeLoraConfig
from .routing import RoutingRecorder, expert_softmax


def in_backward_pass() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing recomputes a forward: state
    updated once per training forward (SMoRA's bias, DR-LoRA's routing counts) must skip that second run.
    Uses a private torch function (absent: never in backward), kept here so it lives in one place."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def compute_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype a hand-written GEMM should run in: the autocast dtype when autocast is on for x's device (custom
    autograd functions and grouped GEMMs are not autocast-aware), else `default`."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else default


@dataclass
class ModelCall:
    """What the tuner knows of the current model call, shared by all its layers."""

    attention_mask: torch.Tensor | None = None


class ForwardValues(dict):
    """Per-adapter tensors of the current training forward. They carry autograd graphs, which can be neither
    deep-copied nor pickled, so a copy of the layer starts empty instead of failing."""

    def __deepcopy__(self, memo: dict) -> ForwardValues:
        return type(self)()

    def __reduce__(self) -> tuple:
        return type(self), ()


class AdapterStateLayer(nn.Module, BaseTunerLayer):
    """What every moelora tuner layer keeps per adapter, whatever module it wraps: the `nn.ParameterDict`s named
    by `adapter_layer_names` (PEFT selects, saves and freezes adapter state structurally through them), fp32
    master weights on the base layer's device, and saved state tensors that are never trained."""

    adapter_layer_names: tuple[str, ...] = ()
    #: Those of `adapter_layer_names` that are saved state, not trained weights: never given gradients.
    state_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("adapter_config",)

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_config: dict[str, Any] = {}
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter: str | list[str] = adapter_name

    def create_parameters(self, config: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: Any) -> None:
        self.adapter_config[adapter_name] = config
        for name, tensor in self.create_parameters(config).items():
            getattr(self, name)[adapter_name] = nn.Parameter(tensor)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        frozen = tuple(name for name in self.state_layer_names if adapter_name in getattr(self, name))
        if frozen:
            keep_frozen(self, adapter_name, frozen)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def base_device(self) -> torch.device:
        """The wrapped module's device (read off its parameters: fused MoE experts have no `.weight`)."""
        return next(self.get_base_layer().parameters()).device

    def new_tensor(self, *shape: int) -> torch.Tensor:
        """An uninitialised fp32 tensor on the base layer's device (the meta device included)."""
        return torch.empty(shape, dtype=torch.float32, device=self.base_device())

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Follow the base layer's device but keep adapter weights in fp32 (the master weights)."""
        target = device if device is not None else self.base_device()
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and params[adapter_name].device not in (target, torch.device("meta")):
                params[adapter_name] = params[adapter_name].to(target)

    def live_adapters(self) -> list[str]:
        """The active adapters this layer holds (a layer outside an adapter's targets holds none of it)."""
        return [name for name in self.active_adapters if name in self.adapter_config]

    def __repr__(self) -> str:
        return f"moelora.{super().__repr__()}"


class MoeLoraLayer(AdapterStateLayer):
    #: Why `merge` is impossible for this method; methods with an input-independent update override
    #: `get_delta_weight` instead.
    merge_unsupported_reason = "its update depends on the input through routers"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoeLoraConfig) -> None:
        super().__init__(base_layer, adapter_name)
        self.routing = RoutingRecorder()
        self.model_call = ModelCall()  # the tuner replaces it with the one all its layers share
        self._forward_values = ForwardValues()
        self.in_features, self.out_features = self.base_layer_features()
        self.update_layer(adapter_name, config)

    def base_layer_features(self) -> tuple[int, int]:
        """(d_in, d_out) of the wrapped layer: an nn.Linear's sizes; a layer wrapping another kind of module (MoA's
        router on a norm layer) overrides it."""
        linear = self.get_base_layer()
        return linear.in_features, linear.out_features

    # --- what a method implements -------------------------------------------------------------------------

    def create_parameters(self, config: MoeLoraConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def auxiliary_losses(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Weighted auxiliary loss terms of this layer, summed into the training loss by the tuner."""
        return {}

    @classmethod
    def batched_auxiliary_losses(cls, layers: list[MoeLoraLayer], adapter_name: str) -> dict[str, torch.Tensor]:
        """The auxiliary terms of many layers of this class, summed (what the tuner adds to the loss). This sums
        each layer's `auxiliary_losses`; a method whose terms depend on its weights alone can override it to
        compute every layer in a few batched kernels instead of a few dozen per layer."""
        totals: dict[str, torch.Tensor] = {}
        for layer in layers:
            for term, value in layer.auxiliary_losses(adapter_name).items():
                totals[term] = totals[term] + value if term in totals else value
        return totals

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(
            f"{type(self).__name__} cannot be merged into the base weights: {self.merge_unsupported_reason}"
        )

    # --- values of the forward pass for auxiliary losses -----------------------------------------------------

    def keep_for_auxiliary_loss(self, adapter_name: str, value: torch.Tensor) -> None:
        """Keep `value` (with its graph) for `auxiliary_losses`, in training mode only. Every forward starts by
        dropping what the previous one kept, so no value outlives its forward and eval forwards leave none."""
        if self.training:
            self._forward_values[adapter_name] = value

    def kept_for_auxiliary_loss(self, adapter_name: str) -> torch.Tensor | None:
        return self._forward_values.get(adapter_name)

    def token_mean(self, values: torch.Tensor, mask_padding: bool = False) -> torch.Tensor:
        """Mean of [tokens, k] values over the tokens; with `mask_padding`, over the tokens the model call's
        attention mask keeps (all tokens when the call had no mask)."""
        mask = self.model_call.attention_mask if mask_padding else None
        if mask is None:
            return values.mean(0)
        if mask.numel() != values.shape[0]:
            raise ValueError(
                f"cannot leave padding out: the attention mask has {mask.numel()} entries but the layer saw "
                f"{values.shape[0]} tokens"
            )
        keep = mask.reshape(-1, 1).to(device=values.device, dtype=values.dtype)
        return (values * keep).sum(0) / keep.sum().clamp_min(1.0)

    # --- shared machinery ---------------------------------------------------------------------------------

    def linear_init(self, *shape: int, fan_in: int) -> torch.Tensor:
        """nn.Linear's default init, kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

        Written with an explicit fan_in because stacked experts [E, out, in] would give torch's
        fan-in computation the wrong value.
        """
        bound = 1.0 / math.sqrt(fan_in)
        return self.new_tensor(*shape).uniform_(-bound, bound)

    def up_init(self, *shape: int, config: MoeLoraConfig) -> torch.Tensor:
        """An up-projection: zero, so the update is zero at init; small random values with
        `init_weights=False` (tests of non-trivial outputs)."""
        up = self.new_tensor(*shape)
        return up.zero_() if config.init_weights else up.normal_(std=0.02)

    def softmax_router(self, x: torch.Tensor, weight: torch.Tensor, key: str) -> torch.Tensor:
        """softmax(x W^T) over the experts, in fp32 with autocast off whatever the input dtype; recorded as the
        router statistics `key` when recording is on."""
        with torch.autocast(x.device.type, enabled=False):
            return self.router_probabilities(torch.nn.functional.linear(x.float(), weight.float()), key)

    def router_probabilities(self, logits: torch.Tensor, key: str) -> torch.Tensor:
        """`softmax_router` for logits computed elsewhere (in a GEMM shared with the experts), fp32."""
        with torch.autocast(logits.device.type, enabled=False):
            probs = expert_softmax(logits.float())
        self.routing.record(key, probs)
        return probs

    def adapter_params(self, adapter_name: str) -> list[torch.Tensor]:
        return [getattr(self, name)[adapter_name] for name in self.adapter_layer_names]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._forward_values.clear()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.live_adapters():
            adapter_dtype = getattr(self, self.adapter_layer_names[0])[adapter_name].dtype
            flat = self._cast_input_dtype(x, adapter_dtype).reshape(-1, x.shape[-1])
            delta = self.compute_delta(flat, adapter_name)
            result = result + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.get_base_layer().weight
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self.adapter_config:
                continue
            delta = self.get_delta_weight(adapter_name).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(f"merging adapter {adapter_name!r} would produce non-finite weights")
            weight.data += delta
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            weight.data -= self.get_delta_weight(adapter_name).to(weight.dtype)
