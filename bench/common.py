"""Shared machinery of the benchmarks in this folder: variants and matched budgets, model building, interleaved
timing, saved-tensor and memory accounting, environment capture and result writing (JSON + Markdown).

Every script imports what it needs from here, so timing, interleaving and reporting are written once.

Terms used throughout:

- a *variant* is what one row measures: `frozen` (the base model or layer without any adapter) or a method of
  `moelora.METHODS` with optional settings, written `method[:key=value,...]` (e.g. `peft_lora:r=8`,
  `d2mora:shared_dropout_mask=true`). A variant without an explicit `r` is sized to the *matched budget*: the
  largest rank whose trainable-parameter count stays within the budget reference's count on the same target
  modules (`moelora.budget.closest_under_budget`); the reference defaults to D2MoRA {M3, N8, r8}, the D2MoRA
  paper's 35.8M setting on LLaMA-7B q/k/v.
- variants are measured *interleaved*: in each round every variant runs once, the starting variant rotating from
  round to round, so slow drifts of the machine (other processes, thermal state) spread over all variants
  instead of biasing the ones measured last; the first `warmup` rounds are discarded and the median of the rest
  is reported.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

import moelora
from moelora.budget import closest_under_budget, count_trainable
from moelora.methods import METHODS, get_method
from moelora.models import load_model_and_tokenizer

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"

#: The variant without an adapter: the frozen layer or model, the floor every adapter adds to.
FROZEN = "frozen"
#: Suffix of a variant merged into the base weights before use (inference).
MERGED = "@merged"
#: The budget every unsized variant is matched to: D2MoRA {M3, N8, r8} (35.8M trainable on LLaMA-7B q/k/v).
DEFAULT_BUDGET_FROM = "d2mora:r=8,num_down_experts=3,num_up_experts=8"
#: The recipes' adapter dropout (configs/compare/*: 0.05); applied to every variant unless it sets its own.
DEFAULT_DROPOUT = 0.05
#: The attention projections the D2MoRA paper adapts; moelora's default on Llama-style models.
QKV = ("q_proj", "k_proj", "v_proj")

#: LLaMA shapes with random weights (no download). `llama-1b` is TinyLlama-1.1B's shape (LLaMA-2 vocabulary);
#: `llama-7b` is LLaMA-7B's; `llama-tiny` is for smoke tests only.
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "llama-tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256,
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    ),
}  # fmt: skip

PRECISIONS = ("fp32", "bf16")


# --- command line and run setup ---------------------------------------------------------------------------------


def comma_list(text: str) -> list[str]:
    """'a,b , c' -> ['a', 'b', 'c'] (argparse type for list flags)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def variant_list(text: str) -> list[str]:
    """Variant specs separated by spaces or semicolons: their own settings use commas (`d2mora:r=8,top_k=2`)."""
    return [item for item in text.replace(";", " ").split() if item]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark shares: output, device, threads, repetitions, seed, dropout and budget."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <name>.json and <name>.md")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if any)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; 0 keeps torch's choice (default: 1 on CPU, as performance.md §6 pins, since a "
        "second thread made GEMM slower and small ops erratic on the 2-core VM; torch's choice on CUDA)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="discarded rounds before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dropout",
        type=float,
        default=DEFAULT_DROPOUT,
        help="lora_dropout of every variant that does not set its own (the recipes' 0.05)",
    )
    parser.add_argument(
        "--budget-from",
        default=DEFAULT_BUDGET_FROM,
        help="variant whose trainable-parameter count sizes every variant without an explicit r",
    )


def start(args: argparse.Namespace) -> torch.device:
    """Apply the run-wide settings (threads, seed) and return the device; fails early on a missing GPU."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    return device


# --- variants and matched budgets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One measured row: `method` None is the frozen base; `settings` are adapter config fields."""

    label: str
    method: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    #: Trainable parameters (0 for the frozen base); filled in by `resolve_variants`.
    trainable: int = 0
    #: Merged into the base weights before use (`@merged` after the spec; inference only).
    merged: bool = False


def parse_variant(spec: str) -> Variant:
    """`method[:key=value,...][@merged]`; values are read as YAML scalars (true, 0.1, 8, null)."""
    body, merged = spec.removesuffix(MERGED), spec.endswith(MERGED)
    name, _, rest = body.partition(":")
    if name == FROZEN:
        if rest or merged:
            raise ValueError(f"variant {spec!r}: the frozen base takes no settings and has nothing to merge")
        return Variant(spec, None)
    get_method(name)
    settings: dict[str, Any] = {}
    for item in comma_list(rest):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {spec!r}: expected key=value, got {item!r}")
        settings[key.strip()] = yaml.safe_load(value)
    return Variant(spec, name, settings, merged=merged)


def dense_methods() -> list[str]:
    """The methods that adapt plain nn.Linear layers (all but the MoE-expert-only ones, e.g. DR-LoRA)."""
    return [name for name, method in METHODS.items() if not method.moe_only]


def adapter_config(method: str, settings: Mapping[str, Any], task_type: str | None) -> PeftConfig:
    """The method's config class (`METHODS[method].config_cls`) with its preset, e.g. PEFT DoRA's use_dora."""
    entry = get_method(method)
    return entry.config_cls(task_type=task_type, **entry.preset, **settings)


def meta_copy(model: nn.Module) -> nn.Module:
    """The model's architecture on the meta device, for parameter counting without memory."""
    if isinstance(model, PreTrainedModel):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model.config)
    return copy.deepcopy(model).to("meta")


def largest_rank(model: nn.Module, targets: Sequence[str]) -> int:
    """min(d_in, d_out) over the targeted linears: moelora refuses a rank above it."""
    dims = [
        min(module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not dims:
        raise ValueError(f"no nn.Linear named {list(targets)} in the model")
    return min(dims)


def variant_settings(variant: Variant, targets: Sequence[str], dropout: float) -> dict[str, Any]:
    """The variant's own settings over the run's targets and dropout; a method that fixes its dropout (MoA has
    none and refuses any other value) keeps its own."""
    settings = {"target_modules": list(targets), "lora_dropout": dropout, **variant.settings}
    if "lora_dropout" in variant.settings:
        return settings
    try:
        adapter_config(variant.method, settings, None)
    except ValueError as error:
        if "lora_dropout" not in str(error):
            raise
        del settings["lora_dropout"]
    return settings


def resolve_variants(
    model: nn.Module, specs: Sequence[str], targets: Sequence[str], dropout: float, budget_from: str
) -> tuple[list[Variant], dict[str, Any]]:
    """Parse the specs, give each the targets and dropout, size every one without `r` to the matched budget, and
    count trainable parameters exactly (on a meta copy of `model`). A variant the model cannot take (a method
    refusing the model or a setting, with a ValueError) is left out, its reason kept in the returned budget
    record under "skipped", so methods added to moelora later never break a run."""
    meta = meta_copy(model)
    reference = parse_variant(budget_from)
    if reference.method is None:
        raise ValueError("--budget-from must name a method, not the frozen base")
    budget = count_trainable(meta, reference.method, variant_settings(reference, targets, dropout))
    max_rank = largest_rank(model, targets)
    resolved, skipped = [], {}
    for spec in specs:
        variant = parse_variant(spec)
        if variant.method is None:
            resolved.append(variant)
            continue
        try:
            settings = variant_settings(variant, targets, dropout)
            if "r" in variant.settings:
                count = count_trainable(meta, variant.method, settings)
            else:
                row = closest_under_budget(meta, variant.method, budget, settings, max_rank)
                if row is None:
                    raise ValueError(f"over the {budget:,}-parameter budget even at r=1")
                settings, count = row.settings, row.trainable_parameters
        except ValueError as error:
            skipped[spec] = str(error).splitlines()[0]
            print(f"skipping variant {spec!r}: {skipped[spec]}", flush=True)
            continue
        resolved.append(replace(variant, settings=settings, trainable=count))
    record = {"reference": budget_from, "trainable_parameters": budget, "targets": list(targets), "skipped": skipped}
    return resolved, record


def skipped_markdown(budget: Mapping[str, Any]) -> str:
    """A line per variant `resolve_variants` left out, with its reason ('' when none was)."""
    return "\n".join(f"- skipped `{label}`: {reason}" for label, reason in budget["skipped"].items())


def share_frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are the original's own tensors (deepcopy with every parameter memoised):
    many variants of one base then cost one set of frozen weights. Never merge into or cast such a copy."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


def attach(model: nn.Module, variant: Variant, task_type: str | None, seed: int) -> nn.Module:
    """The variant on a weight-sharing copy of `model`: `get_peft_model` with the method's config, seeded so every
    run draws the same adapter init; the frozen variant is the copy itself."""
    base = share_frozen_copy(model)
    if variant.method is None:
        return base
    torch.manual_seed(seed)
    return get_peft_model(base, adapter_config(variant.method, variant.settings, task_type))


def shown_settings(variant: Variant) -> str:
    """The settings a table shows: everything but the targets, which the table header states once."""
    return ", ".join(f"{k}={v}" for k, v in variant.settings.items() if k != "target_modules")


# --- models -----------------------------------------------------------------------------------------------------


def build_model(name: str, *, dtype: torch.dtype, device: torch.device, layers: int | None = None) -> PreTrainedModel:
    """A causal LM with frozen weights: a random-weight LLaMA shape of `LLAMA_SHAPES` (`layers` overrides its
    depth), else a model moelora loads (`smollm2-135m`, the embedded default, offline; a folder; a hub id)."""
    if name in LLAMA_SHAPES:
        shape = dict(LLAMA_SHAPES[name])
        if layers is not None:
            shape["num_hidden_layers"] = layers
        config = LlamaConfig(**shape, max_position_embeddings=4096)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        if layers is not None:
            raise ValueError(f"--llama-layers applies to the random LLaMA shapes only, not {name!r}")
        model, _ = load_model_and_tokenizer(name, dtype=dtype)
        model.to(device)
    model.requires_grad_(False)
    return model


def model_record(name: str, model: PreTrainedModel) -> dict[str, Any]:
    """What a result needs to say about the model: its name and the shape that sets the cost."""
    config = model.config
    return {
        "name": name,
        "random_weights": name in LLAMA_SHAPES,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16: autocast to bfloat16 on the device (adapter master weights stay fp32); fp32: no autocast."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def parse_pair(text: str) -> tuple[int, int]:
    """'4x256' -> (4, 256): a batch (sequences x tokens per sequence) or a module cell (d x tokens)."""
    first, sep, second = text.lower().partition("x")
    if not (sep and first.strip().isdigit() and second.strip().isdigit()):
        raise ValueError(f"{text!r}: expected two integers joined by x, e.g. 4x256")
    return int(first), int(second)


def random_tokens(batch: tuple[int, int], vocab_size: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, batch, generator=generator).to(device)


# --- timing -----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    tasks: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each task over `repeats` rounds after `warmup` discarded ones. Every round runs every task once,
    starting one task later than the previous round (round-robin), with the device synchronised around each call
    so asynchronous GPU work is charged to the task that queued it. A task that returns a float has timed itself
    (e.g. leaving out its own setup) and that value is used; otherwise its wall-clock time is."""
    names = list(tasks)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            began = time.perf_counter()
            measured = tasks[name]()
            synchronize(device)
            elapsed = time.perf_counter() - began
            if round_index >= warmup:
                samples[name].append(measured if isinstance(measured, float) else elapsed)
    return samples


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median (the reported value), min, p90 and the relative spread (p90 - min) / median of the samples."""
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "median_s": median,
        "min_s": ordered[0],
        "p90_s": p90,
        "spread": (p90 - ordered[0]) / median if median else 0.0,
        "samples": len(ordered),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


# --- memory and saved tensors -----------------------------------------------------------------------------------


class SavedBytes:
    """Bytes of the distinct storages autograd saved for backward, parameters excluded (filled by `saved_bytes`)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@contextmanager
def saved_bytes(parameters: Iterable[torch.Tensor]) -> Iterator[SavedBytes]:
    """Count what the forward passes inside the block save for backward, via `saved_tensors_hooks`.

    Each storage counts once, however many ops save it or views of it (x saved by three GEMMs is one x), and the
    storages of `parameters` (frozen and trainable weights, resident anyway) are left out, so the count is the
    activation memory the graph holds until backward. Deterministic and device-independent, unlike timings.
    Under non-reentrant gradient checkpointing only what the checkpoints keep is seen, which is what stays alive.
    """
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    counter = SavedBytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            counter.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside the block (forward and, on CPU, backward): a deterministic
    proxy for per-op dispatch overhead and the check that no Python loop over experts runs per token batch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        self.count += 1
        return func(*args, **(kwargs or {}))


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def peak_memory(run: Callable[[], object], device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of `run` above what was allocated before it.

    CUDA: `torch.cuda.max_memory_allocated` (exact for tensors). CPU (Linux): the peak resident set size (VmHWM,
    reset through /proc/self/clear_refs) minus the resident size before the call, after glibc's `malloc_trim`
    has handed freed heap memory back (else memory freed by an earlier, larger call is reused unseen and the
    delta reads low). Still approximate: pages count when touched, and other threads' memory counts too.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device) - before}
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        return {"kind": "unavailable", "bytes": None}
    run()
    return {"kind": "cpu_rss_delta_approx", "bytes": (_status_kib("VmHWM") - before) * 1024}


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): return the free heap to the system (a no-op where there is no glibc)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def parameter_bytes(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors given (a tied or shared parameter counts once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parameters}
    return sum(storages.values())


# --- environment and results ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware, thread settings, versions and machine load at the time of the call."""
    gpu = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        gpu = {"name": properties.name, "memory_bytes": properties.total_memory, "cuda": torch.version.cuda}
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "moelora": moelora.__version__,
            "numpy": _version("numpy"),
        },
        "git_commit": _git_commit(),
        "load_average": list(os.getloadavg()),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_record(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The header of every result file: benchmark, exact command and arguments, environment."""
    return {
        "benchmark": name,
        "command": [Path(sys.executable).name, *sys.argv],
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "environment": environment(device),
    }


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (header, key) `columns`; None shows as an em dash."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["—" if row.get(key) is None else str(row[key]) for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ms(seconds: float | None) -> str | None:
    return None if seconds is None else f"{1e3 * seconds:.2f}"


def fmt_ratio(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def fmt_mib(num_bytes: int | None) -> str | None:
    return None if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def environment_markdown(record: Mapping[str, Any]) -> str:
    """The header block of every Markdown result: command, hardware, versions, load."""
    env = record["environment"]
    gpu = env["gpu"]["name"] if env["gpu"] else "none"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load = ", ".join(f"{value:.2f}" for value in env["load_average"])
    end_load = record.get("load_average_end")
    load_end = ", ".join(f"{value:.2f}" for value in end_load) if end_load else "—"
    return "\n".join(
        [
            f"# {record['benchmark']}",
            "",
            f"- command: `{' '.join(record['command'])}`",
            f"- when: {env['time_utc']}, commit {env['git_commit'] or 'unknown'}",
            f"- hardware: {env['cpu_model']}, {env['cpus_usable']} usable CPUs of {env['cpu_count']}, "
            f"torch threads {env['torch_threads']}; GPU: {gpu}; device used: {env['device']}",
            f"- versions: python {env['python']}, {versions}",
            f"- load average (1/5/15 min) at start: {load}; at end: {load_end} "
            "(a load above the usable CPUs means the timings are noisy)",
        ]
    )


def write_results(out_dir: Path, name: str, record: dict[str, Any], body: str) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` (the full record) and `<name>.md` (environment header + `body`)."""
    record["load_average_end"] = list(os.getloadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(environment_markdown(record) + "\n\n" + body.rstrip() + "\n")
    return json_path, md_path
