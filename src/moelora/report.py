"""Routing and expert-diversity report of one run, or two side by side (`moelora report`).

Two analyses, each written as PNG figures and summarised in `report.md` (all numbers also in `report.json`):

- **Routing on an evaluation set**, for every method with routers. Each task's first `limit` test items go
  through the model as their evaluation prompts, one item per forward pass, so padding never reaches the
  routers, with the tuner's routing recorder on (`MoeLoraTuner.record_routing`). Per task, layer, adapted
  module and router: the mean routing probability of each expert over the tokens (expert usage; the figures
  show it relative to uniform) and the mean per-token router entropy. The summary gives, per task and
  router, three numbers in [0, 1]:
  *entropy* (mean per-token entropy / log E: 1 = every token spreads evenly, 0 = one expert per token),
  *balance* (entropy of the mean usage / log E: 1 = all experts used equally over the task), and
  *specificity* (Jensen-Shannon divergence between the task's usage and the mean usage over all tasks,
  / log 2: 0 = the task routes like the others).
- **Expert similarity** (the D2MoRA paper's analysis, d2mora.md §9 figures): per layer and module, the mean
  absolute cosine similarity between the flattened A experts and between the flattened B experts, the
  quantity the dual orthogonality loss sums (`pairwise_abs_cosine`), divided by the number of pairs. Read
  from the saved adapter weights; no model needed. D2MoRA (A and B experts), MoLoRA (A and B) and HydraLoRA
  (its B heads; A is shared) have experts of this form.

With a second run (for instance trained with `adapter.orthogonal_loss_weight=0`) every figure and table shows
both. Figures use matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, load_config
from .core.losses import pairwise_abs_cosine
from .data import load_records
from .tasks import EVAL_TEMPLATE, TASKS, get_task

#: Expert tensors stacked along dim 0 ([E, ...]), per method and kind, whose pairwise similarity is reported.
EXPERT_TENSORS: dict[str, dict[str, str]] = {
    "d2mora": {"A": "d2mora_A", "B": "d2mora_B"},
    "molora": {"A": "molora_A", "B": "molora_B"},
    "hydralora": {"B": "hydra_B"},
}
REPORT_DIR = "report"
_MODULE_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.(.+)$")

#: {task: {router: {module position: {layer: {"mean_prob": [...], "entropy": float, "tokens": int}}}}}
RoutingStats = dict[str, dict[str, dict[str, dict[int, dict[str, Any]]]]]
#: {kind: {module position: {layer: {"mean": float, "matrix": [[...]], "zero": bool}}}}
SimilarityStats = dict[str, dict[str, dict[int, dict[str, Any]]]]


@dataclass
class Run:
    """A run folder (or any moelora adapter folder) as the report reads it."""

    path: Path
    label: str
    method: str
    adapter_config: dict[str, Any]
    run_config: RunConfig | None


def open_run(path: str | Path, label: str | None = None) -> Run:
    from peft import PeftConfig

    from .methods import method_name_of
    from .models import check_adapter_folder
    from .training import RUN_CONFIG_NAME

    path = Path(path)
    check_adapter_folder(path)  # before any model loads: PEFT's loader would fail late, or unpickle a .bin
    run_config = load_config(path / RUN_CONFIG_NAME) if (path / RUN_CONFIG_NAME).is_file() else None
    method = method_name_of(PeftConfig.from_pretrained(str(path)))
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    return Run(path, label or path.resolve().name, method, adapter_config, run_config)


def split_module_name(name: str) -> tuple[int, str]:
    """(layer index, position in the layer): 'model.layers.12.self_attn.q_proj' -> (12, 'self_attn.q_proj').
    A module outside any numbered layer list counts as layer 0."""
    match = _LAYER_INDEX.search(name)
    return (int(match.group(1)), match.group(2)) if match else (0, name)


_PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ordered_positions(positions: Iterable[str]) -> list[str]:
    """Module positions in a decoder layer's order (q, k, v, o, gate, up, down), others after them by name."""

    def key(position: str) -> tuple[int, str]:
        last = position.rsplit(".", 1)[-1]
        return (_PROJECTION_ORDER.index(last) if last in _PROJECTION_ORDER else len(_PROJECTION_ORDER), position)

    return sorted(set(positions), key=key)


def short_names(positions: Sequence[str]) -> dict[str, str]:
    """Last name components ('q_proj') when they tell the positions apart, else the full positions."""
    last = {position: position.rsplit(".", 1)[-1] for position in positions}
    return last if len(set(last.values())) == len(last) else {position: position for position in positions}


# --- routing ---------------------------------------------------------------------------------------------------


def _tuner(model):
    from .core.tuner import MoeLoraTuner

    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, MoeLoraTuner) else None


@torch.inference_mode()
def collect_routing(model, tokenizer, test_files: Mapping[str, str | Path], limit: int | None) -> RoutingStats:
    """Router statistics per task: each item's evaluation prompt in its own forward pass (no padding tokens,
    which the recorder would otherwise count) with the tuner's recorder on."""
    tuner = _tuner(model)
    if tuner is None:
        raise ValueError("routing statistics need a moelora adapter (a PEFT-native method has no routers)")
    model.eval()
    stats: RoutingStats = {}
    try:
        for task, path in test_files.items():
            records = load_records(path, get_task(task).name)[:limit]
            tuner.reset_routing_statistics()
            tuner.record_routing(True)
            for record in records:
                prompt = EVAL_TEMPLATE.format(instruction=record["instruction"])
                inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
                model(**inputs, logits_to_keep=1)
            per_task: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
            for module, routers in tuner.routing_statistics().items():
                layer, position = split_module_name(module)
                for key, values in routers.items():
                    router = key.split("/", 1)[-1]
                    per_task.setdefault(router, {}).setdefault(position, {})[layer] = values
            stats[task] = per_task
    finally:
        tuner.record_routing(False)
        tuner.reset_routing_statistics()
    return stats


def _entropy(probs: Sequence[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def _normalised(value: float, experts: int) -> float:
    return value / math.log(experts) if experts > 1 else float("nan")


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def routing_summary(stats: RoutingStats) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {router: {entropy, balance, specificity}}}, averaged over layers and modules (module docstring)."""
    mean_usage: dict[tuple[str, str, int], list[float]] = {}
    for per_task in stats.values():
        for router, positions in per_task.items():
            for position, layers in positions.items():
                for layer, values in layers.items():
                    key = (router, position, layer)
                    total = mean_usage.setdefault(key, [0.0] * len(values["mean_prob"]))
                    for i, p in enumerate(values["mean_prob"]):
                        total[i] += p / len(stats)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for task, per_task in stats.items():
        for router, positions in per_task.items():
            entropy, balance, specificity = [], [], []
            for position, layers in positions.items():
                for layer, values in layers.items():
                    usage, experts = values["mean_prob"], len(values["mean_prob"])
                    overall = mean_usage[(router, position, layer)]
                    middle = [(a + b) / 2 for a, b in zip(usage, overall, strict=True)]
                    js = _entropy(middle) - (_entropy(usage) + _entropy(overall)) / 2
                    entropy.append(_normalised(values["entropy"], experts))
                    balance.append(_normalised(_entropy(usage), experts))
                    specificity.append(max(js, 0.0) / math.log(2))
            summary.setdefault(task, {})[router] = {
                "entropy": _mean(entropy),
                "balance": _mean(balance),
                "specificity": _mean(specificity),
            }
    return summary


# --- expert similarity -----------------------------------------------------------------------------------------


def expert_similarity(weights: Mapping[str, torch.Tensor], method: str) -> SimilarityStats:
    """Mean |cos| between the experts of each kind, per module position and layer, with the pairwise matrices.

    The mean is `pairwise_abs_cosine` (the orthogonality loss's sum) over the number of pairs; matrix entry
    (i, j) is the same quantity for experts i and j alone, so the two always agree.
    """
    kinds = EXPERT_TENSORS.get(method)
    if kinds is None:
        raise ValueError(f"method {method!r} has no stacked expert tensors to compare")
    by_name = {name: kind for kind, name in kinds.items()}
    stats: SimilarityStats = {}
    for key, tensor in weights.items():
        module, _, name = key.removeprefix(_MODULE_PREFIX).rpartition(".")
        kind = by_name.get(name)
        if kind is None:
            continue
        experts = tensor.detach().float().cpu()
        count = experts.shape[0]
        matrix = torch.eye(count)
        for i in range(count):
            for j in range(i + 1, count):
                matrix[i, j] = matrix[j, i] = pairwise_abs_cosine(experts[[i, j]])
        pairs = count * (count - 1) // 2
        layer, position = split_module_name(module)
        stats.setdefault(kind, {}).setdefault(position, {})[layer] = {
            "mean": float(pairwise_abs_cosine(experts)) / pairs if pairs else float("nan"),
            "matrix": matrix.tolist(),
            "zero": bool(experts.abs().amax() == 0),
        }
    if not stats:
        raise ValueError(f"the adapter holds none of {method}'s expert tensors ({', '.join(by_name)})")
    return stats


def _layer_mean(per_layer: Mapping[int, Mapping[str, Any]]) -> float:
    return _mean([values["mean"] for values in per_layer.values()])


# --- figures ---------------------------------------------------------------------------------------------------


def _task_name(task: str) -> str:
    return TASKS[task].display if task in TASKS else task


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(cols * width, 4.0), max(rows * height, 2.5)), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _layer_ticks(ax, layers: Sequence[int]) -> None:
    """Label heatmap rows with their layer numbers (rows need not be consecutive layers), at most ~8 labels."""
    step = max(1, math.ceil(len(layers) / 8))
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def usage_scale(values: list[float]) -> tuple[float, float]:
    """Colour-scale limits for usage relative to uniform: as far from 1 on each side as the farthest value, but
    never below 0 (a usage cannot be negative)."""
    spread = max(max((abs(value - 1.0) for value in values), default=1.0), 0.01)
    return max(0.0, 1.0 - spread), 1.0 + spread


def plot_usage(stats: RoutingStats, router: str, title: str, path: Path) -> Path:
    """Rows: tasks; columns: module positions; each panel a layers x experts heatmap of expert usage relative
    to uniform (E x mean routing probability: 1 = the expert's fair share), on a diverging scale centred on 1 so that
    what a task prefers or avoids stands out even when routing is nearly uniform. Usage is never negative: the
    scale runs from max(0, 1 - spread) to 1 + spread, each side stretched on its own (TwoSlopeNorm)."""
    from matplotlib.colors import TwoSlopeNorm

    tasks = list(stats)
    positions = ordered_positions(p for per_task in stats.values() for p in per_task.get(router, {}))
    names = short_names(positions)
    grids = {
        (task, position): [
            [p * len(values["mean_prob"]) for p in values["mean_prob"]]
            for _, values in sorted(stats[task].get(router, {}).get(position, {}).items())
        ]
        for task in tasks
        for position in positions
    }
    low, high = usage_scale([value for grid in grids.values() for row in grid for value in row])
    norm = TwoSlopeNorm(vmin=low, vcenter=1.0, vmax=high)
    figure, axes = _figure(len(tasks), len(positions), 2.6, 2.0)
    image = None
    for row, task in enumerate(tasks):
        for col, position in enumerate(positions):
            ax, grid = axes[row][col], grids[(task, position)]
            if grid:
                image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
                ax.set_xticks(range(0, len(grid[0]), max(1, len(grid[0]) // 8)))
                _layer_ticks(ax, sorted(stats[task][router][position]))
            ax.set_title(f"{_task_name(task)} · {names[position]}", fontsize=8)
            ax.set_xlabel("expert", fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            ax.tick_params(labelsize=6)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.6, label="expert usage x E (1 = uniform)")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_entropy(runs: Sequence[tuple[str, RoutingStats]], router: str, path: Path) -> Path:
    """Columns: module positions; x: layer; y: mean per-token entropy / log E; one line per task (and per run)."""
    positions = ordered_positions(p for _, stats in runs for t in stats.values() for p in t.get(router, {}))
    names = short_names(positions)
    figure, axes = _figure(1, len(positions), 3.6, 3.0)
    colours = {task: f"C{i % 10}" for i, task in enumerate(dict.fromkeys(t for _, s in runs for t in s))}
    styles = ("-", "--")
    for col, position in enumerate(positions):
        ax = axes[0][col]
        for (label, stats), style in zip(runs, styles, strict=False):
            for task, per_task in stats.items():
                layers = per_task.get(router, {}).get(position, {})
                xs = sorted(layers)
                ys = [_normalised(layers[x]["entropy"], len(layers[x]["mean_prob"])) for x in xs]
                name = _task_name(task)
                ax.plot(xs, ys, style, color=colours[task], label=f"{name} ({label})" if len(runs) > 1 else name)
        ax.set_ylim(0, 1.05)
        ax.set_title(names[position], fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("router entropy / log E")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    figure.suptitle(f"{router}: per-token router entropy", fontsize=10)
    return _save(figure, path)


def plot_similarity_layers(runs: Sequence[tuple[str, SimilarityStats]], path: Path) -> Path:
    """Rows: expert kinds (A, B); columns: module positions; mean |cos| per layer, one line per run."""
    kinds = sorted({kind for _, stats in runs for kind in stats})
    positions = ordered_positions(p for _, stats in runs for kind in stats.values() for p in kind)
    names = short_names(positions)
    figure, axes = _figure(len(kinds), len(positions), 3.4, 2.6)
    for row, kind in enumerate(kinds):
        for col, position in enumerate(positions):
            ax = axes[row][col]
            for label, stats in runs:
                layers = stats.get(kind, {}).get(position, {})
                xs = sorted(layers)
                ax.plot(xs, [layers[x]["mean"] for x in xs], marker=".", label=label)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{kind} experts · {names[position]}", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("mean |cos|")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Expert similarity per layer", fontsize=10)
    return _save(figure, path)


def plot_similarity_heatmap(runs: Sequence[tuple[str, SimilarityStats]], path: Path) -> Path:
    """Rows: expert kinds; columns: runs; each panel a layers x module positions heatmap of mean |cos|."""
    kinds = sorted({kind for _, stats in runs for kind in stats})
    positions = ordered_positions(p for _, stats in runs for kind in stats.values() for p in kind)
    names = short_names(positions)
    figure, axes = _figure(len(kinds), len(runs), 2.2 + 0.5 * len(positions), 3.2)
    image = None
    for row, kind in enumerate(kinds):
        for col, (label, stats) in enumerate(runs):
            ax = axes[row][col]
            per_position = stats.get(kind, {})
            layers = sorted({layer for p in per_position.values() for layer in p})
            grid = [
                [per_position.get(p, {}).get(layer, {}).get("mean", float("nan")) for p in positions]
                for layer in layers
            ]
            if layers:
                image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
                _layer_ticks(ax, layers)
            ax.set_xticks(range(len(positions)), [names[p] for p in positions], fontsize=7)
            ax.set_title(f"{kind} experts · {label}", fontsize=9)
            ax.set_ylabel("layer")
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.7, label="mean |cos|")
    figure.suptitle("Expert similarity per layer and module", fontsize=10)
    return _save(figure, path)


def plot_expert_matrices(runs: Sequence[tuple[str, SimilarityStats]], layers: Sequence[int], path: Path) -> Path:
    """Pairwise |cos| matrices (experts x experts). Rows: kind x run; columns: chosen layers x module positions."""
    kinds = sorted({kind for _, stats in runs for kind in stats})
    positions = ordered_positions(p for _, stats in runs for kind in stats.values() for p in kind)
    names = short_names(positions)
    columns = [(layer, position) for layer in layers for position in positions]
    rows = [(kind, label, stats) for kind in kinds for label, stats in runs]
    figure, axes = _figure(len(rows), len(columns), 1.8, 1.8)
    image = None
    for row, (kind, label, stats) in enumerate(rows):
        for col, (layer, position) in enumerate(columns):
            ax = axes[row][col]
            entry = stats.get(kind, {}).get(position, {}).get(layer)
            if entry is not None:
                image = ax.imshow(entry["matrix"], cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{layer} {names[position]}", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{kind} · {label}", fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.5, label="|cos|")
    figure.suptitle("Pairwise expert similarity", fontsize=10)
    return _save(figure, path)


# --- the report ------------------------------------------------------------------------------------------------

ROUTING_METRICS = ("entropy", "balance", "specificity")


def _fmt(value: float | None) -> str:
    """Three decimals; values too small for them (a task's specificity, say) in scientific notation."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1e}" if 0 < abs(value) < 5e-4 else f"{value:.3f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


_SET_FIELDS = {"target_modules", "exclude_modules", "modules_to_save"}


def _config_differences(runs: Sequence[Run]) -> list[str]:
    """Adapter fields that differ between the runs, for the report's header."""
    if len(runs) < 2:
        return []
    ignored = {"base_model_name_or_path", "peft_version", "revision"}
    first, second = runs[0].adapter_config, runs[1].adapter_config

    def value(config: dict, key: str) -> Any:
        # PEFT stores target_modules as a set, saved as a list in the process's hash order: compare as a set
        field = config.get(key)
        return sorted(field) if key in _SET_FIELDS and isinstance(field, list) else field

    return [
        f"`{key}` {value(first, key)!r} vs {value(second, key)!r}"
        for key in sorted(set(first) | set(second))
        if key not in ignored and value(first, key) != value(second, key)
    ]


def default_layers(similarity: Sequence[SimilarityStats]) -> list[int]:
    """First, middle and last adapted layer, for the expert-matrix figure."""
    layers = sorted({layer for stats in similarity for kind in stats.values() for p in kind.values() for layer in p})
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if layers else []


def _routing_section(
    runs: Sequence[Run], routing: Sequence[RoutingStats | None], data_note: str, out: Path
) -> tuple[list[str], dict[str, Any]]:
    lines = ["## Routing on the evaluation set", ""]
    measured = []
    for run, stats in zip(runs, routing, strict=True):
        if stats is None:
            lines.append(f"- {run.label}: not measured.")
        elif not any(stats.values()):
            lines.append(f"- {run.label}: method {run.method!r} has no routers; nothing to measure.")
        else:
            measured.append((run.label, stats))
    if not measured:
        return lines, {}
    lines += [
        f"{data_note} Each item's evaluation prompt runs alone, so padding never reaches the routers.",
        "",
        "Per task and router, averaged over layers and modules, all in [0, 1]: **entropy** = mean per-token "
        "router entropy / log E (1: every token spreads evenly over the experts); **balance** = entropy of the "
        "task's mean expert usage / log E (1: the task uses all experts equally); **specificity** = "
        "Jensen-Shannon divergence of the task's usage from the mean usage over tasks / log 2 (0: it routes "
        "like the other tasks). Figures: expert usage per layer (rows: tasks), router entropy per layer.",
    ]
    record = {}
    for label, stats in measured:
        summary = routing_summary(stats)
        routers = sorted({router for per_task in stats.values() for router in per_task})
        header = ["task", *(f"{router} {metric}" for router in routers for metric in ROUTING_METRICS)]
        rows = [
            [_task_name(task), *(_fmt(summary[task].get(r, {}).get(m)) for r in routers for m in ROUTING_METRICS)]
            for task in summary
        ]
        lines += ["", f"### {label}", "", *_table(header, rows), ""]
        for router in routers:
            figure = plot_usage(
                stats, router, f"{label}: {router} expert usage", out / f"usage_{_slug(label)}_{router}.png"
            )
            lines.append(f"![{label} {router} usage]({figure.name})")
        record[label] = {"summary": summary, "stats": stats}
    lines.append("")
    for router in sorted({r for _, stats in measured for per_task in stats.values() for r in per_task}):
        figure = plot_entropy(measured, router, out / f"entropy_{_slug(router)}.png")
        lines.append(f"![{router} entropy per layer]({figure.name})")
    return lines, record


def _similarity_section(
    similar: Sequence[tuple[str, SimilarityStats]], skipped: Sequence[str], layers: Sequence[int] | None, out: Path
) -> list[str]:
    lines = ["## Expert similarity", "", *(f"- {note}" for note in skipped)]
    if not similar:
        return lines
    kinds = sorted({kind for _, stats in similar for kind in stats})
    positions = ordered_positions(p for _, stats in similar for kind in stats.values() for p in kind)
    names = short_names(positions)
    lines += [
        "Mean absolute cosine similarity between the flattened experts of a module, over all pairs (the quantity "
        "D2MoRA's dual orthogonality loss sums), averaged over layers. 0: orthogonal experts; 1: collinear.",
        "",
        *_table(
            ["module", *(f"{kind}: {label}" for kind in kinds for label, _ in similar)],
            [
                [
                    names[p],
                    *(_fmt(_layer_mean(stats.get(kind, {}).get(p, {}))) for kind in kinds for _, stats in similar),
                ]
                for p in positions
            ],
        ),
    ]
    zero = [
        f"{label} {kind}"
        for label, stats in similar
        for kind, per_position in stats.items()
        if all(v["zero"] for per_layer in per_position.values() for v in per_layer.values())
    ]
    if zero:
        lines += ["", f"All-zero experts (untrained up-projections?): {', '.join(zero)}; their similarity reads 0."]
    all_layers = sorted({layer for _, s in similar for kind in s.values() for p in kind.values() for layer in p})
    lines += ["", "Per layer (" + " / ".join(label for label, _ in similar) + "):", ""]
    lines += _table(
        ["layer", *(f"{kind} {names[p]}" for kind in kinds for p in positions)],
        [
            [
                str(layer),
                *(
                    " / ".join(_fmt(s.get(kind, {}).get(p, {}).get(layer, {}).get("mean")) for _, s in similar)
                    for kind in kinds
                    for p in positions
                ),
            ]
            for layer in all_layers
        ],
    )
    chosen = list(layers) if layers else default_layers([stats for _, stats in similar])
    figures = [
        plot_similarity_layers(similar, out / "similarity_layers.png"),
        plot_similarity_heatmap(similar, out / "similarity_heatmap.png"),
        plot_expert_matrices(similar, chosen, out / "similarity_experts.png"),
    ]
    lines += ["", *(f"![{figure.stem}]({figure.name})" for figure in figures)]
    return lines


def build_report(
    runs: Sequence[Run],
    out: Path,
    *,
    routing: Sequence[RoutingStats | None],
    data_note: str = "",
    layers: Sequence[int] | None = None,
) -> Path:
    """Write the figures, report.md and report.json into `out` from collected routing statistics (None for a
    run not measured) and the runs' saved adapter weights; returns the Markdown path."""
    from peft.utils import load_peft_weights

    similar, skipped = [], []
    for run in runs:
        if run.method in EXPERT_TENSORS:
            similar.append((run.label, expert_similarity(load_peft_weights(str(run.path), device="cpu"), run.method)))
        else:
            skipped.append(f"{run.label}: method {run.method!r} has no stacked experts to compare.")
    if not similar and not any(stats for stats in routing if stats and any(stats.values())):
        raise ValueError(
            "nothing to report: "
            + "; ".join(f"{run.label} (method {run.method!r}) has no routers and no stacked experts" for run in runs)
        )
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# moelora report: {' vs '.join(run.label for run in runs)}", ""]
    lines += _table(
        ["run", "folder", "method", "model"],
        [
            [
                run.label,
                f"`{run.path}`",
                run.method,
                str(run.run_config.model if run.run_config else run.adapter_config.get("base_model_name_or_path")),
            ]
            for run in runs
        ],
    )
    differences = _config_differences(runs)
    if differences:
        lines += ["", "Adapter settings that differ: " + "; ".join(differences) + "."]
    routing_lines, routing_record = _routing_section(runs, routing, data_note, out)
    lines += ["", *routing_lines, "", *_similarity_section(similar, skipped, layers, out)]
    record = {
        "runs": [{"label": run.label, "path": str(run.path), "method": run.method} for run in runs],
        "routing": routing_record,
        "similarity": dict(similar),
    }
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(record, indent=1) + "\n")
    return markdown


def _evaluation_files(run: Run, data: Mapping[str, str] | None) -> tuple[dict[str, str], str]:
    """The test files to route (--data, else the first run's evaluation.test_files, else the bundled sample);
    a second run routes the same items, so the two are compared on equal terms."""
    from .config import BUNDLED, resolve_test_files

    if data:
        return dict(data), "Evaluation data: --data files."
    if run.run_config is not None and run.run_config.evaluation.test_files:
        files = resolve_test_files(run.run_config.evaluation.test_files)
        return files, f"Evaluation data: the test files of {run.label}."
    return resolve_test_files(BUNDLED), "Evaluation data: the bundled test sample."


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names; when they collide (`d2mora/seed42` vs `d2mora_no_ortho/seed42`), parent/name; failing
    that, run1 (name), run2 (name)."""
    names = [path.resolve().name for path in paths]
    if len(set(names)) == len(names):
        return names
    longer = [f"{path.resolve().parent.name}/{path.resolve().name}" for path in paths]
    if len(set(longer)) == len(longer):
        return longer
    return [f"run{i + 1} ({name})" for i, name in enumerate(names)]


def report(
    paths: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    data: Mapping[str, str] | None = None,
    limit: int | None = 50,
    routing: bool = True,
    model: str | None = None,
    dtype: str | None = None,
    layers: Sequence[int] | None = None,
) -> Path:
    """The report of one run, or two side by side, in `out` (default RUN_DIR/report); returns report.md's path.

    Routing needs the base model: `model`, else the run's `model`, else the adapter's base_model_name_or_path;
    loaded in `dtype` (default: the run's model_dtype, else fp32) on the GPU when there is one.
    """
    from peft import PeftModel

    from .models import load_model_and_tokenizer, parse_dtype
    from .pipeline import check_writable_folder

    if not 1 <= len(paths) <= 2:
        raise ValueError(f"report takes one or two run folders, got {len(paths)}")
    paths = [Path(path) for path in paths]
    runs = [open_run(path, label) for path, label in zip(paths, _unique_labels(paths), strict=True)]
    check_writable_folder(out or runs[0].path / REPORT_DIR, "--out")  # before the base models load
    files, note = _evaluation_files(runs[0], data)
    stats: list[RoutingStats | None] = []
    for run in runs:
        if not routing:
            stats.append(None)
            continue
        base = model or (run.run_config.model if run.run_config else run.adapter_config.get("base_model_name_or_path"))
        if not base:
            raise ValueError(f"{run.path}: no base model recorded; pass --model")
        weights = parse_dtype(dtype or (run.run_config.model_dtype if run.run_config else "fp32"), "--dtype")
        base_model, tokenizer = load_model_and_tokenizer(base, dtype=weights)
        peft_model = PeftModel.from_pretrained(base_model, str(run.path))
        if torch.cuda.is_available():
            peft_model.to("cuda")
        stats.append(collect_routing(peft_model, tokenizer, files, limit) if _tuner(peft_model) else {})
        del peft_model, base_model
    if routing:
        counts = {task: len(load_records(path, get_task(task).name)[:limit]) for task, path in files.items()}
        note += " Items per task: " + ", ".join(f"{_task_name(t)} {n}" for t, n in counts.items()) + "."
    return build_report(
        runs, Path(out) if out else runs[0].path / REPORT_DIR, routing=stats, data_note=note, layers=layers
    )
