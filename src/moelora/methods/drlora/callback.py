"""DR-LoRA in the HF Trainer: the growth schedule, router warmup, optimizer remedies and reports, as a callback.

Per optimizer step s (1-based), with W warmup steps and the schedule's growth events:

- before the forward passes: the router delta receives gradients only when s > W (and `unfreeze_router`);
- before `optimizer.step()`: a frozen router's gradients are dropped (the optimizer skips it entirely), the
  routing-frequency and rank-importance EMAs are updated (all-reduced under DDP), and the slices whose update
  must be rescaled are snapshotted;
- after `optimizer.step()`, the optimizer remedies (specs: drlora.md §6, all on preallocated parameters, no
  optimizer surgery):
  * newly activated slices start with zero Adam moments while the optimizer's bias correction assumes t >> 1, so
    their first updates would be up to (1 - β1^τ)/sqrt(1 - β2^τ) / ((1 - β1^t)/sqrt(1 - β2^t)) times too large
    (3.2x at τ = 1, 6.5x at τ = 10 with β = (0.9, 0.999)). `new_slice_update='bias_correction'` (default) scales
    the update of a slice activated τ steps ago by
        s(τ) = [sqrt(1 - β2^τ) / (1 - β1^τ)] / [sqrt(1 - β2^t) / (1 - β1^t)],
    which is exactly Adam with a step counter per slice (up to ε); 'lr_ramp' scales it by min(1, τ / ramp_steps);
  * decoupled weight decay would shrink inactive A rows although they receive no gradient: with weight decay
    > 0, inactive slices are restored after every step, i.e. decay is masked to active slices (the pipeline's
    default weight decay is 0, the spec's default);
- after the step: a growth event at s hands out the layer quotas.

Reports, in `args.output_dir` (main process): `drlora_routing.jsonl` (frequencies and ranks at every log step;
the logs get `drlora_frequency_entropy`, the mean normalised entropy of the frequencies, and `drlora_rank_max`),
and at the end of training `drlora_rank_map.json` and the heatmap `drlora_rank_map.png` (layers x units).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .growth import GrowthSchedule

if TYPE_CHECKING:
    from .tuner import DRLoRATuner

logger = logging.get_logger(__name__)
ROUTING_LOG = "drlora_routing.jsonl"
RANK_MAP_JSON = "drlora_rank_map.json"
RANK_MAP_PNG = "drlora_rank_map.png"
#: Update scales this close to 1 are left alone (the bias-correction factor converges to 1 only slowly).
_TOLERANCE = 1e-6


@dataclass
class _SliceUpdate:
    """Slices of one adapted matrix whose optimizer update is rescaled by `scale` after the step."""

    A: torch.Tensor
    B: torch.Tensor
    selected: torch.Tensor  # [E, r_max] bool
    scale: torch.Tensor  # [n]
    old_A: torch.Tensor  # [n, d_in]
    old_B: torch.Tensor  # [n, d_out]

    @torch.no_grad()
    def apply(self) -> None:
        scale = self.scale.unsqueeze(-1)
        rows = self.A.data[self.selected]
        self.A.data[self.selected] = (self.old_A + scale * (rows - self.old_A)).to(self.A.dtype)
        columns = self.B.data.transpose(1, 2)  # a view: writing through it updates B
        moved = columns[self.selected]
        columns[self.selected] = (self.old_B + scale * (moved - self.old_B)).to(self.B.dtype)


def _adam_correction(step: torch.Tensor | float, betas: tuple[float, float]) -> torch.Tensor:
    """sqrt(1 - β2^t) / (1 - β1^t): the factor Adam's bias correction puts on m / sqrt(v)."""
    step = torch.as_tensor(step, dtype=torch.float64)
    beta1, beta2 = betas
    return torch.sqrt(1 - beta2**step) / (1 - beta1**step)


class DRLoRACallback(TrainerCallback):
    """Drives a `DRLoRATuner` from the Trainer (attached by the moelora pipeline through `trainer_callbacks`)."""

    def __init__(self, tuner: DRLoRATuner) -> None:
        self.tuner = tuner
        self.schedule: GrowthSchedule | None = None
        self._betas: tuple[float, float] | None = None
        self._decay = False
        self._pending: list[_SliceUpdate] = []

    def _adapters(self) -> list[str]:
        return [name for name in self.tuner.active_adapters if name in self.tuner.peft_config]

    def _config(self) -> Any:
        return self.tuner.peft_config[self._adapters()[0]]

    def _router_trainable(self, step: int) -> bool:
        return self._config().unfreeze_router and step > self.schedule.warmup_steps

    # --- schedule and statistics ----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        config = self._config()
        self.schedule = GrowthSchedule.for_run(config, state.max_steps)
        if config.grows and getattr(args, "load_best_model_at_end", False):
            logger.warning(
                "DR-LoRA with load_best_model_at_end: the best checkpoint may predate the last growth event, and its "
                "ranks then sum below the budget (the rank map written at the end describes the adapter kept)"
            )
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        adapter_weights = {
            id(weight)
            for layer in self.tuner.moe_layers()
            for name in layer.experts.adapter_layer_names
            if name not in layer.experts.state_layer_names
            for weight in getattr(layer.experts, name).values()
        }
        groups = [
            g for g in getattr(optimizer, "param_groups", []) if any(id(p) in adapter_weights for p in g["params"])
        ]
        self._decay = any(group.get("weight_decay", 0) > 0 for group in groups)
        betas = {tuple(group["betas"]) for group in groups if "betas" in group}
        if config.new_slice_update == "bias_correction" and config.grows:
            if len(betas) != 1:
                raise ValueError(
                    f"DRLoRAConfig.new_slice_update='bias_correction' needs an Adam-style optimizer with one pair of "
                    f"betas for the adapter weights, got {type(optimizer).__name__} with betas {sorted(betas)}; "
                    "use 'lr_ramp' or 'none'"
                )
            self._betas = betas.pop()
        self.tuner.set_router_trainable(self._router_trainable(state.global_step + 1))

    def on_step_begin(self, args, state, control, **kwargs):
        self.tuner.set_router_trainable(self._router_trainable(state.global_step + 1))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step + 1
        self.tuner.drop_frozen_router_gradients()
        config = self._config()
        last_event = self.schedule.events[-1] if self.schedule.events else 0
        # Importance only matters for decisions still to come; frequencies are also logged, so always kept.
        importance = config.grows and config.saliency != "frequency" and step <= last_event
        for adapter_name in self._adapters():
            self.tuner.update_statistics(adapter_name, importance=importance)
        self._pending = self._slice_updates(step, getattr(optimizer, "optimizer", optimizer))

    def on_optimizer_step(self, args, state, control, **kwargs):
        for update in self._pending:
            update.apply()
        self._pending = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.schedule.events:
            remaining = self.schedule.remaining_events(state.global_step)
            for adapter_name in self._adapters():
                self.tuner.grow(adapter_name, step=state.global_step, remaining_events=remaining)

    # --- optimizer remedies -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _slice_updates(self, step: int, optimizer: Any) -> list[_SliceUpdate]:
        updates = []
        for layer in self.tuner.moe_layers():
            experts = layer.experts
            for adapter_name in self._adapters():
                config = experts.adapter_config[adapter_name]
                for matrix in config.expert_matrices:
                    A, B = experts.lora_weights(adapter_name, matrix)
                    rows = experts.unit_rows(adapter_name, matrix)
                    scale = self._update_scale(
                        experts.drlora_activation_step[adapter_name][rows], step, config, optimizer, A
                    )
                    selected = (scale - 1).abs() > _TOLERANCE
                    if bool(selected.any()):
                        updates.append(
                            _SliceUpdate(A, B, selected, scale[selected], A.detach()[selected].clone(),
                                         B.detach().transpose(1, 2)[selected].clone())
                        )  # fmt: skip
        return updates

    def _update_scale(
        self, since: torch.Tensor, step: int, config: Any, optimizer: Any, weight: torch.Tensor
    ) -> torch.Tensor:
        """Per slice [E, r_max]: 0 for inactive slices under weight decay, the remedy's factor for young ones."""
        scale = torch.ones_like(since, dtype=torch.float64)
        if self._decay:
            scale[since < 0] = 0.0
        young = since > 0
        if config.new_slice_update == "none" or not bool(young.any()):
            return scale
        age = (step - since[young]).double()
        if config.new_slice_update == "lr_ramp":
            scale[young] = (age / config.new_slice_ramp_steps).clamp(max=1.0)
            return scale
        state = getattr(optimizer, "state", {}).get(weight, {})
        global_step = float(state["step"]) + 1 if "step" in state else 1.0
        age = age.clamp(max=global_step)
        scale[young] = _adam_correction(age, self._betas) / _adam_correction(global_step, self._betas)
        return scale

    # --- reporting ----------------------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        adapter_name = self._adapters()[0]
        layers = self.tuner.moe_layers()
        frequencies = {layer.name: layer.router.drlora_frequency[adapter_name].tolist() for layer in layers}
        ranks = {layer.name: layer.experts.ranks(adapter_name).tolist() for layer in layers}
        entropies = []
        for values in frequencies.values():
            probs = torch.tensor(values, dtype=torch.float64)
            if probs.sum() > 0 and probs.numel() > 1:
                probs = probs / probs.sum()
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
                entropies.append(float(entropy / math.log(probs.numel())))
        added = {"drlora_rank_max": max(max(row) for row in ranks.values())}
        if entropies:
            added["drlora_frequency_entropy"] = sum(entropies) / len(entropies)
        logs.update(added)
        if state.log_history:  # the Trainer stored a copy of the logs before calling the callbacks
            state.log_history[-1].update(added)
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(args.output_dir) / ROUTING_LOG, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, "frequency": frequencies, "ranks": ranks}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_rank_report(self.tuner.rank_report(self._adapters()[0]), args.output_dir)


def write_rank_report(report: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """`drlora_rank_map.json` and the heatmap `drlora_rank_map.png` (layers x units) in `output_dir`."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output_dir / RANK_MAP_JSON, output_dir / RANK_MAP_PNG
    json_path.write_text(json.dumps(report, indent=2))
    ranks = report["ranks"]
    units = len(ranks[0])
    figure = Figure(figsize=(min(24.0, max(6.0, 2.5 + 0.35 * units)), min(16.0, max(3.0, 1.8 + 0.35 * len(ranks)))))
    axes = figure.add_subplot()
    image = axes.imshow(ranks, aspect="auto", cmap="viridis", vmin=0, vmax=report["r_max"], interpolation="nearest")
    figure.colorbar(image, ax=axes, label="active rank")
    if units * len(ranks) <= 1024:  # small maps carry their numbers
        for row, values in enumerate(ranks):
            for column, rank in enumerate(values):
                color = "black" if rank > 0.6 * report["r_max"] else "white"
                axes.text(column, row, str(rank), ha="center", va="center", fontsize=7, color=color)
    labels = [(re.findall(r"\.(\d+)\.", f".{name}.") or [name])[0] for name in report["layers"]]
    axes.set_yticks(range(len(labels)), labels)
    axes.set_ylabel("layer")
    if report["rank_unit"] == "matrix":
        axes.set_xlabel(f"unit ({' | '.join(report['expert_matrices'])}, experts within each)")
    else:
        axes.set_xlabel("expert")
    met = "met" if report["budget_met"] else "NOT met"
    axes.set_title(f"DR-LoRA ranks (r_target {report['r_target']}, r_max {report['r_max']}): budget {met}")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return json_path, png_path
