"""The DR-LoRA growth rule (specs: drlora.md §4-§5), as pure functions on one layer's tensors.

Per layer ℓ with units u (experts, or (matrix, expert) pairs with rank_unit='matrix') at ranks R_u:

    f̃_u = f_u / mean(f),   g̃_u = g_u / mean(g)          normalised within the layer (all ones if the mean is 0)
    g_u  = mean_{k < R_u} Ī_{u,k}   (or the sum)          Ī: the EMA of the rank importance |w * grad|
    S_u  = f̃_u g̃_u / P(R_u),   P(R) = (R / r_init)^γ     saliency='frequency' / 'importance' drop g̃ / f̃

Schedule: K events evenly spaced in (W, t_end], the last one at t_end. At an event with E_rem events left
(this one included) and a remaining layer budget B_ℓ = N r_target - Σ_u R_u, the quota is
q = ceil(B_ℓ / E_rem), capped at B_ℓ; awards of Δr (capped at r_max - R_u and at what is left of q) go to the
unit with the highest S among those below r_max, re-scored after every award ('greedy') or ranked once
('one_pass'). So the budget is never exceeded and, after the last event, Σ_u R_u = N r_target exactly.
Ties go to the lower unit index, so every process that holds the same statistics decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import DRLoRAConfig


@dataclass(frozen=True)
class GrowthSchedule:
    """When the router unfreezes and when ranks grow, in optimizer steps (an event at step s happens right after
    optimizer step s, so slices it activates first train at step s + 1)."""

    warmup_steps: int
    events: tuple[int, ...]

    @classmethod
    def for_run(cls, config: DRLoRAConfig, total_steps: int) -> GrowthSchedule:
        if total_steps < 1:
            raise ValueError(f"DR-LoRA needs the number of training steps to plan its growth, got {total_steps}")
        warmup = round(config.warmup_ratio * total_steps)
        if not config.grows:
            return cls(warmup, ())
        end = max(round(config.growth_end_ratio * total_steps), warmup)
        k = config.num_growth_events
        steps = {min(total_steps, max(1, warmup + math.ceil((i + 1) * (end - warmup) / k))) for i in range(k)}
        return cls(warmup, tuple(sorted(steps)))

    def remaining_events(self, step: int) -> int:
        """Events at `step` or later."""
        return sum(1 for event in self.events if event >= step)


def _normalised(values: torch.Tensor) -> torch.Tensor:
    mean = values.mean()
    return values / mean if mean > 0 else torch.ones_like(values)


def aggregate_importance(importance: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """g [U] from the importance EMA [U, r_max] over each unit's active components."""
    total = (importance * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1.0) if aggregation == "mean" else total


def saliency_signal(frequency: torch.Tensor, importance: torch.Tensor, saliency: str) -> torch.Tensor:
    """The numerator of S [U]: f̃ g̃, or one of them for the ablations."""
    if saliency == "frequency":
        return _normalised(frequency)
    if saliency == "importance":
        return _normalised(importance)
    return _normalised(frequency) * _normalised(importance)


def capacity_penalty(ranks: torch.Tensor, r_init: int, gamma: float) -> torch.Tensor:
    return (ranks.double() / r_init) ** gamma


def award(
    ranks: torch.Tensor,
    signal: torch.Tensor,
    quota: int,
    *,
    r_max: int,
    r_init: int,
    gamma: float,
    increment: int,
    procedure: str,
) -> torch.Tensor:
    """New ranks [U] after handing out `quota` ranks (the caller caps it at the layer's remaining budget)."""
    ranks = ranks.clone()
    signal = signal.double()
    if procedure == "one_pass":
        order = torch.sort(signal / capacity_penalty(ranks, r_init, gamma), descending=True, stable=True).indices
        while quota > 0 and bool((ranks < r_max).any()):
            for unit in order.tolist():
                if quota == 0:
                    break
                given = min(increment, r_max - int(ranks[unit]), quota)
                ranks[unit] += given
                quota -= given
        return ranks
    while quota > 0 and bool((ranks < r_max).any()):
        scores = signal / capacity_penalty(ranks, r_init, gamma)
        scores[ranks >= r_max] = -math.inf
        unit = int(torch.argmax(scores))  # the first maximum: ties go to the lower index
        given = min(increment, r_max - int(ranks[unit]), quota)
        ranks[unit] += given
        quota -= given
    return ranks


def quota(remaining_budget: int, remaining_events: int) -> int:
    """ceil(remaining / events left), capped at the remaining budget (the ceiling never over-allocates)."""
    if remaining_budget <= 0 or remaining_events <= 0:
        return 0
    return min(remaining_budget, math.ceil(remaining_budget / remaining_events))
