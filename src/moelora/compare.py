"""Comparison of evaluated runs (`moelora compare`): one Markdown table and a bar chart.

Reads the result files runs write: `eval_<label>/results_<protocol>.json` in a training run folder (beside its
`moelora_run.yaml`), or `results_<protocol>.json` in a `moelora eval --output-dir` folder.

- One row per method, configuration and protocol. Training runs whose configurations differ only in the seed
  (and in settings that cannot change a result, `IGNORED_SETTINGS`) are seeds of one row: each cell is the
  mean over them ± the sample standard deviation, and the seeds are listed. Rows of one method that differ
  in other settings are told apart by those settings in their names.
- Base-model results (label `base`) depend only on the model and the evaluation settings, so every run's
  base results for the same model and settings form one row, identical repeats counted once.
- A `moelora eval` folder has no run config: it is a row of its own, named after the folder.
- The protocol is part of a row's identity and the chart draws one panel per protocol, so numbers of two
  protocols never share a row or a panel. Within a protocol, every row must cover the same tasks with the same
  numbers of items, or the accuracies would not be comparable (`allow_different_items` lifts this).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import load_config
from .tasks import TASKS

#: Flattened run-config keys that never change an evaluation result, left out when grouping runs.
IGNORED_SETTINGS = frozenset(
    {
        "training.seed",
        "training.output_dir",
        "training.report_to",
        "training.logging_steps",
        "training.dataloader_num_workers",
        "training.keep_checkpoints",
        "evaluation.batch_size",
        "evaluation.protocols",
        "evaluation.evaluate_base_model",
    }
)
#: What a base-model result depends on.
_BASE_SETTINGS = ("model", "model_dtype", "evaluation.")
COMPARISON_NAME = "comparison"


@dataclass
class Result:
    """One results_<protocol>.json of one run."""

    run: Path
    file: Path
    label: str
    protocol: str
    accuracy: dict[str, float]
    counts: dict[str, int]
    trainable: int | None
    model: str | None
    seed: int | None
    #: The run's flattened config (None for a `moelora eval` folder).
    settings: dict[str, Any] | None
    #: Per task, the gold answers and the predictions, from the predictions files beside the results (None when
    #: those files are missing): they give the majority-label baseline and how concentrated the predictions are.
    answers: dict[str, list[str]] | None = None
    predictions: dict[str, list[str]] | None = None
    #: Per task, each item's index in its test file, in the order of `answers` and `predictions`.
    indices: dict[str, list[int]] | None = None

    def correct_by_item(self) -> dict[tuple[str, int], bool] | None:
        """(task, index in the test file) -> whether the prediction was right; None without prediction files."""
        if self.answers is None or self.predictions is None or self.indices is None:
            return None
        return {
            (task, index): prediction == answer
            for task in self.answers
            for index, answer, prediction in zip(
                self.indices[task], self.answers[task], self.predictions[task], strict=True
            )
        }

    @property
    def top_share(self) -> float | None:
        """Mean over tasks of the share (%) of the row's most frequent prediction: near 100 means the model
        answers (almost) every item with one label, so its accuracy is that label's frequency."""
        if not self.predictions:
            return None
        shares = [100.0 * Counter(p).most_common(1)[0][1] / len(p) for p in self.predictions.values() if p]
        return sum(shares) / len(shares) if shares else None

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


@dataclass
class Row:
    """Results that differ only in the seed: one table row."""

    label: str
    protocol: str
    results: list[Result] = field(default_factory=list)
    name: str = ""

    @property
    def tasks(self) -> list[str]:
        return list(self.results[0].accuracy)

    def values(self, task: str) -> list[float]:
        return [result.accuracy[task] for result in self.results]

    def averages(self) -> list[float]:
        return [result.average for result in self.results]


def _cell(values: Sequence[float]) -> str:
    """Mean, and ± the sample standard deviation when there are several runs."""
    mean = sum(values) / len(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'adapter': {'r': 8}} -> {'adapter.r': 8}, so settings can be compared and named key by key."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_result(run: Path, file: Path, settings: dict[str, Any] | None, seed: int | None) -> Result:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: invalid JSON: {error}") from None
    if not isinstance(data, dict) or not {"protocol", "accuracy", "counts"} <= data.keys():
        raise ValueError(f"{file}: not a moelora results file (needs protocol, accuracy and counts)")
    protocol, accuracy, counts = data["protocol"], data["accuracy"], data["counts"]
    if file.stem != f"results_{protocol}":
        raise ValueError(
            f"{file}: names protocol {protocol!r} inside but {file.stem.removeprefix('results_')!r} in its name"
        )
    if not isinstance(accuracy, dict) or not accuracy or set(accuracy) != set(counts):
        raise ValueError(f"{file}: accuracy and counts must name the same, non-empty set of tasks")
    bad = [task for task, value in accuracy.items() if not isinstance(value, (int, float)) or math.isnan(value)]
    if bad:
        raise ValueError(f"{file}: no accuracy for task(s) {bad}")
    trainable = data.get("trainable_parameters")
    answers, predictions, indices = _read_predictions(file.parent, protocol, list(accuracy))
    return Result(
        run=run,
        file=file,
        label=str(data.get("label") or data.get("method") or "?"),
        protocol=protocol,
        accuracy={task: float(value) for task, value in accuracy.items()},
        counts={task: int(count) for task, count in counts.items()},
        trainable=trainable if isinstance(trainable, int) else None,
        model=data.get("model"),
        seed=seed,
        settings=settings,
        answers=answers,
        predictions=predictions,
        indices=indices,
    )


def _read_predictions(folder: Path, protocol: str, tasks: list[str]) -> tuple[dict | None, dict | None, dict | None]:
    """Gold answers, predictions and item indices per task from `predictions_<protocol>_<task>.jsonl`;
    (None, None, None) unless every task has its file."""
    answers, predictions, indices = {}, {}, {}
    for task in tasks:
        path = folder / f"predictions_{protocol}_{task}.jsonl"
        if not path.is_file():
            return None, None, None
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON line: {error}") from None
        answers[task] = [str(row.get("answer", "")) for row in rows]
        predictions[task] = [str(row.get("prediction")) for row in rows]
        indices[task] = [int(row.get("index", position)) for position, row in enumerate(rows)]
    return answers, predictions, indices


def majority_label_accuracy(answers: dict[str, list[str]]) -> dict[str, float]:
    """Per task, the accuracy of always answering the task's most frequent gold label on these items."""
    return {task: 100.0 * Counter(gold).most_common(1)[0][1] / len(gold) for task, gold in answers.items() if gold}


def _simple(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_simple(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _effective_adapter(config) -> dict[str, Any]:
    """The adapter settings the run trained with, defaults filled in: a row is then named by what differs
    (`orthogonal_loss_weight=0.0001` against `=0.0`), not by what one config happened to spell out. Only plain
    values count (sets sorted); an adapter config that no longer builds keeps the fields as written."""
    from .training import build_adapter_config

    try:
        adapter = build_adapter_config(config.method, dict(config.adapter))
    except ValueError:
        return dict(config.adapter)
    effective = {}
    for item in dataclasses.fields(adapter):
        value = getattr(adapter, item.name)
        value = sorted(value) if isinstance(value, (set, frozenset)) else value
        if _simple(value):
            effective[item.name] = value
    return effective


def load_results(run: str | Path) -> list[Result]:
    """Every result file of a run folder (training run or `moelora eval --output-dir` folder)."""
    from .training import RUN_CONFIG_NAME

    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder")
    settings = seed = None
    if (run / RUN_CONFIG_NAME).is_file():
        config = load_config(run / RUN_CONFIG_NAME)
        settings, seed = _flatten({**config.to_dict(), "adapter": _effective_adapter(config)}), config.training.seed
    files = sorted(run.glob("eval_*/results_*.json")) + sorted(run.glob("results_*.json"))
    if not files:
        raise ValueError(
            f"{run} holds no results_<protocol>.json (train with evaluation.test_files set, or run "
            "`moelora eval --output-dir`)"
        )
    return [_read_result(run, file, settings, seed) for file in files]


def _relevant_settings(result: Result) -> dict[str, Any] | None:
    """The settings a result depends on: the run config minus IGNORED_SETTINGS; for a base-model result only
    the model and the evaluation settings."""
    if result.settings is None:
        return None
    return {
        key: value
        for key, value in result.settings.items()
        if key not in IGNORED_SETTINGS and (result.label != "base" or key.startswith(_BASE_SETTINGS))
    }


def _group_key(result: Result) -> tuple:
    settings = _relevant_settings(result)
    if settings is None:
        # Without a run config nothing says two folders hold seeds of one setup; a base model is a base model.
        if result.label == "base":
            return result.label, result.protocol, "model", result.model, json.dumps(result.counts, sort_keys=True)
        return result.label, result.protocol, "folder", str(result.run.resolve())
    return result.label, result.protocol, "settings", json.dumps(settings, sort_keys=True, default=str)


def _name_rows(rows: list[Row]) -> None:
    """A row's name: its label, plus what tells it from the other rows of the same label and protocol: the
    settings that differ between them, or the folder of a run without a config."""
    siblings: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        siblings.setdefault((row.label, row.protocol), []).append(row)
    for same in siblings.values():
        configured = [s for s in (_relevant_settings(row.results[0]) for row in same) if s is not None]
        differing = sorted(
            key
            for key in set().union(*configured)
            if len({json.dumps(c.get(key), default=str) for c in configured}) > 1
        )
        for row in same:
            settings = _relevant_settings(row.results[0])
            if len(same) == 1:
                row.name = row.label
            elif settings is not None and differing:
                row.name = f"{row.label} ({', '.join(f'{key}={settings.get(key)}' for key in differing)})"
            else:
                row.name = f"{row.label} ({row.results[0].run.name})"


def group_rows(results: Sequence[Result], allow_different_items: bool = False) -> list[Row]:
    """Rows in order of first appearance, base rows first within each protocol; checks comparability."""
    seen: set[Path] = set()
    for result in results:
        if result.file.resolve() in seen:
            raise ValueError(f"{result.run} is given twice (its {result.file.name} would count twice)")
        seen.add(result.file.resolve())
    groups: dict[tuple, Row] = {}
    for result in results:
        row = groups.setdefault(_group_key(result), Row(result.label, result.protocol))
        # Every run of a comparison carries the same base-model evaluation; count it once (a differing
        # repeat stays, and shows as a standard deviation).
        repeat = any(r.accuracy == result.accuracy and r.counts == result.counts for r in row.results)
        if not (result.label == "base" and repeat):
            row.results.append(result)
    rows = list(groups.values())
    for row in rows:
        first = row.results[0]
        for other in row.results[1:]:
            if other.counts != first.counts:
                raise ValueError(
                    f"{row.label} ({row.protocol}): seed runs {first.run} and {other.run} were evaluated on different "
                    f"items ({first.counts} vs {other.counts}); they cannot be averaged"
                )
    if not allow_different_items:
        by_protocol: dict[str, Row] = {}
        for row in rows:
            reference = by_protocol.setdefault(row.protocol, row)
            if row.results[0].counts != reference.results[0].counts:
                raise ValueError(
                    f"protocol {row.protocol!r}: {reference.results[0].run} and {row.results[0].run} were evaluated on "
                    f"different tasks or numbers of items ({reference.results[0].counts} vs {row.results[0].counts}); "
                    "their accuracies are not comparable (--allow-different-items shows them anyway)"
                )
    _name_rows(rows)
    protocols = list(dict.fromkeys(row.protocol for row in rows))
    return sorted(rows, key=lambda row: (protocols.index(row.protocol), row.label != "base"))


def _display(task: str) -> str:
    return TASKS[task].display if task in TASKS else task


def _seeds(row: Row) -> str:
    seeds = [result.seed for result in row.results]
    if row.label == "base" or all(seed is None for seed in seeds):
        return "-"
    return ", ".join("?" if seed is None else str(seed) for seed in seeds)


def _top_share(row: Row) -> str:
    shares = [result.top_share for result in row.results]
    return "-" if any(share is None for share in shares) else f"{sum(shares) / len(shares):.0f}"


def _trainable(row: Row) -> str:
    counts = sorted({result.trainable for result in row.results if result.trainable is not None})
    return " / ".join(f"{count:,}" for count in counts) or "-"


def comparison_markdown(rows: Sequence[Row]) -> str:
    """The table: methods x tasks, Avg, trainable parameters, protocol, seeds, runs, items."""
    tasks = [task for task in TASKS if any(task in row.tasks for row in rows)]
    tasks += sorted({task for row in rows for task in row.tasks} - set(tasks))
    models = {result.model for row in rows for result in row.results}
    header = [
        "method",
        *(["model"] if len(models) > 1 else []),
        "protocol",
        "trainable params",
        "seeds",
        *(_display(task) for task in tasks),
        "Avg",
        "items",
        "top pred. %",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.name,
            *([str(row.results[0].model)] if len(models) > 1 else []),
            row.protocol,
            _trainable(row),
            _seeds(row),
            *(_cell(row.values(task)) if task in row.tasks else "-" for task in tasks),
            f"**{_cell(row.averages())}**",
            str(sum(row.results[0].counts.values())),
            _top_share(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "Accuracy in %; a row with several seeds shows mean ± sample standard deviation over them. Avg is the "
        "unweighted mean over the row's tasks, per run, then over the seeds."
    ]
    if len(models) == 1:
        notes.append(f"Model: {next(iter(models))}.")
    notes.append(
        "top pred. %: the share of a row's most frequent prediction, averaged over tasks (mean over seeds); near "
        "100 the row answers every item of a task with one label and its accuracy is that label's frequency."
    )
    notes += _item_notes(rows)
    return "\n".join(lines) + "\n\n" + " ".join(notes)


def _item_notes(rows: Sequence[Row]) -> list[str]:
    """Per protocol, the items per task and the majority-label baseline on them; one sentence when every protocol
    ran on the same items (rows are only comparable within a protocol, so only there must the items agree)."""
    by_protocol: dict[str, list[Row]] = {}
    for row in rows:
        by_protocol.setdefault(row.protocol, []).append(row)
    described: dict[str, str] = {}
    differing = []
    for protocol, members in by_protocol.items():
        results = [result for row in members for result in row.results]
        if len({json.dumps(result.counts, sort_keys=True) for result in results}) > 1:
            differing.append(protocol)
            continue
        text = "Items per task: " + ", ".join(f"{_display(t)} {n}" for t, n in results[0].counts.items()) + "."
        answers = next((result.answers for result in results if result.answers), None)
        if answers:
            majority = majority_label_accuracy(answers)
            text += (
                " Always answering each task's most frequent gold label would score "
                + ", ".join(f"{_display(task)} {value:.1f}" for task, value in majority.items())
                + f", Avg {sum(majority.values()) / len(majority):.1f}."
            )
        described[protocol] = text
    if len(set(described.values())) == 1 and not differing:
        notes = [next(iter(described.values()))]
    else:
        notes = [f"{protocol}: {text}" for protocol, text in described.items()]
    if differing:
        notes.append(
            f"Rows of {', '.join(differing)} were evaluated on different tasks or items: their accuracies are not "
            "comparable."
        )
    return notes


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar test: the probability, if both were equally good, of a split of the discordant
    items at least this uneven (a binomial test of `only_first` of `only_first + only_second` at 1/2)."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def significance_markdown(rows: Sequence[Row]) -> str:
    """Per protocol, every run against the protocol's first row (the base model where there is one), paired item
    by item over all tasks: the items only one of the two gets right, and McNemar's exact p-value; then the
    95 % binomial half-width of a single cell. Empty when the prediction files are missing."""
    lines = []
    widths = []
    for protocol in dict.fromkeys(row.protocol for row in rows):
        members = [row for row in rows if row.protocol == protocol]
        reference = members[0]
        reference_items = reference.results[0].correct_by_item()
        if reference_items is None:
            continue
        for row in members[1:]:
            for result in row.results:
                items = result.correct_by_item()
                if items is None or items.keys() != reference_items.keys():
                    continue
                only_row = sum(items[k] and not reference_items[k] for k in items)
                only_reference = sum(reference_items[k] and not items[k] for k in items)
                difference = 100.0 * (only_row - only_reference) / len(items)
                seed = f" (seed {result.seed})" if result.seed is not None and row.label != "base" else ""
                lines.append(
                    f"| {protocol} | {row.name}{seed} | {reference.name} | {len(items)} | {only_row} | "
                    f"{only_reference} | {difference:+.1f} | {mcnemar_p(only_row, only_reference):.2g} |"
                )
        counts = reference.results[0].counts
        widths.append(", ".join(f"{_display(t)} ±{196 * math.sqrt(0.25 / n):.1f}" for t, n in counts.items()))
    if not lines:
        return ""
    header = [
        "| protocol | run | against | items | only run right | only reference right | difference (points, "
        "pooled items) | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    note = (
        "Paired item by item over all tasks' items (pooled, so larger tasks weigh more than in Avg). A p-value "
        "below 0.05 says the two differ on these items beyond what chance splits of the discordant items give. "
        "A single cell's 95 % binomial interval is at most (at 50 % accuracy) "
        + "; ".join(dict.fromkeys(widths))
        + " points."
    )
    return "\n".join([*header, *lines]) + "\n\n" + note


def plot_comparison(rows: Sequence[Row], path: Path) -> Path:
    """Grouped bars (tasks and Avg on the x axis, one bar per row, error bars = std over seeds); one panel
    per protocol."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    protocols = list(dict.fromkeys(row.protocol for row in rows))
    tasks = [task for task in TASKS if any(task in row.tasks for row in rows)]
    tasks += sorted({task for row in rows for task in row.tasks} - set(tasks))
    groups = [*(_display(task) for task in tasks), "Avg"]
    figure = Figure(figsize=(max(6.0, 0.9 * len(groups) + 3) + 3, 3.4 * len(protocols)), layout="constrained")
    axes = figure.subplots(len(protocols), 1, squeeze=False)[:, 0]
    colors = colormaps["turbo"]
    for ax, protocol in zip(axes, protocols, strict=True):
        panel = [row for row in rows if row.protocol == protocol]
        width = 0.8 / len(panel)
        for index, row in enumerate(panel):
            samples = [row.values(task) if task in row.tasks else [math.nan] for task in tasks] + [row.averages()]
            means = [sum(s) / len(s) for s in samples]
            errors = [statistics.stdev(s) if len(s) > 1 else math.nan for s in samples]  # no bar for one run
            xs = [g + (index - (len(panel) - 1) / 2) * width for g in range(len(groups))]
            # beyond 10 rows matplotlib's default colour cycle repeats: spread the rows over a colormap instead
            color = colors(index / max(1, len(panel) - 1)) if len(panel) > 10 else None
            ax.bar(xs, means, width, yerr=errors, capsize=2, label=row.name, color=color)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"protocol: {protocol}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: long row names fit
    figure.savefig(path, dpi=110)
    return path


def compare(
    runs: Sequence[str | Path],
    *,
    out: str | Path = COMPARISON_NAME,
    protocols: Sequence[str] | None = None,
    allow_different_items: bool = False,
) -> str:
    """Write `comparison.md` and `comparison.png` into `out`; returns the Markdown."""
    if not runs:
        raise ValueError("compare needs at least one run folder")
    results = [result for run in runs for result in load_results(run)]
    if protocols:
        missing = sorted(set(protocols) - {result.protocol for result in results})
        if missing:
            raise ValueError(f"no results for protocol(s) {missing}; found {sorted({r.protocol for r in results})}")
        results = [result for result in results if result.protocol in protocols]
    rows = group_rows(results, allow_different_items)
    markdown = comparison_markdown(rows)
    significance = significance_markdown(rows)
    if significance:
        markdown += "\n\n" + significance
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = plot_comparison(rows, out / f"{COMPARISON_NAME}.png")
    sources = "\n".join(f"- `{result.file}`" for row in rows for result in row.results)
    (out / f"{COMPARISON_NAME}.md").write_text(
        f"{markdown}\n\n![comparison]({figure.name})\n\nResults read:\n\n{sources}\n"
    )
    return markdown
