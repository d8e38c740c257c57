"""The DR-LoRA tuner: injection on the MoE blocks, routing/importance statistics, growth and the rank map.

The training loop drives it between optimizer steps (the moelora pipeline through `DRLoRACallback`; a custom
loop calls the same methods, as with AdaLoRA's `update_and_allocate`):

1. `set_router_trainable(step > W and unfreeze_router)` before each step;
2. after backward, before `optimizer.step()`: `drop_frozen_router_gradients()` and `update_statistics(...)`;
3. after the optimizer step s: `grow(adapter, step=s, remaining_events=...)` at the schedule's events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.tuner import MoeLoraTuner
from ...peft_compat import check_target_module_exists
from . import growth
from .config import DRLoRAConfig
from .layers import DRLoRAExperts, DRLoRALayer, DRLoRARouter
from .layout import EXPERT_LAYOUTS, layout_of


@dataclass
class MoELayer:
    """One adapted sparse-MoE block: its experts module name, router layer and experts layer."""

    name: str
    router: DRLoRARouter
    experts: DRLoRAExperts


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class DRLoRATuner(MoeLoraTuner):
    prefix = "drlora_"
    tuner_layer_cls = DRLoRALayer
    target_module_mapping: dict[str, list[str]] = {}  # targets come from the architecture, not the model type

    # --- injection ----------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: DRLoRAConfig, adapter_name: str) -> None:
        """Nothing before injection: targets are resolved in `_prepare_adapter_config`, which `add_adapter` also
        goes through (the base tuner's hook would look for nn.Linear targets)."""

    def _prepare_adapter_config(self, config: DRLoRAConfig, model_config: dict) -> DRLoRAConfig:
        """Default targets: every routed-experts module; each match must be a known expert layout."""
        if config.target_modules is None:
            config.target_modules = {"experts"}
        matched = [
            (name, module)
            for name, module in self.model.named_modules()
            if name and ".base_layer" not in name and check_target_module_exists(config, name)
        ]
        if not matched:
            raise ValueError(
                f"DRLoRAConfig.target_modules={config.target_modules!r} matches no module of "
                f"{type(self.model).__name__}: "
                f"DR-LoRA adapts the routed experts of an MoE model; supported routed-experts classes: "
                f"{', '.join(EXPERT_LAYOUTS)}"
            )
        for name, module in matched:
            if not isinstance(module, DRLoRAExperts):
                layout_of(module, name)
        return config

    def _create_and_replace(
        self,
        config: DRLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, DRLoRAExperts):
            target.update_layer(adapter_name, config)
            getattr(parent, target.layout.router_attr).update_layer(adapter_name, config)
            return
        layout = layout_of(target, current_key)
        router = getattr(parent, layout.router_attr, None)
        if router is None:
            raise ValueError(f"{type(parent).__name__} holds {type(target).__name__} but no {layout.router_attr!r}")
        experts = DRLoRAExperts(target, adapter_name, config, layout, self.model_call)
        router_layer = DRLoRARouter(router, adapter_name, config, layout, self.model_call)
        for layer in (experts, router_layer):
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
        self._replace_module(parent, target_name, experts, target)
        self._replace_module(parent, layout.router_attr, router_layer, router)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, DRLoRALayer):
            super()._replace_module(parent, child_name, new_module, child)
            return
        # Unloading: the base module goes back as it was. PEFT's version would copy `child.weight` onto it, which
        # an experts module (gate_up_proj, down_proj) does not have.
        setattr(parent, child_name, new_module)

    def moe_layers(self) -> list[MoELayer]:
        """Every adapted MoE block, in model order."""
        layers = []
        for name, module in self.model.named_modules():
            if isinstance(module, DRLoRAExperts):
                block = self.model.get_submodule(name.rpartition(".")[0]) if "." in name else self.model
                layers.append(MoELayer(name, getattr(block, module.layout.router_attr), module))
        return layers

    def trainer_callbacks(self) -> list:
        """The Trainer callbacks a run with this tuner needs (the moelora pipeline attaches them)."""
        from .callback import DRLoRACallback

        return [DRLoRACallback(self)]

    # --- router -------------------------------------------------------------------------------------------

    def set_router_trainable(self, trainable: bool) -> None:
        """Let gradients reach the router deltas (after the warmup) or block them (during it)."""
        for layer in self.moe_layers():
            layer.router.trainable = trainable

    def drop_frozen_router_gradients(self) -> None:
        """Before the optimizer step: a frozen router's (zero) gradients become None, so the optimizer skips the
        delta entirely (no weight decay, no moments, no step count: Adam starts fresh when it unfreezes)."""
        for layer in self.moe_layers():
            if not layer.router.trainable:
                for delta in layer.router.drlora_router_delta.values():
                    delta.grad = None

    # --- statistics ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_statistics(self, adapter_name: str, importance: bool = True) -> None:
        """One optimizer step of the EMAs: routing frequency from the mass the routers accumulated since the last
        call, and (if `importance`) the rank importance from the current gradients. Under torch.distributed the
        per-process values are summed (mass, tokens) or averaged (importance) with one all_reduce first, so
        every process holds the same statistics and makes the same growth decisions."""
        layers = [layer for layer in self.moe_layers() if adapter_name in layer.experts.adapter_config]
        if not layers:
            return
        config = layers[0].experts.adapter_config[adapter_name]
        scores = [layer.experts.rank_importance(adapter_name) for layer in layers] if importance else []
        importance = bool(scores) and all(s is not None for s in scores)  # None: no backward yet
        parts: list[torch.Tensor] = []
        for index, layer in enumerate(layers):
            router = layer.router
            mass = router.mass if router.mass is not None else torch.zeros(router.num_experts, dtype=torch.float64)
            tokens = router.tokens if router.tokens is not None else torch.zeros((), dtype=torch.float64)
            parts += [mass.double(), tokens.double().reshape(1)]
            if importance:
                parts.append(scores[index].double().reshape(-1))
        device = layers[0].experts.drlora_mask[adapter_name].device
        flat = torch.cat([p.to(device) for p in parts])
        world = 1
        if _distributed():
            torch.distributed.all_reduce(flat)
            world = torch.distributed.get_world_size()
        offset = 0
        for layer in layers:
            router, experts = layer.router, layer.experts
            n = router.num_experts
            mass, tokens = flat[offset : offset + n], flat[offset + n]
            offset += n + 1
            if tokens > 0:
                frequency = router.drlora_frequency[adapter_name]
                frequency.mul_(config.frequency_beta).add_((1 - config.frequency_beta) * (mass / tokens).to(frequency))
            router.mass = router.tokens = None
            if importance:
                state = experts.drlora_importance[adapter_name]
                mean = flat[offset : offset + state.numel()].view_as(state) / world
                offset += state.numel()
                state.mul_(config.importance_beta).add_((1 - config.importance_beta) * mean.to(state))

    def unit_frequency(self, layer: MoELayer, adapter_name: str) -> torch.Tensor:
        """f per growth unit [U] (an expert's frequency is shared by its matrices with rank_unit='matrix')."""
        frequency = layer.router.drlora_frequency[adapter_name]
        units = layer.experts.num_units(layer.experts.adapter_config[adapter_name])
        return frequency.repeat(units // frequency.numel())

    def saliency(self, layer: MoELayer, adapter_name: str) -> torch.Tensor:
        """S [U] of one layer at the current ranks."""
        config = layer.experts.adapter_config[adapter_name]
        signal = self._signal(layer, adapter_name)
        return signal / growth.capacity_penalty(layer.experts.ranks(adapter_name), config.r_init, config.penalty_gamma)

    def unit_importance(self, layer: MoELayer, adapter_name: str) -> torch.Tensor:
        """g per growth unit [U]: the importance EMA aggregated over the unit's active components."""
        experts = layer.experts
        aggregation = experts.adapter_config[adapter_name].importance_aggregation
        return growth.aggregate_importance(
            experts.drlora_importance[adapter_name], experts.drlora_mask[adapter_name], aggregation
        )

    def _signal(self, layer: MoELayer, adapter_name: str) -> torch.Tensor:
        saliency = layer.experts.adapter_config[adapter_name].saliency
        frequency, importance = self.unit_frequency(layer, adapter_name), self.unit_importance(layer, adapter_name)
        return growth.saliency_signal(frequency, importance, saliency)

    # --- growth -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def grow(self, adapter_name: str, *, step: int, remaining_events: int) -> dict[str, int]:
        """One growth event after optimizer step `step`: per layer, hand out its quota by saliency. Returns the
        ranks awarded per layer. New slices have a zero B column, so the model's function does not change."""
        awarded = {}
        for layer in self.moe_layers():
            experts = layer.experts
            if adapter_name not in experts.adapter_config:
                continue
            config = experts.adapter_config[adapter_name]
            ranks = experts.ranks(adapter_name)
            budget = experts.num_units(config) * config.r
            given = growth.quota(budget - int(ranks.sum()), remaining_events)
            if given == 0:
                awarded[layer.name] = 0
                continue
            new_ranks = growth.award(
                ranks, self._signal(layer, adapter_name), given, r_max=config.r_max, r_init=config.r_init,
                gamma=config.penalty_gamma, increment=config.rank_increment, procedure=config.award,
            )  # fmt: skip
            mask, since = experts.drlora_mask[adapter_name], experts.drlora_activation_step[adapter_name]
            components = torch.arange(config.r_max, device=mask.device)
            new = (components >= ranks.to(mask.device).unsqueeze(-1)) & (
                components < new_ranks.to(mask.device).unsqueeze(-1)
            )
            mask[new] = 1.0
            since[new] = float(step)
            awarded[layer.name] = int((new_ranks - ranks).sum())
        return awarded

    # --- reporting ----------------------------------------------------------------------------------------

    def rank_report(self, adapter_name: str = "default") -> dict[str, Any]:
        """The rank map (layers x units) with the budget invariant, frequencies, importance and saliency, and the
        ranks after every growth step so far (recovered from the saved activation steps)."""
        layers = [layer for layer in self.moe_layers() if adapter_name in layer.experts.adapter_config]
        if not layers:
            raise ValueError(f"no DR-LoRA layer holds adapter {adapter_name!r}")
        config = layers[0].experts.adapter_config[adapter_name]
        budgets = [layer.experts.num_units(config) * config.r for layer in layers]
        ranks = [layer.experts.ranks(adapter_name).tolist() for layer in layers]
        since = [layer.experts.drlora_activation_step[adapter_name] for layer in layers]
        steps = sorted({int(s) for tensor in since for s in tensor.unique().tolist() if s > 0})
        history = [
            {"step": step, "ranks": [((tensor >= 0) & (tensor <= step)).sum(-1).tolist() for tensor in since]}
            for step in steps
        ]
        return {
            "adapter": adapter_name,
            "schedule": config.schedule,
            "saliency": config.saliency,
            "rank_unit": config.rank_unit,
            "expert_matrices": config.expert_matrices,
            "r_init": config.r_init,
            "r_target": config.r,
            "r_max": config.r_max,
            "layers": [layer.name for layer in layers],
            "ranks": ranks,
            "budget_per_layer": budgets,
            "rank_sums": [sum(row) for row in ranks],
            "budget_met": all(sum(row) == budget for row, budget in zip(ranks, budgets, strict=True)),
            "frequency": [layer.router.drlora_frequency[adapter_name].tolist() for layer in layers],
            "importance": [self.unit_importance(layer, adapter_name).tolist() for layer in layers],
            "saliency_scores": [self.saliency(layer, adapter_name).tolist() for layer in layers],
            "history": history,
        }
