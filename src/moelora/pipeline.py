"""One run from start to end: check every input, train, evaluate, write the table.

`moelora train`, `moelora quickstart` and each run of `moelora experiment` go through here; the command line
only parses arguments and prints. The order is what makes a long run safe to start: every setting and input
file is checked in one pass before a model loads, so a typo costs a second, not the hours of a training run.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, field_type_problems, problems_error, resolve_test_files, resolve_train_files
from .data import TrainSource, check_test_file, check_train_file, missing_source, parse_sources
from .models import QUANTIZATIONS, parse_dtype
from .tasks import TASKS
from .training import build_adapter_config


def input_problems(config: RunConfig) -> list[str]:
    """Everything wrong with a run's settings and input files that can be found without loading the model: adapter
    fields, dtypes, training and test files that do not exist or hold a bad record, an output folder that cannot be
    written, sizes that cannot work. One pass lists every problem (one per file: its first bad record), so a run
    that would fail after minutes of loading and hours of training fails in a second or two instead."""
    problems = []
    try:
        adapter_config = build_adapter_config(config.method, config.adapter)
    except ValueError as error:
        problems.append(str(error))
    else:
        problems += field_type_problems(type(adapter_config), config.adapter, "adapter")
    try:
        parse_dtype(config.model_dtype)
    except ValueError as error:
        problems.append(str(error))
    if config.model_quantization not in (None, *QUANTIZATIONS):
        problems.append(
            f"model_quantization: expected one of {', '.join(QUANTIZATIONS)} or none, got {config.model_quantization!r}"
        )
    try:
        sources = parse_sources(resolve_train_files(config.data.train_files))
    except ValueError as error:
        problems.append(f"data.train_files: {error}")
        sources = []
    problems += _train_file_problems(config, sources)
    if not config.data.train_files:
        problems.append("data.train_files: no training files given")
    try:
        test_files = resolve_test_files(config.evaluation.test_files)
    except ValueError as error:
        problems.append(str(error))
        test_files = {}
    for task, path in test_files.items():
        if task not in TASKS:
            problems.append(f"evaluation.test_files: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        elif not Path(path).is_file():
            problems.append(f"evaluation.test_files.{task}: {path}: file not found")
        else:
            try:
                _checked_test_file(*_file_key(path), task, tuple(config.evaluation.protocols))
            except (ValueError, OSError) as error:
                problems.append(f"evaluation.test_files.{task}: {_file_error(path, error)}")
    output_problem = folder_problem(config.training.output_dir, "training.output_dir")
    if output_problem:
        problems.append(output_problem)
    t, e = config.training, config.evaluation
    for where, value in (
        ("data.cutoff_len", config.data.cutoff_len),
        ("training.global_batch_size", t.global_batch_size),
        ("training.micro_batch_size", t.micro_batch_size),
        ("evaluation.batch_size", e.batch_size),
        ("evaluation.num_beams", e.num_beams),
        ("evaluation.max_new_tokens", e.max_new_tokens),
        ("evaluation.max_items", e.max_items),
        ("evaluation.generate_max_items", e.generate_max_items),
    ):
        if value is not None and value < 1:
            problems.append(f"{where}: must be at least 1, got {value}")
    if t.global_batch_size >= 1 and t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"training.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size={t.micro_batch_size}"
        )
    if t.max_steps == 0 or (t.max_steps < 0 and t.num_epochs <= 0):
        problems.append(f"training: nothing to train (max_steps={t.max_steps}, num_epochs={t.num_epochs})")
    return problems


def _file_error(path: str | Path, error: ValueError | OSError) -> str:
    """A data file's problem as one line naming the file: DataErrors name it already, OS errors may not."""
    if isinstance(error, ValueError):
        return str(error)
    return f"{path}: cannot be read ({type(error).__name__}: {error.strerror or error})"


def _train_file_problems(config: RunConfig, sources: list[TrainSource]) -> list[str]:
    """Each training file that is missing or holds a bad record (one problem per file), then `data.val_size`
    against the records the mixture will hold. Hub datasets are not downloaded for the check: their records, and
    so the mixture's size, are only known when training loads them."""
    problems, total, counted_all = [], 0, True
    for source in sources:
        if missing_source(source.path):
            problems.append(f"data.train_files: {source.path}: file not found")
            counted_all = False
            continue
        if not Path(source.path).exists():  # a Hub id
            counted_all = False
            continue
        try:
            count = _checked_train_file(
                *_file_key(source.path),
                source.task,
                config.data.template,
                config.data.target,
                config.data.shuffled_label_control,
            )
        except (ValueError, OSError) as error:
            problems.append(f"data.train_files: {_file_error(source.path, error)}")
            counted_all = False
            continue
        # the cap as training applies it: the source's own, else data.max_records_per_task
        cap = source.max_records if source.max_records is not None else config.data.max_records_per_task
        total += count if cap is None else min(count, cap)
    val_size = config.data.val_size
    if val_size < 0 or (sources and counted_all and val_size >= total):
        problems.append(
            f"data.val_size: {val_size} must be >= 0 and smaller than the number of training records ({total}, "
            "after data.max_records_per_task)"
        )
    return problems


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """A file as its path, size and modification time: a cache key that a rewritten file changes."""
    stat = os.stat(path)
    return str(path), stat.st_size, stat.st_mtime_ns


# An experiment checks every run's config, and its runs mostly share their files: each file (with the settings
# that change what is checked) is read once per process. lru_cache keeps results only, so a file with a problem
# is read again each time and reported for each run that has it.
@functools.lru_cache(maxsize=256)
def _checked_train_file(
    path: str, size: int, mtime_ns: int, task: str | None, template: str, target: str, shuffled: bool
) -> int:
    source = TrainSource(path=path, task=task)
    return check_train_file(source, template=template, target=target, shuffled_label_control=shuffled)


@functools.lru_cache(maxsize=256)
def _checked_test_file(path: str, size: int, mtime_ns: int, task: str, protocols: tuple[str, ...]) -> None:
    check_test_file(path, task, protocols)


def folder_problem(folder: str | Path, where: str) -> str | None:
    """Why `folder` cannot be created or written to, or None; nothing is created. Found now, an unwritable output
    folder costs a second; found at the first save, it costs the model load and the training before it.

    os.access, not a trial write: the check must leave no trace, and it honours read-only file systems. (Run as
    root, os.access calls every folder of a writable file system writable, as root may write anywhere there.)"""
    path = Path(os.path.abspath(folder))
    if os.path.exists(path):  # os.path, not Path: it says False instead of raising under an unreadable folder
        if not os.path.isdir(path):
            return f"{where}: {folder} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{where}: {folder} is not writable"
        return None
    existing = next(parent for parent in path.parents if os.path.exists(parent))  # the root always exists
    if not os.path.isdir(existing):
        return f"{where}: {folder} cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{where}: {folder} cannot be created: {existing} is not writable"
    return None


def check_writable_folder(folder: str | Path, where: str) -> None:
    """`folder_problem` as an error, for commands that write a folder after loading a model."""
    problem = folder_problem(folder, where)
    if problem:
        raise ValueError(problem)


def check_inputs(config: RunConfig) -> None:
    """`input_problems` as one error listing them all."""
    problems = input_problems(config)
    if problems:
        raise problems_error(problems)


#: Errors a user can cause (a bad setting, a missing or unreadable file, an unwritable folder, a full disk): one
#: line naming what to fix. `--debug` (or MOELORA_DEBUG=1, which experiment runs inherit) shows the traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError)


def report_errors(call: Callable[[], int], debug: bool = False) -> int:
    """Run `call`; a user error becomes `moelora: error: ...` on stderr and exit status 1."""
    debug = debug or os.environ.get("MOELORA_DEBUG", "") not in ("", "0")
    try:
        return call()
    except USER_ERRORS as error:
        if debug:
            raise
        message = str(error) or type(error).__name__
        if not isinstance(error, ValueError):  # not a setting: the type says what failed (PermissionError, ...)
            message = f"{type(error).__name__}: {message}"
        print(f"moelora: error: {message}", file=sys.stderr)
        return 1


@dataclass
class RunOutcome:
    """What a run left: its folder, training metrics (none when only evaluated) and the evaluation table."""

    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    table: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def summary(self) -> str:
        lines = []
        m = self.metrics
        if m:
            lines.append(
                f"trained {m.get('method', 'the adapter')} in {m['train_runtime']:.0f}s: {m['tokens_seen']:,} tokens, "
                f"{m['train_tokens_per_second']:.0f} tokens/s, train loss {m.get('train_loss', float('nan')):.4f}"
            )
        if self.table is not None:
            elapsed = time.perf_counter() - self.started
            lines += [self.table, f"total wall time {elapsed:.0f}s; results in {self.output_dir}"]
        return "\n".join(lines)


def evaluate_model(config: RunConfig, model, tokenizer, output_dir: Path, label: str, trainable: int | None) -> list:
    """Evaluate with every configured protocol; returns the result objects (variants such as cloze_norm included)."""
    import torch

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(config.evaluation.matmul_precision)
    try:
        return _evaluate_protocols(config, model, tokenizer, output_dir, label, trainable)
    finally:
        torch.set_float32_matmul_precision(precision)


def _evaluate_protocols(config: RunConfig, model, tokenizer, output_dir: Path, label: str, trainable: int | None):
    from .evaluation import evaluate, with_variants

    results = []
    for protocol in config.evaluation.protocols:
        max_items = config.evaluation.max_items
        if protocol == "generate" and config.evaluation.generate_max_items is not None:
            max_items = config.evaluation.generate_max_items
        results += with_variants(
            evaluate(
                model,
                tokenizer,
                resolve_test_files(config.evaluation.test_files),
                protocol=protocol,
                batch_size=config.evaluation.batch_size,
                max_items=max_items,
                subset_seed=config.evaluation.subset_seed if max_items is not None else None,
                num_beams=config.evaluation.num_beams,
                max_new_tokens=config.evaluation.max_new_tokens,
                output_dir=output_dir / f"eval_{label}",
                metadata={
                    "label": label,
                    "model": config.model,
                    "method": label,
                    "trainable_parameters": trainable,
                    "matmul_precision": config.evaluation.matmul_precision,
                },  # fmt: skip
            )
        )
    return results


def _evaluate_and_tabulate(config: RunConfig, model, tokenizer, outcome: RunOutcome, trainable: int) -> None:
    from .evaluation import results_to_markdown

    model.eval()
    # the tuned model first: a run stopped during evaluation has then kept what only it can give
    rows = evaluate_model(config, model, tokenizer, outcome.output_dir, config.method, trainable)
    if config.evaluation.evaluate_base_model:
        with model.disable_adapter():
            rows = evaluate_model(config, model, tokenizer, outcome.output_dir, "base", 0) + rows
    outcome.table = results_to_markdown(rows)
    (outcome.output_dir / "results.md").write_text(outcome.table + "\n")


def train_and_evaluate(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunOutcome | None:
    """Check, train, then evaluate when `evaluation.test_files` is set. Under torchrun / accelerate launch only
    the main process evaluates and gets the outcome; the others return None. `--resume` of a run whose training
    finished does nothing: it says so and returns None."""
    from accelerate import PartialState

    from .models import load_model_and_tokenizer, parse_dtype
    from .training import TrainingFinished, check_output_dir, train

    outcome = RunOutcome(Path(config.training.output_dir))
    check_inputs(config)
    dtype = parse_dtype(config.model_dtype)
    try:
        check_output_dir(config, resume=resume, overwrite=overwrite)
    except TrainingFinished as finished:
        if PartialState().is_main_process:
            print(finished)
        return None
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=dtype, quantization=config.model_quantization)
    result = train(config, model, tokenizer, resume=resume, overwrite=overwrite)
    if not PartialState().is_main_process:
        return None
    outcome.metrics = {"method": config.method, **result.metrics}
    if config.evaluation.test_files:
        _evaluate_and_tabulate(config, result.model, tokenizer, outcome, result.metrics["trainable_parameters"])
    return outcome


def evaluate_trained_run(config: RunConfig) -> RunOutcome:
    """Evaluate the adapter a finished training run saved in `training.output_dir` (a run stopped during its
    evaluation continues here)."""
    from peft import PeftModel

    from .models import check_adapter_folder, load_model_and_tokenizer, parse_dtype

    check_inputs(config)
    outcome = RunOutcome(Path(config.training.output_dir))
    check_adapter_folder(outcome.output_dir)
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=parse_dtype(config.model_dtype))
    model = PeftModel.from_pretrained(model, str(outcome.output_dir))
    trainable = json.loads((outcome.output_dir / "train_metrics.json").read_text())["trainable_parameters"]
    _evaluate_and_tabulate(config, model, tokenizer, outcome, trainable)
    return outcome
