"""Per-module benchmark: one adapted d x d linear layer, every method against PEFT LoRA and the frozen linear.

    python bench/modules.py                 # CPU default: d x tokens 1024x512, 1024x2048, 4096x512 (~10 min)
    python bench/modules.py --quick         # 1024x512 only, 3 repeats
    python bench/modules.py --full          # the issue's grid: d 1024, 4096 x tokens 512, 2048, 8192
    python bench/modules.py --device cuda   # the full grid and bf16 autocast by default on a GPU
    python bench/modules.py --shapes 2048x4096,4096x1024 --variants "frozen peft_lora d2mora"

What one row measures, for one variant on a [1, tokens, d] input that requires grad (as inside a model, where
earlier adapters need the gradient of every layer's input), in training mode (dropout on):

- forward time (the autograd graph is recorded, as in training) and forward+backward time (backward of a fixed
  random output gradient), interleaved round-robin with every other variant of the same shape, median of the
  timed rounds; ratios against the frozen linear (the floor: its backward is the input gradient only) and
  against the baseline (PEFT LoRA at the matched budget);
- bytes saved for backward (distinct storages, parameters excluded, counted with saved_tensors_hooks);
- memory: on CUDA the peak allocated above the start during one forward+backward; on CPU an estimate, saved
  bytes + trainable parameters + their gradients (CPU allocators give no robust per-call peak);
- aten ops dispatched in forward and in forward+backward (deterministic; shows per-op overhead and that no
  Python loop over experts runs).

Variants: the frozen linear, PEFT LoRA at r 8/16/64, and every method of moelora.METHODS at the matched budget
(D2MoRA {M3, N8, r8}'s trainable-parameter count on the layer, about LoRA r 45), plus D2MoRA with one shared
dropout mask and top-2 MoLoRA; methods that cannot adapt a lone linear (DR-LoRA needs MoE experts, MoA whole
decoder layers) are skipped with their reason. A method with a
test-only loop form (tests/reference.py; today D2MoRA) also gets two fp64 rows, the loop form as written there
(fp64) and the fast path converted to fp64, so that the loop-versus-fast ratio compares like with like (CPU
only: the loop forms allocate their buffers on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    FROZEN,
    MERGED,
    REPO_ROOT,
    OpCounter,
    Variant,
    add_common_arguments,
    attach,
    autocast,
    comma_list,
    dense_methods,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    interleaved,
    markdown_table,
    parameter_bytes,
    parse_pair,
    peak_memory,
    ratio,
    resolve_variants,
    run_record,
    saved_bytes,
    shown_settings,
    skipped_markdown,
    start,
    summarize,
    variant_list,
    write_results,
)
from torch import nn

from moelora.methods import D2MoRALinear

NAME = "modules"
DEFAULT_VARIANTS = [
    FROZEN,
    "peft_lora:r=8",
    "peft_lora:r=16",
    "peft_lora:r=64",
    *dense_methods(),
    "d2mora:shared_dropout_mask=true",
    "molora:top_k=2",
]
TARGET = "proj"
#: CPU default cells (d x tokens), trimmed from the issue's grid to about 10 minutes on a 2-core VM.
CPU_SHAPES = ["1024x512", "1024x2048", "4096x512"]
FULL_SHAPES = [f"{d}x{tokens}" for d in (1024, 4096) for tokens in (512, 2048, 8192)]


def load_reference() -> ModuleType:
    """tests/reference.py, the test-only loop forms, imported from its file (tests/ is not a package)."""
    path = REPO_ROOT / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("moelora_test_reference", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the loop forms from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OneLinear(nn.Module):
    """A single frozen bias-free d_in -> d_out linear named `proj` (as LLaMA's projections): the smallest model a
    PEFT tuner adapts with target_modules=['proj']."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> None:
        """moelora.budget counts parameters through PEFT's causal-LM wrapper, which looks this method up; a single
        linear never generates."""
        raise NotImplementedError("OneLinear does not generate")


class D2MoRALoop(nn.Module):
    """D2MoRA's official one-expert-at-a-time forward (`d2mora_loop` of tests/reference.py, fp64 as written there)
    on the weights of an adapted D2MoRALinear: the base output plus the loop's update, with one dropout draw per A
    expert (one draw shared by all when the config asks for a shared mask), as the fast path does."""

    def __init__(self, layer: D2MoRALinear, loop: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.layer = layer
        self.loop = loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        name = layer.active_adapters[0]
        config = layer.adapter_config[name]
        flat = x.reshape(-1, x.shape[-1])
        if config.shared_dropout_mask:
            dropped = [F.dropout(flat, config.lora_dropout, self.training)] * config.num_down_experts
        else:
            dropped = [F.dropout(flat, config.lora_dropout, self.training) for _ in range(config.num_down_experts)]
        delta = self.loop(
            flat,
            layer.d2mora_A[name],
            layer.d2mora_B[name],
            layer.d2mora_router_A[name],
            layer.d2mora_router_B[name],
            config.scaling,
            dropped,
        )
        return layer.base_layer(x) + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(x.dtype)


#: Loop forms by method: the builder takes the method's adapted layer and the loaded tests/reference.py.
LOOP_FORMS: dict[str, Callable[[nn.Module, ModuleType], nn.Module]] = {
    "d2mora": lambda layer, reference: D2MoRALoop(layer, reference.d2mora_loop),
}
DEFAULT_LOOP_FORMS = [label for label in DEFAULT_VARIANTS if label in LOOP_FORMS]


class Entry:
    """One timed row: a module, its input and output gradient, and how it runs (autocast or not)."""

    def __init__(self, variant: Variant, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, precision: str):
        self.variant, self.module, self.x, self.grad, self.precision = variant, module.train(), x, grad, precision
        self.trainable = [p for p in module.parameters() if p.requires_grad]

    def forward(self) -> torch.Tensor:
        with autocast(self.precision, self.x.device):
            return self.module(self.x)

    def forward_backward(self) -> None:
        self.x.grad = None
        for parameter in self.trainable:
            parameter.grad = None
        self.forward().backward(self.grad)


def build_entries(
    d: int, tokens: int, variants: list[Variant], args: argparse.Namespace, device: torch.device
) -> dict[str, Entry]:
    """Every variant on one weight-sharing base linear, plus the fp64 loop/fast pairs of the loop-form methods."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    base = OneLinear(d, d).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(1, tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, tokens, d, device=device, dtype=dtype)
    entries = {v.label: Entry(v, attach(base, v, None, args.seed), x, grad, args.dtype) for v in variants}
    loop_labels = [label for label in args.loop_forms if label in entries]
    if loop_labels:
        reference = load_reference()
        x64 = x.detach().double().requires_grad_(True)
        grad64 = grad.double()
        for label in loop_labels:
            variant = entries[label].variant
            fast = copy.deepcopy(entries[label].module).double()  # its own fp64 base weight: never cast a shared one
            layer = fast.base_model.model.proj
            loop = LOOP_FORMS[variant.method](layer, reference)
            # precision "fp32" = no autocast: both rows compute in fp64
            entries[f"{label} [fast, fp64]"] = Entry(variant, fast, x64, grad64, "fp32")
            entries[f"{label} [loop, fp64]"] = Entry(variant, loop, x64, grad64, "fp32")
    return entries


def measure_shape(
    d: int, tokens: int, variants: list[Variant], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """All rows of one (d, tokens) cell: interleaved timings, then saved bytes, ops and memory per entry."""
    entries = build_entries(d, tokens, variants, args, device)
    tasks: dict[str, Callable[[], object]] = {}
    for label, entry in entries.items():
        tasks[f"{label}|fwd"] = entry.forward
        tasks[f"{label}|fwd+bwd"] = entry.forward_backward
    samples = interleaved(tasks, warmup=args.warmup, repeats=args.repeats, device=device)

    rows = []
    for label, entry in entries.items():
        forward, train = summarize(samples[f"{label}|fwd"]), summarize(samples[f"{label}|fwd+bwd"])
        with saved_bytes(entry.module.parameters()) as saved:
            entry.forward()
        with OpCounter() as ops:
            entry.forward_backward()
            ops_total = ops.count
        with OpCounter() as ops:
            entry.forward()
            ops_forward = ops.count
        trainable_bytes = parameter_bytes(entry.trainable)
        if device.type == "cuda":
            memory = peak_memory(entry.forward_backward, device)
        else:
            memory = {"kind": "cpu_estimate_saved_plus_params_and_grads", "bytes": saved.total + 2 * trainable_bytes}
        rows.append(
            {
                "d": d,
                "tokens": tokens,
                "label": label,
                "method": entry.variant.method,
                "settings": {k: v for k, v in entry.variant.settings.items() if k != "target_modules"},
                "fp64_pair": label != entry.variant.label,
                "trainable_parameters": entry.variant.trainable,
                "forward": forward,
                "forward_backward": train,
                "saved_bytes": saved.total,
                "memory": memory,
                "ops_forward": ops_forward,
                "ops_forward_backward": ops_total,
            }
        )
    add_ratios(rows, args.baseline)
    return rows


def add_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """Time and memory ratios of the regular rows against the frozen linear and the baseline; for fp64 loop rows,
    against the fast path in fp64 (the only like-for-like comparison)."""
    by_label = {row["label"]: row for row in rows}
    frozen, base = by_label.get(FROZEN), by_label.get(baseline)
    for row in rows:
        for kind in ("forward", "forward_backward"):
            value = row[kind]["median_s"]
            if row["fp64_pair"]:
                fast = by_label[row["label"].replace("[loop, fp64]", "[fast, fp64]")]
                row[f"{kind}_vs_fast_fp64"] = ratio(value, fast[kind]["median_s"])
                continue
            row[f"{kind}_vs_frozen"] = ratio(value, frozen[kind]["median_s"]) if frozen else None
            row[f"{kind}_vs_baseline"] = ratio(value, base[kind]["median_s"]) if base else None
        if not row["fp64_pair"]:
            row["memory_vs_baseline"] = ratio(row["memory"]["bytes"], base["memory"]["bytes"]) if base else None


def shape_markdown(rows: list[dict[str, Any]], variants: dict[str, Variant], baseline: str) -> str:
    regular = [row for row in rows if not row["fp64_pair"]]
    table = [
        {
            "variant": row["label"],
            "settings": shown_settings(variants[row["label"]]) if row["method"] else "",
            "params": f"{row['trainable_parameters']:,}",
            "fwd": fmt_ms(row["forward"]["median_s"]),
            "fb": fmt_ms(row["forward_backward"]["median_s"]),
            "fb_frozen": fmt_ratio(row["forward_backward_vs_frozen"]),
            "fb_base": fmt_ratio(row["forward_backward_vs_baseline"]),
            "fwd_base": fmt_ratio(row["forward_vs_baseline"]),
            "spread": f"{row['forward_backward']['spread']:.2f}",
            "saved": fmt_mib(row["saved_bytes"]),
            "memory": fmt_mib(row["memory"]["bytes"]),
            "mem_base": fmt_ratio(row["memory_vs_baseline"]),
            "ops": f"{row['ops_forward']} / {row['ops_forward_backward']}",
        }
        for row in regular
    ]
    columns = [
        ("variant", "variant"),
        ("settings", "settings"),
        ("trainable", "params"),
        ("fwd ms", "fwd"),
        ("fwd+bwd ms", "fb"),
        ("fwd+bwd / frozen", "fb_frozen"),
        (f"fwd+bwd / {baseline}", "fb_base"),
        (f"fwd / {baseline}", "fwd_base"),
        ("fwd+bwd spread", "spread"),
        ("saved MiB", "saved"),
        ("memory MiB", "memory"),
        (f"memory / {baseline}", "mem_base"),
        ("aten ops fwd / fwd+bwd", "ops"),
    ]
    text = markdown_table(table, columns)
    pairs = [row for row in rows if row["fp64_pair"] and "[loop" in row["label"]]
    if pairs:
        loop_table = []
        for loop in pairs:
            fast = next(r for r in rows if r["label"] == loop["label"].replace("[loop, fp64]", "[fast, fp64]"))
            loop_table.append(
                {
                    "variant": loop["label"].removesuffix(" [loop, fp64]"),
                    "fwd": f"{fmt_ms(loop['forward']['median_s'])} / {fmt_ms(fast['forward']['median_s'])}",
                    "fwd_ratio": fmt_ratio(loop["forward_vs_fast_fp64"]),
                    "fb": f"{fmt_ms(loop['forward_backward']['median_s'])} / "
                    f"{fmt_ms(fast['forward_backward']['median_s'])}",
                    "fb_ratio": fmt_ratio(loop["forward_backward_vs_fast_fp64"]),
                    "saved": f"{fmt_mib(loop['saved_bytes'])} / {fmt_mib(fast['saved_bytes'])}",
                    "ops": f"{loop['ops_forward_backward']} / {fast['ops_forward_backward']}",
                }
            )
        text += "\n\nLoop form (tests/reference.py, fp64 as written) against the fast path converted to fp64:\n\n"
        text += markdown_table(
            loop_table,
            [
                ("variant", "variant"),
                ("fwd ms loop / fast", "fwd"),
                ("fwd loop / fast", "fwd_ratio"),
                ("fwd+bwd ms loop / fast", "fb"),
                ("fwd+bwd loop / fast", "fb_ratio"),
                ("saved MiB loop / fast", "saved"),
                ("aten ops fwd+bwd loop / fast", "ops"),
            ],
        )
    return text


NOTES = """\
How to read: times are medians over interleaved rounds (`spread` = (p90 - min) / median of the forward+backward
samples; above about 0.1 the machine was busy and ratios carry that much noise). `fwd+bwd / frozen` is the cost
over the frozen linear's forward plus input-gradient backward; `/ {baseline}` compares with PEFT LoRA at the
matched budget. `saved MiB` counts the distinct tensors kept for backward (the input x included, parameters
excluded). `memory MiB` is {memory_kind}. At d <= 512 per-op overhead dominates and ratios are not meaningful
(performance.md §3.3)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--shapes",
        type=comma_list,
        default=None,
        help=f"DxTOKENS cells, d_in = d_out (CPU default: {','.join(CPU_SHAPES)})",
    )
    parser.add_argument("--quick", action="store_true", help="1024x512 only, 3 repeats")
    parser.add_argument(
        "--full", action="store_true", help="the issue's grid d 1024,4096 x tokens 512,2048,8192 (the default on CUDA)"
    )
    parser.add_argument("--variants", type=variant_list, default=DEFAULT_VARIANTS, help="space-separated specs")
    parser.add_argument(
        "--loop-forms",
        type=variant_list,
        default=None,
        help="variants (of a method with a loop form) that also get the fp64 loop/fast rows; '' for none "
        f"(default on CPU: {', '.join(DEFAULT_LOOP_FORMS)}; CPU only, the loop forms allocate on the CPU)",
    )
    parser.add_argument("--baseline", default="peft_lora", help="variant the ratios divide by")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on CUDA")
    args = parser.parse_args(argv)
    if any(spec.endswith(MERGED) for spec in args.variants):
        parser.error(f"--variants: {MERGED} variants are for bench/inference.py only")
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    cuda = args.device.startswith("cuda")
    if args.shapes is None:
        args.shapes = ["1024x512"] if args.quick else FULL_SHAPES if args.full or cuda else CPU_SHAPES
    try:
        args.cells = [parse_pair(shape) for shape in args.shapes]
    except ValueError as error:
        parser.error(f"--shapes: {error}")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20 if cuda else 5)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.loop_forms is None:
        args.loop_forms = [] if cuda else DEFAULT_LOOP_FORMS
    elif args.loop_forms and cuda:
        parser.error("--loop-forms: tests/reference.py's loop forms allocate on the CPU; use them with --device cpu")
    for label in args.loop_forms:
        method = label.partition(":")[0]
        if method not in LOOP_FORMS:
            parser.error(f"--loop-forms {label!r}: no loop form for {method!r} (have: {', '.join(LOOP_FORMS)})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = start(args)
    record = run_record(NAME, args, device)
    budgets, results, sections = {}, [], []
    for d in sorted({d for d, _ in args.cells}):
        variants, budget = resolve_variants(OneLinear(d, d), args.variants, [TARGET], args.dropout, args.budget_from)
        budgets[d] = budget
        by_label = {v.label: v for v in variants}
        for tokens in [tokens for cell_d, tokens in args.cells if cell_d == d]:
            rows = measure_shape(d, tokens, variants, args, device)
            results += rows
            header = f"## d = {d}, {tokens} tokens ({args.dtype}, budget {budget['trainable_parameters']:,})"
            parts = (header, skipped_markdown(budget), shape_markdown(rows, by_label, args.baseline))
            sections.append("\n\n".join(part for part in parts if part))
            print(f"[{NAME}] d={d} tokens={tokens}: {len(rows)} rows", flush=True)
    record["budgets"] = budgets
    record["results"] = results
    memory_kind = (
        "the CUDA peak allocated during one forward+backward"
        if device.type == "cuda"
        else "a CPU estimate: saved bytes + trainable parameters + their gradients"
    )
    body = "\n\n".join([NOTES.format(baseline=args.baseline, memory_kind=memory_kind), *sections])
    json_path, md_path = write_results(args.out, NAME, record, body)
    print(f"[{NAME}] wrote {json_path} and {md_path}")
    return record


if __name__ == "__main__":
    main()
