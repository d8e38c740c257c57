"""Run configuration: YAML files with `section.key=value` command-line overrides.

A run config has five parts: `model`, `method` and `adapter` (the fields of the method's PEFT config),
`data`, `training` and `evaluation`. Unknown keys are errors that name the key, so a typo never runs with
a silent default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .tasks import TRAIN_TEMPLATES

TARGETS = ("label", "text")
PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_SAMPLINGS = ("random", "group_by_length")


def problems_error(problems: list[str]) -> ValueError:
    """Problems found in one pass as one error: a single problem on the `moelora: error:` line, several as an
    indented list under it."""
    return ValueError(problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems))


@dataclass
class DataConfig:
    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training files as 'task=path' (or plain paths); several files mix into one multi-task set. "
            "'bundled' stands for the sample shipped in the package."
        },
    )
    max_records_per_task: int | None = field(default=None, metadata={"help": "Cap on records drawn per task."})
    val_size: int = field(default=2000, metadata={"help": "Records held out for validation (D2MoRA: 2000)."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per training example."})
    train_on_inputs: bool = field(default=True, metadata={"help": "Loss on the prompt too (the papers' default)."})
    template: str = field(default="d2mora", metadata={"help": "Training template: d2mora | llm_adapters."})
    target: str = field(
        default="label",
        metadata={
            "help": "label: the files' own targets, options in the instruction and 'the correct answer is <label>' "
            "as the response (the papers) | text: the bare question as the instruction and the correct option's "
            "text as the response, the form small models learn (evaluate it with the cloze protocol)."
        },
    )
    shuffled_label_control: bool = field(
        default=False,
        metadata={
            "help": "Control run: permute the answers within each task before training (a leak check; the "
            "tuned model must then score at its label-prior level)."
        },
    )

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"data.target: expected one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.template not in TRAIN_TEMPLATES:
            raise ValueError(f"data.template: expected one of {', '.join(TRAIN_TEMPLATES)}, got {self.template!r}")


@dataclass
class TrainingConfig:
    output_dir: str = field(
        default="runs/d2mora", metadata={"help": "Run folder: adapter, checkpoints, logs, evaluation results."}
    )
    seed: int = field(default=42, metadata={"help": "Seeds data order, validation split, adapter init and dropout."})
    num_epochs: float = field(default=4.0, metadata={"help": "Epochs over the training set (D2MoRA: 4)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: use epochs)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak AdamW learning rate (D2MoRA: 3e-4)."})
    warmup_steps: int = field(
        default=100, metadata={"help": "Linear warmup steps, then linear decay to 0 (D2MoRA: 100)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (D2MoRA: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (D2MoRA: 1.0)."})
    global_batch_size: int = field(
        default=16, metadata={"help": "Sequences per optimizer step over all processes (D2MoRA: 16)."}
    )
    micro_batch_size: int = field(
        default=4, metadata={"help": "Sequences per forward pass per process; the rest is gradient accumulation."}
    )
    eval_steps: int = field(default=200, metadata={"help": "Validation-loss interval in steps (D2MoRA: 200)."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint interval in steps (D2MoRA: 200)."})
    save_total_limit: int = field(default=3, metadata={"help": "Checkpoints kept (the best one is never deleted)."})
    keep_checkpoints: bool = field(
        default=True,
        metadata={
            "help": "Keep the checkpoint-* folders once training has finished (they resume or extend a run; the "
            "final adapter is saved beside them either way). false deletes them after a successful run."
        },
    )
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Keep the lowest-validation-loss checkpoint, as the official recipe does."}
    )
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 | fp16 (mixed precision autocast)."})
    response_logits_only: bool = field(
        default=True,
        metadata={
            "help": "With data.train_on_inputs false, run the LM head only at the positions whose next token is "
            "trained (logits_to_keep): the same loss, without [batch, length, vocab] logits (most of the memory of "
            "a small model, and its largest GEMM). Off for models whose forward has no logits_to_keep."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% slower."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model (the Trainer's option): compiles for minutes first, recompiles per new "
            "sequence length; see bench/README.md for the measured speedup."
        },
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log loss, auxiliary losses and router entropy every N steps."}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Trainer loggers: tensorboard, wandb, ... or []."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    train_sampling: str = field(
        default="random",
        metadata={
            "help": "random (the papers) | group_by_length: batches of similar length, less padding, faster on CPU."
        },
    )

    def __post_init__(self) -> None:
        # checked with the config, so that a typo fails before the model loads, not when the Trainer starts
        if self.precision not in PRECISIONS:
            raise ValueError(f"training.precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.train_sampling not in TRAIN_SAMPLINGS:
            raise ValueError(
                f"training.train_sampling: expected one of {', '.join(TRAIN_SAMPLINGS)}, got {self.train_sampling!r}"
            )


@dataclass
class EvaluationConfig:
    test_files: dict[str, str] | str = field(
        default_factory=dict, metadata={"help": "task -> test file, or 'bundled' for the sample in the package."}
    )
    protocols: list[str] = field(
        default_factory=lambda: ["likelihood", "generate"],
        metadata={
            "help": "likelihood (label targets scored), generate (the LLM-Adapters protocol) and/or cloze (option "
            "texts scored after the bare question, acc and acc_norm as lm-eval; for small models and text targets)."
        },
    )
    max_items: int | None = field(
        default=None, metadata={"help": "Evaluate N items of each task: the first N, or a random draw (subset_seed)."}
    )
    subset_seed: int | None = field(
        default=None,
        metadata={
            "help": "Draw the max_items (and generate_max_items) items at random with this seed (the same items in "
            "every run); without a cap every item is evaluated."
        },
    )
    generate_max_items: int | None = field(
        default=None, metadata={"help": "A separate, smaller cap for the (slower) generation protocol."}
    )
    batch_size: int = field(default=8, metadata={"help": "Items per forward pass in evaluation."})
    num_beams: int = field(
        default=4, metadata={"help": "Beam width of the generate protocol (LLM-Adapters: 4; 1 is greedy)."}
    )
    max_new_tokens: int = field(
        default=32, metadata={"help": "New tokens per answer in the generate protocol (LLM-Adapters: 32)."}
    )
    evaluate_base_model: bool = field(default=False, metadata={"help": "Also evaluate the base model, side by side."})
    matmul_precision: str = field(
        default="highest",
        metadata={
            "help": "fp32 matrix products in evaluation (torch.set_float32_matmul_precision): highest (exact fp32) | "
            "high (TF32 on GPUs that have it: several times faster, inputs rounded to 10 mantissa bits)."
        },
    )

    def __post_init__(self) -> None:
        if self.matmul_precision not in ("highest", "high"):
            raise ValueError(f"evaluation.matmul_precision: expected highest or high, got {self.matmul_precision!r}")
        # the evaluator's own list, checked here so that a typo fails before training, not after it
        from .evaluation import PROTOCOLS

        unknown = [protocol for protocol in self.protocols if protocol not in PROTOCOLS]
        if unknown:
            raise ValueError(f"evaluation.protocols: unknown {unknown}; choose from {', '.join(PROTOCOLS)}")


@dataclass
class RunConfig:
    """One run: which model, which method with which adapter fields, on which data, trained and evaluated how."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "'smollm2-135m' (embedded, offline), a hub model id or a local folder."},
    )
    model_dtype: str = field(
        default="fp32",
        metadata={
            "help": "Base-model weights: fp32 | bf16 | fp16 (the official D2MoRA recipe: fp16). Adapter weights "
            "stay fp32 either way; `training.precision` sets the autocast."
        },
    )
    model_quantization: str | None = field(
        default=None,
        metadata={"help": "4bit (NF4, QLoRA style) | 8bit: load the frozen base through bitsandbytes; CUDA GPUs only."},
    )
    method: str = field(default="d2mora", metadata={"help": "The MoE-LoRA method; `moelora --help` lists them."})
    adapter: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Fields of the method's PEFT config (r, lora_alpha, target_modules, ...)."},
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training data."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation and checkpoints."})
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig, metadata={"help": "Test sets and protocols, run after training."}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS = {"data": DataConfig, "training": TrainingConfig, "evaluation": EvaluationConfig}


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` names, or a ValueError naming `where`.

    YAML 1.1 reads `1e-3` (no dot) as a string, so a string where a float is expected is parsed as one;
    nothing else is converted.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_value(value, option, where)
            except ValueError:
                continue
    elif hint is type(None):
        if value is None:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_check_value(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {key: _check_value(item, args[1], f"{where}.{key}") for key, item in value.items()}
    else:
        return value
    expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    raise ValueError(f"{where}: expected {expected}, got {value!r}")


def _checked_values(cls: type, values: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """The values of `cls`'s annotated fields as their types (`_check_value`); each value that is not of its type is
    appended to `problems`, named `<where><key>`, and left out. Unknown keys are the caller's to report."""
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        if key in hints:
            try:
                checked[key] = _check_value(value, hints[key], f"{where}{key}")
            except ValueError as error:
                problems.append(str(error))
    return checked


def field_type_problems(cls: type, values: dict[str, Any], where: str) -> list[str]:
    """The values of dataclass `cls`'s fields that do not have the field's type. For configs checked by type nowhere
    else: PEFT's own configs take `r: "8"` or `target_modules: 5` without a word, and the model then fails to build
    after it has loaded."""
    problems: list[str] = []
    _checked_values(cls, values, f"{where}.", problems)
    return problems


def coerce_float_strings(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Parse strings such as '1e-4' given for the float fields of a dataclass (YAML 1.1 leaves them strings)."""
    hints = typing.get_type_hints(cls)
    coerced = dict(values)
    for key, value in values.items():
        hint = hints.get(key)
        floaty = hint is float or float in typing.get_args(hint)
        if floaty and isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a number: the config's own validation names it
                coerced[key] = float(value)
    return coerced


def _build_section(cls: type, values: dict[str, Any], where: str, problems: list[str], key_sep: str = ".") -> Any:
    """The section built from `values`, or None with every unknown key and wrong value appended to `problems`;
    a value is named `<where><key_sep><key>`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)  # key=str: YAML keys may be numbers (`1: x`)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    count = len(problems)
    checked = _checked_values(cls, values, f"{where}{key_sep}", problems)
    if len(problems) > count:
        return None
    try:
        return cls(**checked)  # runs the section's own checks (__post_init__)
    except ValueError as error:
        problems.append(str(error))
        return None


def config_from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from nested values; every unknown key and bad value of every section is reported in one error."""
    values = dict(values)
    sections, problems = {}, []
    for name, cls in _SECTIONS.items():
        section = values.pop(name, None) or {}
        if not isinstance(section, dict):
            problems.append(f"{where}: '{name}' must be a mapping, got {type(section).__name__}")
            continue
        sections[name] = _build_section(cls, section, f"{where}: {name}", problems)
    config = _build_section(RunConfig, values, where, problems, key_sep=": ")  # "run.yaml: model", not ".model"
    if problems:
        raise problems_error(problems)
    for name, section in sections.items():
        setattr(config, name, section)
    if not isinstance(config.adapter, dict):
        raise ValueError(f"{where}: 'adapter' must be a mapping of the method's config fields")
    return config


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides; values parse as YAML scalars/lists (`lr=1e-3`, `files=[a,b]`)."""
    values = dict(values)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not of the form key=value")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return values


BUNDLED = "bundled"


def resolve_train_files(entries: list[str]) -> list[str]:
    """Expand the 'bundled' keyword to the sample's `task=path` entries."""
    from .data import bundled_train_sources

    resolved = []
    for entry in entries:
        if entry == BUNDLED:
            resolved += [f"{task}={path}" for task, path in bundled_train_sources().items()]
        else:
            resolved.append(entry)
    return resolved


def resolve_test_files(test_files: dict[str, str] | str) -> dict[str, str]:
    from .data import bundled_test_files

    if test_files == BUNDLED:
        return {task: str(path) for task, path in bundled_test_files().items()}
    if isinstance(test_files, str):
        raise ValueError(f"evaluation.test_files must be a task -> path mapping or 'bundled', got {test_files!r}")
    return dict(test_files)


def recipe_path(name: str) -> Path:
    """A run config shipped in the package (`moelora/recipes/<name>.yaml`)."""
    from importlib.resources import files

    return Path(str(files("moelora") / "recipes" / f"{name}.yaml"))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); expected a YAML run config") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML{_yaml_error_place(error)}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top level must be a mapping")
    return config_from_dict(apply_overrides(values, overrides or []), where=str(path or "overrides"))


def _yaml_error_place(error: yaml.YAMLError) -> str:
    """Where and what, on one line: PyYAML's own message spans several lines with a quote of the text."""
    mark = getattr(error, "problem_mark", None)
    place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return f"{place}: {problem}"


def config_keys_help(width: int = 100) -> str:
    """Every run-config key with its default and help text, for `moelora train --help`."""
    import textwrap

    lines = ["config keys (YAML, or section.key=value overrides):"]

    def describe(prefix: str, cls: type) -> None:
        for item in dataclasses.fields(cls):
            if item.name in _SECTIONS:
                continue
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            head = f"  {prefix}{item.name} (default {default!r}): "
            text = textwrap.fill(
                head + item.metadata.get("help", ""), width, subsequent_indent="      ", break_on_hyphens=False
            )
            lines.append(text)

    describe("", RunConfig)
    for name, cls in _SECTIONS.items():
        describe(f"{name}.", cls)
    return "\n".join(lines)
