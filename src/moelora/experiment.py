"""`moelora experiment FILE`: train and evaluate a set of runs described in one YAML file, then compare them.

The file (see `configs/experiments/commonsense-small.yaml`):

    output_dir: runs/experiments/NAME     # every run, log and comparison goes under it
    jobs: 2                               # runs trained side by side (each gets cpu_count / jobs threads)
    base: {...}                           # a `moelora train` config shared by every run
    groups:                               # runs evaluated on the same items form a group (one comparison)
      GROUP:
        settings: {...}                   # merged over `base` for this group (optional)
        runs:
          RUN: {method: ..., adapter: {...}, seeds: [42, 43]}   # merged over the group's config
    reports:                              # optional: `moelora report` of runs side by side
      - [GROUP/RUN/seed42, GROUP/RUN2/seed42]

Mappings merge key by key (a run's `adapter: {r: 40}` keeps the base's target modules), except
`evaluation.test_files`, which a group replaces whole (a single-task group tests one task); lists and scalars
replace. Run `RUN` with seed `S` lives in `output_dir/GROUP/RUN/seedS`. Every run config is built and checked
before anything trains, so a typo fails in seconds, naming the group and run.

Re-running the same file continues where it stopped: a finished run is skipped, an interrupted one resumes
from its last checkpoint, a trained but unevaluated one is only evaluated. A run folder whose saved config
differs from the file is an error (change `output_dir` or delete the folder), never silently reused.
Each run is a `python -m moelora.experiment` subprocess, so a crash or an out-of-memory in one run leaves the
others and their folders intact; its output goes to `output_dir/logs/GROUP.RUN.seedS.log`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, apply_overrides, config_from_dict, load_config

_TOP_KEYS = {"output_dir", "jobs", "base", "groups", "reports"}
_RUN_KEYS = {"seeds"}


@dataclasses.dataclass
class PlannedRun:
    """One (group, run, seed): its config and where it lives."""

    group: str
    name: str
    seed: int
    config: RunConfig

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}/seed{self.seed}"

    @property
    def folder(self) -> Path:
        return Path(self.config.training.output_dir)


@dataclasses.dataclass
class Experiment:
    path: Path
    output_dir: Path
    jobs: int
    runs: list[PlannedRun]
    reports: list[list[str]]


#: Mappings that are data, not settings: a group's test files replace the base's instead of adding to them.
_REPLACED_MAPPINGS = {"evaluation.test_files"}


def merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`update` over `base`: mappings merge key by key, except `_REPLACED_MAPPINGS`; everything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and f"{prefix}{key}" not in _REPLACED_MAPPINGS:
            merged[key] = merge(merged[key], value, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def load_experiment(
    path: str | Path, overrides: list[str] | None = None, output_dir: str | Path | None = None
) -> Experiment:
    """Parse and check the experiment file; builds (and validates) every run config.

    `overrides` (`section.key=value`, as for `moelora train`) apply to every run after its own settings, and
    `output_dir` replaces the file's: a smoke test of an experiment file with tiny settings, or a copy elsewhere.
    """
    from .pipeline import input_problems

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"experiment file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {error}") from None
    spec = _mapping(spec, str(path))
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    if not spec.get("output_dir") and output_dir is None:
        raise ValueError(f"{path}: output_dir is required")
    output_dir = Path(output_dir if output_dir is not None else spec["output_dir"])
    jobs = spec.get("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"{path}: jobs must be a positive integer, got {jobs!r}")
    base = _mapping(spec.get("base"), f"{path}: base")
    groups = _mapping(spec.get("groups"), f"{path}: groups")
    if not groups:
        raise ValueError(f"{path}: groups must name at least one group of runs")
    runs: list[PlannedRun] = []
    problems: dict[str, list[str]] = {}  # problem -> the runs that have it, reported before anything starts
    for group, group_spec in groups.items():
        where = f"{path}: groups.{group}"
        group_spec = _mapping(group_spec, where)
        unknown = sorted(set(group_spec) - {"settings", "runs"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: ['runs', 'settings']")
        group_base = merge(base, _mapping(group_spec.get("settings"), f"{where}.settings"))
        members = _mapping(group_spec.get("runs"), f"{where}.runs")
        if not members:
            raise ValueError(f"{where}: no runs")
        for name, run_spec in members.items():
            run_where = f"{where}.runs.{name}"
            run_spec = dict(_mapping(run_spec, run_where))
            default_seed = group_base.get("training", {}).get("seed", 42)
            seeds = run_spec.pop("seeds", [default_seed])
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
                raise ValueError(f"{run_where}.seeds must be a non-empty list of integers, got {seeds!r}")
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"{run_where}.seeds repeats a seed: {seeds}")
            for seed in seeds:
                values = merge(group_base, run_spec)
                folder = output_dir / str(group) / str(name) / f"seed{seed}"
                values = apply_overrides(values, overrides or [])
                values = merge(values, {"training": {"seed": seed, "output_dir": str(folder)}})
                config = config_from_dict(values, f"{run_where} (seed {seed})")
                for problem in input_problems(config):
                    problems.setdefault(problem, []).append(f"{group}/{name}/seed{seed}")
                runs.append(PlannedRun(str(group), str(name), seed, config))
    if problems:
        lines = [
            f"{problem} ({'every run' if len(where) == len(runs) else ', '.join(where)})"
            for problem, where in problems.items()
        ]
        raise ValueError(f"{path}: {len(lines)} problem(s), nothing was started:\n  " + "\n  ".join(lines))
    # The base model is the same in every run of a group: evaluate it once, with the group's first run.
    first_of_group: set[str] = set()
    for run in runs:
        run.config.evaluation.evaluate_base_model = run.group not in first_of_group
        first_of_group.add(run.group)
    keys = {run.key for run in runs}
    reports = spec.get("reports") or []
    if not isinstance(reports, list):
        raise ValueError(f"{path}: reports must be a list of run lists")
    for index, members in enumerate(reports):
        if not isinstance(members, list) or not 1 <= len(members) <= 2 or set(members) - keys:
            raise ValueError(
                f"{path}: reports[{index}] must list one or two runs of this file as GROUP/RUN/seedS, got {members!r}"
            )
    return Experiment(path, output_dir, jobs, runs, reports)


def _expected_results(run: PlannedRun) -> list[Path]:
    evaluation = run.config.evaluation
    if not evaluation.test_files:
        return []
    labels = [run.config.method, *(["base"] if evaluation.evaluate_base_model else [])]
    return [run.folder / f"eval_{label}" / f"results_{p}.json" for label in labels for p in evaluation.protocols]


def _comparable(config: RunConfig) -> dict[str, Any]:
    values = config.to_dict()
    values["evaluation"].pop("evaluate_base_model")  # decided by the run's position, not by what it computes
    return values


def run_state(run: PlannedRun) -> str:
    """'done', 'evaluate' (trained), 'resume' (has a checkpoint), 'new' or 'restart' (interrupted before its
    first checkpoint); raises when the folder holds something else."""
    from .checkpoints import last_complete_checkpoint
    from .training import RUN_CONFIG_NAME

    folder = run.folder
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    saved = folder / RUN_CONFIG_NAME
    if not saved.is_file():
        raise ValueError(f"{run.key}: {folder} exists but is not a moelora run folder; move it away")
    if _comparable(load_config(saved)) != _comparable(run.config):
        raise ValueError(
            f"{run.key}: {folder} holds a run with a different config than the experiment file now gives; "
            "delete that folder or choose another output_dir"
        )
    if (folder / "train_metrics.json").is_file():
        return "done" if all(path.is_file() for path in _expected_results(run)) else "evaluate"
    return "resume" if last_complete_checkpoint(folder) else "restart"


def run_one(config_path: str | Path) -> int:
    """One run, in this process: train (new, resumed or restarted) and evaluate, or only evaluate."""
    from .pipeline import evaluate_trained_run, train_and_evaluate

    config = load_config(config_path)
    state = run_state(PlannedRun("", "", config.training.seed, config))
    if state == "done":
        return 0
    if state == "evaluate":
        outcome = evaluate_trained_run(config)
    else:
        outcome = train_and_evaluate(config, resume=state == "resume", overwrite=state == "restart")
    if outcome is not None:
        print(outcome.summary())
    return 0


def _launch(config_path: Path, log_path: Path, threads: int) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "moelora.experiment", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )


def run_experiment(
    path: str | Path,
    *,
    jobs: int | None = None,
    only: list[str] | None = None,
    compare_only: bool = False,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
) -> Path:
    """Run what is not done yet (`jobs` side by side), then write the comparisons and `experiment.md`."""
    experiment = load_experiment(path, overrides, output_dir)
    selected = [r for r in experiment.runs if not only or any(fnmatch.fnmatch(r.key, p) for p in only)]
    if only and not selected:
        raise ValueError(f"--only {only} matches no run; runs: {[r.key for r in experiment.runs]}")
    states = {run.key: run_state(run) for run in experiment.runs}  # checks every folder before any work
    jobs = jobs or experiment.jobs
    threads = max(1, (os.cpu_count() or 1) // jobs)
    logs = experiment.output_dir / "logs"
    configs = experiment.output_dir / "configs"
    pending = [] if compare_only else [run for run in selected if states[run.key] != "done"]
    if pending:
        logs.mkdir(parents=True, exist_ok=True)
        configs.mkdir(parents=True, exist_ok=True)
    print(f"{len(experiment.runs)} runs, {len(pending)} to do, {jobs} at a time with {threads} thread(s) each")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []
    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            run = queue.pop(0)
            stem = run.key.replace("/", ".")
            config_path = configs / f"{stem}.yaml"
            config_path.write_text(yaml.safe_dump(run.config.to_dict(), sort_keys=False))
            print(f"start {run.key} ({states[run.key]}); log: {logs / stem}.log", flush=True)
            running[run.key] = (_launch(config_path, logs / f"{stem}.log", threads), time.perf_counter())
        time.sleep(1.0)
        for key, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            minutes = (time.perf_counter() - started) / 60
            if process.returncode:
                failed.append(key)
                print(f"FAILED {key} (exit {process.returncode}) after {minutes:.1f} min; see its log", flush=True)
            else:
                print(f"done {key} in {minutes:.1f} min", flush=True)
    summary = write_summary(experiment)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {failed}; the others are kept, re-run to retry")
    return summary


def write_summary(experiment: Experiment) -> Path:
    """Per group `GROUP/comparison.{md,png}`, the reports, and `experiment.md` with the run table."""
    from .compare import compare
    from .report import report

    out = experiment.output_dir
    out.mkdir(parents=True, exist_ok=True)
    done = {run.key for run in experiment.runs if run_state(run) == "done"}
    lines = [f"# Experiment `{experiment.path}`", ""]
    for group in dict.fromkeys(run.group for run in experiment.runs):
        members = [run for run in experiment.runs if run.group == group]
        finished = [run for run in members if run.key in done]
        lines += [f"## {group}", ""]
        if not finished:
            lines += ["No finished runs yet.", ""]
            continue
        folders = [run.folder for run in finished]
        lines += [compare(folders, out=out / group), "", f"![comparison]({group}/comparison.png)", ""]
        lines += ["| run | seed | method | trainable params | steps | tokens seen | train time (s) | tokens/s |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for run in finished:
            metrics = json.loads((run.folder / "train_metrics.json").read_text())
            steps = metrics.get("global_step", run.config.training.max_steps)
            cells = [run.name, run.seed, run.config.method, f"{metrics['trainable_parameters']:,}", steps]
            cells += [f"{metrics['tokens_seen']:,}", f"{metrics['train_runtime']:.0f}"]
            cells += [f"{metrics['train_tokens_per_second']:.0f}"]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        missing = [run.key for run in members if run.key not in done]
        lines += ["", *([f"Not finished: {', '.join(missing)}.", ""] if missing else [])]
    by_key = {run.key: run for run in experiment.runs}
    for members in experiment.reports:
        runs = [by_key[key] for key in members]
        if all(run.key in done for run in runs):
            target = out / "reports" / "__".join(key.replace("/", ".") for key in members)
            markdown = report([run.folder for run in runs], out=target)
            lines += [f"Report of {' vs '.join(members)}: [{markdown.relative_to(out)}]({markdown.relative_to(out)})"]
    summary = out / "experiment.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="experiment YAML (see configs/experiments/)")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value overrides applied to every run, e.g. training.max_steps=2"
    )
    parser.add_argument("--output-dir", default=None, help="write the experiment here instead of the file's output_dir")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side (default: the file's `jobs`)")
    parser.add_argument(
        "--only", action="append", default=None, metavar="PATTERN",
        help="only runs whose GROUP/RUN/seedS matches this glob (repeatable), e.g. 'multi-task/d2mora*'",
    )  # fmt: skip
    parser.add_argument(
        "--compare-only", action="store_true", help="train nothing; rewrite the comparisons of finished runs"
    )


if __name__ == "__main__":  # one run, launched by run_experiment; its errors are one line in its log
    from .pipeline import report_errors

    sys.exit(report_errors(lambda: run_one(sys.argv[1])))
