"""Matched parameter budgets: for each method, the rank whose trainable-parameter count comes closest to a
budget without exceeding it, so methods compare at the same size.

A method's structure (expert counts, top-k, ...) stays as configured; only the rank `r` moves (for TeamLoRA
in multiples of `num_experts`, which must divide it). Counts are exact: each candidate adapter is injected
into the model built on the meta device (no weights, no memory) and its distinct trainable tensors counted,
so shared tensors (CoMoL's layer-shared A/B) and PEFT-native extras (DoRA's magnitudes) count as they train.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .methods import METHODS, get_method
from .models import resolve_model_path


@dataclass
class BudgetRow:
    method: str
    settings: dict[str, Any]
    trainable_parameters: int


def meta_model(name_or_path: str) -> PreTrainedModel:
    """The model's architecture on the meta device: shapes only, built from its config."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except OSError as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"model {name_or_path!r}: its config could not be loaded (offline?): {reason}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_trainable(model: PreTrainedModel, method: str, settings: Mapping[str, Any]) -> int:
    """Distinct trainable parameters of `method` with `settings` injected into a copy-free meta `model`."""
    from .training import build_adapter_config  # the same validation as a training run

    adapter = get_peft_model(model, build_adapter_config(method, dict(settings)))
    try:
        return sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    finally:
        adapter.unload()  # the meta model goes back to its plain layers for the next candidate


def _rank_step(method: str, settings: Mapping[str, Any]) -> int:
    if method == "teamlora":
        return int(settings.get("num_experts", METHODS[method].config_cls().num_experts))
    return 1


def closest_under_budget(
    model: PreTrainedModel, method: str, budget: int, settings: Mapping[str, Any], max_rank: int
) -> BudgetRow | None:
    """Binary search over r (counts grow with r): the largest r whose count is <= budget, or None."""
    step = _rank_step(method, settings)
    low, high, best = 1, max_rank // step, None
    while low <= high:
        middle = (low + high) // 2
        candidate = {**settings, "r": middle * step}
        try:
            count = count_trainable(model, method, candidate)
        except ValueError as error:
            if "exceeds min(" not in str(error):
                raise
            high = middle - 1  # a rank a target module cannot hold counts as over the budget
            continue
        if count <= budget:
            best, low = BudgetRow(method, candidate, count), middle + 1
        else:
            high = middle - 1
    return best


def budget_table(
    model_name: str,
    budget: int,
    targets: list[str],
    methods: Iterable[str] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    max_rank: int = 1024,
) -> list[BudgetRow]:
    """One row per method (a count of 0 when even r = 1 exceeds the budget)."""
    for method in settings or {}:
        get_method(method)
    model = meta_model(model_name)
    rows = []
    # methods for MoE experts only (DR-LoRA) have nothing to adapt in a dense model unless asked for by name
    for method in methods or [name for name, method in METHODS.items() if not method.moe_only]:
        get_method(method)
        own = {"target_modules": targets, **(settings or {}).get(method, {})}
        rows.append(closest_under_budget(model, method, budget, own, max_rank) or BudgetRow(method, own, 0))
    return rows


def parse_count(text: str) -> int:
    """'35.8M', '45,613,056', '2.5e6', '800k' -> an integer number of parameters."""
    cleaned = text.replace(",", "").replace("_", "").strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(cleaned[-1:].lower(), 1)
    try:
        value = float(cleaned[:-1] if scale > 1 else cleaned) * scale
    except ValueError:
        raise ValueError(f"--params {text!r}: expected a count such as 35.8M, 800k or 45613056") from None
    if value < 1:
        raise ValueError(f"--params {text!r}: the budget must be at least one parameter")
    return int(value)


_STRUCTURAL_FIELDS = ("r", "num_down_experts", "num_up_experts", "num_experts", "top_k")


def structure(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The rank and expert counts of `method` with `settings`, defaults included."""
    from .training import build_adapter_config

    config = build_adapter_config(method, dict(settings))
    return {name: getattr(config, name) for name in _STRUCTURAL_FIELDS if hasattr(config, name)}


def budget_markdown(rows: list[BudgetRow], budget: int) -> str:
    lines = [
        f"Budget: {budget:,} trainable parameters (largest rank not above it; structure as configured)",
        "",
        "| method | settings | trainable params | % of budget |",
        "|---|---|---|---|",
    ]
    for row in rows:
        shown = structure(row.method, row.settings)
        count = f"{row.trainable_parameters:,}" if row.trainable_parameters else "over budget at r=1"
        share = f"{100 * row.trainable_parameters / budget:.1f}" if row.trainable_parameters else "-"
        lines.append(f"| {row.method} | {shown} | {count} | {share} |")
    return "\n".join(lines)
