"""Training-step benchmark: a full step (forward, backward, AdamW) per method, against PEFT LoRA and the frozen floor.

    python bench/train_step.py                  # CPU: both models, 4x256, fp32, no checkpointing (~15 min)
    python bench/train_step.py --quick          # CPU: both models, 1x256, fp32, no checkpointing, 2 repeats
    python bench/train_step.py --precisions fp32,bf16 --checkpointing off,on        # the CPU grid (~1 h)
    python bench/train_step.py --device cuda    # SmolLM2-135M and LLaMA-7B: 4x256, 8x1024, bf16 and fp32, both
    python bench/train_step.py --models llama-1b --llama-layers 22 --batches 4x256 --precisions bf16

Models: (a) the default SmolLM2-135M (moelora.models, offline) and (b) a LLaMA-shaped model with random weights.
On CPU (b) is TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocabulary 32000) cut to
2 layers: the full 22 layers take about a minute per step on a 2-core VM, too slow to interleave 8 variants
(`--llama-layers 22` runs it whole); every layer has the same shape, so the per-layer adapter cost and its ratio
to the frozen layers are those of the full depth, diluted only by the larger share of the LM head. On CUDA (b)
is the LLaMA-7B shape, all 32 layers.

A cell is (model, precision, gradient checkpointing, batch). In a cell every variant is a copy of one base model
sharing its frozen weights, with its own adapter and AdamW; the variants run interleaved round-robin, one step
each per round, warm-up rounds discarded, the median of the timed rounds reported. A step is forward with
labels = input ids (moelora's auxiliary losses included, as in training), backward, optimizer step and
zero_grad; dropout is active. Precision fp32: fp32 weights, no autocast; bf16: frozen weights stored in bf16 and
bf16 autocast, adapter master weights in fp32 (what PEFT and moelora do). Gradient checkpointing is the
non-reentrant kind moelora's trainer uses.

The frozen floor (variant `frozen`) is the same model without any adapter, with its input embeddings requiring
grad (`enable_input_require_grads`), so backward computes every layer's input gradient and no weight gradient:
exactly the frozen-base cost of performance.md §3.1 that any adapter adds to; it has no optimizer. (A trainable
final norm would backpropagate through the LM head only, not through the layers, and is not a floor.)

Per variant and cell: step time (median, spread), tokens/s, ratios to the baseline (PEFT LoRA at the matched
budget) and to the floor; bytes saved for backward in one forward (deterministic); peak memory of one step
above the memory before it (CUDA: max allocated; CPU: peak RSS delta, approximate). Issue 17's targets are
checked for every adapter variant but the baseline's own method in a table at the end, the equal-rank one where
the run has the baseline at the variant's rank (`peft_lora:r=8` for D2MoRA's r 8).
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
from common import (
    FROZEN,
    LLAMA_SHAPES,
    MERGED,
    PRECISIONS,
    QKV,
    Variant,
    add_common_arguments,
    attach,
    autocast,
    build_model,
    comma_list,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    interleaved,
    markdown_table,
    model_record,
    parse_pair,
    peak_memory,
    random_tokens,
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
from peft import PeftModel
from torch import nn

from moelora.models import DEFAULT_MODEL

NAME = "train_step"
#: Issue 17's methods (top-2 MoE-LoRA is `molora:top_k=2`), PEFT LoRA at D2MoRA's rank for the equal-rank target.
DEFAULT_VARIANTS = [
    FROZEN, "lora", "peft_lora", "peft_lora:r=8", "d2mora", "hydralora", "comol", "molora", "molora:top_k=2",
    "teamlora", "moa_soft",
]  # fmt: skip
#: The targets of issue 17: step time against PEFT LoRA at the matched budget and at the variant's rank, against
#: the floor, and memory.
STEP_TARGET = 1.00
EQUAL_RANK_TARGET = 1.05
FLOOR_TARGET = 1.10
MEMORY_TARGET = 1.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILED = " +compile"


class Trainee:
    """One variant ready to train: its model in training mode, its AdamW over the trainable parameters (none for
    the frozen floor, whose input embeddings require grad instead so backward runs through every layer)."""

    def __init__(
        self, variant: Variant, model: nn.Module, precision: str, device: torch.device, compiled: bool = False
    ) -> None:
        self.variant, self.model, self.precision, self.device = variant, model.train(), precision, device
        self.hf_model = model.get_base_model() if isinstance(model, PeftModel) else model
        # the first (warm-up) step compiles; the timed steps reuse the graph (same batch shape every step)
        self.forward = torch.compile(model) if compiled else model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        if variant.method is None:
            self.hf_model.enable_input_require_grads()

    def set_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf_model.activation_checkpointing_disable()

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.forward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss

    def step(self, ids: torch.Tensor) -> None:
        self.loss(ids).backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.clear_gradients()

    def clear_gradients(self) -> None:
        """Drop the gradients (also those a step interrupted by running out of memory left behind)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


def measure_cell(
    trainees: dict[str, Trainee], ids: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Interleaved step timings of every variant on one batch, then one more step of each, untimed, for its peak
    memory and the bytes its forward saves for backward."""
    samples = interleaved(
        {label: partial(trainee.step, ids) for label, trainee in trainees.items()},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    rows = []
    for label, trainee in trainees.items():
        with saved_bytes(trainee.model.parameters()) as saved:  # counts the forward of the measured step
            memory = peak_memory(partial(trainee.step, ids), device)
        step = summarize(samples[label])
        rows.append(
            {
                "label": label,
                "variant": trainee.variant.label,
                "method": trainee.variant.method,
                "settings": {k: v for k, v in trainee.variant.settings.items() if k != "target_modules"},
                "trainable_parameters": trainee.variant.trainable,
                "step": step,
                "tokens_per_s": ids.numel() / step["median_s"],
                "saved_bytes": saved.total,
                "memory": memory,
            }
        )
    return rows


def add_ratios(rows: list[dict[str, Any]], baseline: str, device: torch.device) -> None:
    """Ratios to the baseline, to the baseline's method at the row's rank (when the run has it) and to the floor,
    and the targets verdict for every adapter of another method than the baseline's. The memory target is judged
    on the CUDA peak on a GPU and on saved bytes on CPU (the CPU RSS delta is too noisy to judge)."""
    by_label = {row["label"]: row for row in rows}
    base, floor = by_label.get(baseline), by_label.get(FROZEN)
    base_method = base["method"] if base else None
    at_rank = {row["settings"].get("r"): row for row in rows if base and row["method"] == base_method}
    for row in rows:
        row["step_vs_baseline"] = ratio(row["step"]["median_s"], base["step"]["median_s"]) if base else None
        equal = at_rank.get(row["settings"].get("r"))
        row["step_vs_equal_rank"] = ratio(row["step"]["median_s"], equal["step"]["median_s"]) if equal else None
        row["step_vs_frozen"] = ratio(row["step"]["median_s"], floor["step"]["median_s"]) if floor else None
        row["saved_vs_baseline"] = ratio(row["saved_bytes"], base["saved_bytes"]) if base else None
        row["memory_vs_baseline"] = ratio(row["memory"]["bytes"], base["memory"]["bytes"]) if base else None
        if row["method"] not in (None, base_method):
            memory = row["memory_vs_baseline"] if device.type == "cuda" else row["saved_vs_baseline"]
            row["targets"] = {
                "step_vs_baseline": verdict(row["step_vs_baseline"], STEP_TARGET),
                "step_vs_equal_rank": verdict(row["step_vs_equal_rank"], EQUAL_RANK_TARGET),
                "step_vs_frozen": verdict(row["step_vs_frozen"], FLOOR_TARGET),
                "memory_vs_baseline": verdict(memory, MEMORY_TARGET),
            }


def verdict(value: float | None, limit: float) -> dict[str, Any]:
    """{value, limit, met, over}: `over` is how far above the limit, as a fraction of it (0 when met)."""
    if value is None:
        return {"value": None, "limit": limit, "met": None, "over": None}
    return {"value": value, "limit": limit, "met": value <= limit, "over": max(0.0, value / limit - 1.0)}


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every cell of one model: precisions outermost (the shared base is converted once per precision), then
    gradient checkpointing, then batches."""
    layers = args.llama_layers if name in LLAMA_SHAPES else None
    base = build_model(name, dtype=DTYPES[args.precisions[0]], device=device, layers=layers)
    variants, budget = resolve_variants(base, args.variants, args.targets, args.dropout, args.budget_from)
    cells = []
    for precision in args.precisions:
        base.to(DTYPES[precision])
        trainees = {
            v.label + (COMPILED if compiled else ""): Trainee(
                v, attach(base, v, "CAUSAL_LM", args.seed), precision, device, compiled
            )
            for compiled in args.compile
            for v in variants
        }
        for checkpointing in args.checkpointing:
            for trainee in trainees.values():
                trainee.set_checkpointing(checkpointing)
            for batch in args.batch_shapes:
                ids = random_tokens(batch, base.config.vocab_size, device, args.seed)
                cell = {"precision": precision, "checkpointing": checkpointing, "batch": list(batch)}
                try:
                    rows = measure_cell(trainees, ids, args, device)
                except torch.OutOfMemoryError as error:
                    for trainee in trainees.values():
                        trainee.clear_gradients()
                    cells.append({**cell, "error": f"out of memory: {str(error).splitlines()[0]}"})
                    print(f"[{NAME}] {name} {cell}: out of memory", flush=True)
                    continue
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                add_ratios(rows, args.baseline, device)
                cells.append({**cell, "rows": rows})
                print(f"[{NAME}] {name} {cell}: done", flush=True)
        del trainees
        gc.collect()
    return {"model": model_record(name, base), "budget": budget, "variants": variants, "cells": cells}


def cell_title(cell: dict[str, Any]) -> str:
    size, length = cell["batch"]
    checkpointing = "gradient checkpointing" if cell["checkpointing"] else "no checkpointing"
    return f"{cell['precision']}, {checkpointing}, batch {size}x{length}"


def model_markdown(result: dict[str, Any], baseline: str, memory_kind: str) -> str:
    model, budget = result["model"], result["budget"]
    by_label = {v.label: v for v in result["variants"]}
    lines = [
        f"## {model['name']}",
        "",
        f"{'random weights, ' if model['random_weights'] else ''}hidden {model['hidden_size']}, MLP "
        f"{model['intermediate_size']}, {model['layers']} layers, {model['attention_heads']} heads "
        f"({model['kv_heads']} KV), vocabulary {model['vocab_size']}, {model['parameters']:,} parameters. "
        f"Adapters on {', '.join(budget['targets'])}; budget {budget['trainable_parameters']:,} trainable "
        f"parameters ({budget['reference']}).",
    ]
    if budget["skipped"]:
        lines += ["", skipped_markdown(budget)]
    for cell in result["cells"]:
        lines += ["", f"### {cell_title(cell)}", ""]
        if "error" in cell:
            lines.append(f"Not measured: {cell['error']}")
            continue
        table = [
            {
                "variant": row["label"],
                "settings": shown_settings(by_label[row["variant"]]) if row["method"] else "",
                "params": f"{row['trainable_parameters']:,}",
                "step": fmt_ms(row["step"]["median_s"]),
                "tps": f"{row['tokens_per_s']:.0f}",
                "vs_base": fmt_ratio(row["step_vs_baseline"]),
                "vs_floor": fmt_ratio(row["step_vs_frozen"]),
                "spread": f"{row['step']['spread']:.2f}",
                "saved": fmt_mib(row["saved_bytes"]),
                "saved_base": fmt_ratio(row["saved_vs_baseline"]),
                "memory": fmt_mib(row["memory"]["bytes"]),
                "mem_base": fmt_ratio(row["memory_vs_baseline"]),
            }
            for row in cell["rows"]
        ]
        columns = [
            ("variant", "variant"),
            ("settings", "settings"),
            ("trainable", "params"),
            ("step ms", "step"),
            ("tokens/s", "tps"),
            (f"step / {baseline}", "vs_base"),
            ("step / frozen", "vs_floor"),
            ("spread", "spread"),
            ("saved MiB", "saved"),
            (f"saved / {baseline}", "saved_base"),
            (f"{memory_kind} MiB", "memory"),
            (f"{memory_kind} / {baseline}", "mem_base"),
        ]
        lines.append(markdown_table(table, columns))
    return "\n".join(lines)


def targets_markdown(results: list[dict[str, Any]], baseline: str) -> str:
    """One line per target method and cell: each ratio, and whether it meets its target or by how much it misses."""

    def shown(check: dict[str, Any]) -> str | None:
        if check["value"] is None:
            return None
        state = "met" if check["met"] else f"missed by {100 * check['over']:.1f}%"
        return f"{check['value']:.3f} (<= {check['limit']:.2f}: {state})"

    table = []
    for result in results:
        for cell in result["cells"]:
            for row in cell.get("rows", []):
                if "targets" not in row:
                    continue
                targets = row["targets"]
                table.append(
                    {
                        "model": result["model"]["name"],
                        "cell": cell_title(cell),
                        "variant": row["label"],
                        "base": shown(targets["step_vs_baseline"]),
                        "equal_rank": shown(targets["step_vs_equal_rank"]),
                        "floor": shown(targets["step_vs_frozen"]),
                        "memory": shown(targets["memory_vs_baseline"]),
                    }
                )
    columns = [
        ("model", "model"),
        ("cell", "cell"),
        ("variant", "variant"),
        (f"step / {baseline}", "base"),
        (f"step / {baseline} at equal rank", "equal_rank"),
        ("step / frozen floor", "floor"),
        (f"memory / {baseline}", "memory"),
    ]
    return "## Targets (issue 17)\n\n" + markdown_table(table, columns)


NOTES = """\
How to read: `step / {baseline}` divides by PEFT LoRA at the matched budget, `step / frozen` by the frozen floor
(forward plus input-gradient backward through the same model, no adapter). `spread` = (p90 - min) / median of the
step samples: above about 0.1 the machine was busy and the ratios carry that much noise. `saved MiB` counts the
distinct tensors one forward keeps for backward (parameters excluded; deterministic). `{memory_kind} MiB` is
{memory_text}. In the targets table the memory ratio is {target_memory}."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--models",
        type=comma_list,
        default=None,
        help=f"{DEFAULT_MODEL}, a random LLaMA shape ({', '.join(LLAMA_SHAPES)}) or a model folder "
        "(default: smollm2-135m,llama-1b on CPU, smollm2-135m,llama-7b on CUDA)",
    )
    parser.add_argument(
        "--llama-layers", type=int, default=None, help="depth of the random LLaMA shapes (default: 2 on CPU, full)"
    )
    parser.add_argument("--batches", type=comma_list, default=None, help="BxL list (default 4x256; CUDA 4x256,8x1024)")
    parser.add_argument(
        "--precisions", type=comma_list, default=None, help="fp32 and/or bf16, in run order (CPU fp32; CUDA bf16,fp32)"
    )
    parser.add_argument(
        "--checkpointing",
        type=comma_list,
        default=None,
        help="off and/or on: gradient checkpointing (CPU off; CUDA both)",
    )
    parser.add_argument(
        "--compile",
        type=comma_list,
        default=["off"],
        help=f"off and/or on: torch.compile each variant (compiled ones are labelled '{COMPILED.strip()}', "
        "timed beside the eager ones; the warm-up step compiles)",
    )
    parser.add_argument("--quick", action="store_true", help="1x256, fp32, no checkpointing, 2 repeats")
    parser.add_argument("--variants", type=variant_list, default=DEFAULT_VARIANTS, help="space-separated specs")
    parser.add_argument("--targets", type=comma_list, default=list(QKV), help="adapted modules (default q,k,v)")
    parser.add_argument("--baseline", default="peft_lora", help="variant the ratios divide by")
    args = parser.parse_args(argv)
    if any(spec.endswith(MERGED) for spec in args.variants):
        parser.error(f"--variants: {MERGED} variants are for bench/inference.py only")
    cuda = args.device.startswith("cuda")
    args.models = args.models or [DEFAULT_MODEL, "llama-7b" if cuda else "llama-1b"]
    if args.llama_layers is None and not cuda:
        args.llama_layers = 2
    args.batches = args.batches or (["1x256"] if args.quick else ["4x256", "8x1024"] if cuda else ["4x256"])
    args.precisions = args.precisions or (["bf16", "fp32"] if cuda and not args.quick else ["fp32"])
    checkpointing = args.checkpointing or (["off", "on"] if cuda and not args.quick else ["off"])
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10 if cuda else 3)
    try:
        args.batch_shapes = [parse_pair(batch) for batch in args.batches]
    except ValueError as error:
        parser.error(f"--batches: {error}")
    for precision in args.precisions:
        if precision not in PRECISIONS:
            parser.error(f"--precisions: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if set(checkpointing) - {"off", "on"}:
        parser.error("--checkpointing: expected off and/or on")
    args.checkpointing = [value == "on" for value in checkpointing]
    if not args.compile or set(args.compile) - {"off", "on"}:
        parser.error("--compile: expected off and/or on")
    args.compile = [value == "on" for value in args.compile]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = start(args)
    record = run_record(NAME, args, device)
    results = [run_model(name, args, device) for name in args.models]
    cuda = device.type == "cuda"
    memory_kind = "peak" if cuda else "RSS delta"
    notes = NOTES.format(
        baseline=args.baseline,
        memory_kind=memory_kind,
        memory_text="the CUDA peak allocated during one step above the memory allocated before it"
        if cuda
        else "the peak resident set of one step above the resident set before it, after malloc_trim: approximate "
        "(page granularity; everything the process touches counts)",
        target_memory="the CUDA peak's" if cuda else "the saved-bytes ratio (the RSS delta is too noisy to judge)",
    )
    body = "\n\n".join(
        [
            notes,
            *(model_markdown(r, args.baseline, memory_kind) for r in results),
            targets_markdown(results, args.baseline),
        ]
    )
    record["results"] = [{**result, "variants": [asdict(v) for v in result["variants"]]} for result in results]
    json_path, md_path = write_results(args.out, NAME, record, body)
    print(f"[{NAME}] wrote {json_path} and {md_path}")
    return record


if __name__ == "__main__":
    main()
