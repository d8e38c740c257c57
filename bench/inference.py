"""Inference benchmark: prefill throughput and decode latency, merged LoRA against unmerged LoRA and every method.

    python bench/inference.py                   # SmolLM2-135M on CPU: prefill 1x512, decode 1x128 + 32 tokens
    python bench/inference.py --quick           # prefill 1x128, decode 1x32 + 8 tokens, 2 repeats
    python bench/inference.py --device cuda     # prefill 1x2048, decode at batch 1 and 16, bf16 weights

Variants, all on the default model (SmolLM2-135M, moelora.models) at the matched budget on q, k, v:
`peft_lora@merged` (PEFT LoRA merged into the base weights with merge_and_unload: a plain model, the cost floor
of any adapter at inference), and every method that adapts plain linears, unmerged (PEFT LoRA and moelora's
LoRA included, so the unmerged-LoRA overhead is visible next to the MoE methods, which cannot merge because
their update depends on the token through routers). `@merged` after any mergeable variant merges it; `frozen`
adds the model without adapter. A method the model cannot take is skipped, with its reason in the results.

Measured per variant, in eval mode (no dropout) under torch.inference_mode, interleaved round-robin with the
other variants, median of the timed rounds:

- prefill: one forward over a BxL batch of random tokens building the KV cache; reported as tokens/s;
- decode: after an untimed prefill of the prompt, `new_tokens` single-token forwards with the KV cache; reported
  as ms per decode step (per token of each sequence in the batch).

Ratios divide by the baseline (`peft_lora@merged`). Weights are fp32 on CPU and bf16 on CUDA (`--dtype`); the
adapters keep fp32 weights (PEFT's and moelora's default), so their branch runs in fp32 on an up-cast input.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
from common import (
    LLAMA_SHAPES,
    MERGED,
    QKV,
    Variant,
    add_common_arguments,
    attach,
    build_model,
    comma_list,
    dense_methods,
    fmt_ms,
    fmt_ratio,
    interleaved,
    markdown_table,
    model_record,
    parse_pair,
    random_tokens,
    ratio,
    resolve_variants,
    run_record,
    shown_settings,
    skipped_markdown,
    start,
    summarize,
    synchronize,
    variant_list,
    write_results,
)
from torch import nn

from moelora.models import DEFAULT_MODEL

NAME = "inference"
DEFAULT_VARIANTS = [f"peft_lora{MERGED}", *dense_methods()]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_variant(base: nn.Module, variant: Variant, seed: int) -> nn.Module:
    """The variant in eval mode; a merged one is built on its own full copy of the base (merging writes into the
    base weights, which the other variants share) and unloaded to a plain model."""
    if not variant.merged:
        return attach(base, variant, "CAUSAL_LM", seed).eval()
    return attach(copy.deepcopy(base), variant, "CAUSAL_LM", seed).merge_and_unload().eval()


def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True)


def decode(model: nn.Module, prompt: torch.Tensor, new: torch.Tensor, device: torch.device) -> float:
    """Seconds per decode step: an untimed prefill of `prompt`, then one cached forward per column of `new` (fixed
    tokens rather than sampled ones, so every variant does the same work)."""
    with torch.inference_mode():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        synchronize(device)
        began = time.perf_counter()
        for index in range(new.shape[1]):
            cache = model(input_ids=new[:, index : index + 1], past_key_values=cache, use_cache=True).past_key_values
        synchronize(device)
        return (time.perf_counter() - began) / new.shape[1]


def measure(
    models: dict[str, nn.Module], vocab_size: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Prefill and decode timings of every variant, each kind interleaved over the variants."""
    results: dict[str, Any] = {"prefill": [], "decode": []}
    for batch in args.prefill_shapes:
        ids = random_tokens(batch, vocab_size, device, args.seed)
        tasks = {label: partial(prefill, model, ids) for label, model in models.items()}
        samples = interleaved(tasks, warmup=args.warmup, repeats=args.repeats, device=device)
        results["prefill"].append({"batch": list(batch), "timings": {k: summarize(v) for k, v in samples.items()}})
    for batch in args.decode_shapes:
        prompt = random_tokens(batch, vocab_size, device, args.seed)
        new = random_tokens((batch[0], args.new_tokens), vocab_size, device, args.seed + 1)
        tasks = {label: partial(decode, model, prompt, new, device) for label, model in models.items()}
        samples = interleaved(tasks, warmup=args.warmup, repeats=args.repeats, device=device)
        results["decode"].append({"batch": list(batch), "timings": {k: summarize(v) for k, v in samples.items()}})
    return results


def markdown(results: dict[str, Any], variants: dict[str, Variant], args: argparse.Namespace) -> str:
    baseline = args.baseline
    columns: list[tuple[str, str]] = [("variant", "variant"), ("settings", "settings"), ("trainable", "params")]
    rows = [
        {
            "variant": label,
            "settings": shown_settings(variant) if variant.method else "",
            "params": f"{variant.trainable:,}",
        }
        for label, variant in variants.items()
    ]
    for entry in results["prefill"]:
        size, length = entry["batch"]
        timings = entry["timings"]
        key = f"prefill_{size}x{length}"
        columns += [
            (f"prefill {size}x{length} tokens/s", key),
            (f"prefill {size}x{length} time / {baseline}", key + "r"),
        ]
        for row in rows:
            median = timings[row["variant"]]["median_s"]
            row[key] = f"{size * length / median:.0f}"
            row[key + "r"] = fmt_ratio(ratio(median, timings[baseline]["median_s"]) if baseline in timings else None)
    for entry in results["decode"]:
        size, length = entry["batch"]
        timings = entry["timings"]
        key = f"decode_{size}x{length}"
        columns += [
            (f"decode b{size} (prompt {length}) ms/step", key),
            (f"decode b{size} / {baseline}", key + "r"),
        ]
        for row in rows:
            median = timings[row["variant"]]["median_s"]
            row[key] = fmt_ms(median)
            row[key + "r"] = fmt_ratio(ratio(median, timings[baseline]["median_s"]) if baseline in timings else None)
    return markdown_table(rows, columns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL}, a random LLaMA shape or a model folder"
    )
    parser.add_argument("--llama-layers", type=int, default=None, help="depth of a random LLaMA shape")
    parser.add_argument("--prefill", type=comma_list, default=None, help="BxL prefill batches (CPU 1x512, CUDA 1x2048)")
    parser.add_argument(
        "--decode", type=comma_list, default=None, help="BxPROMPT decode batches (CPU 1x128, CUDA 1x128,16x128)"
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps per round (default 32)")
    parser.add_argument("--quick", action="store_true", help="prefill 1x128, decode 1x32 + 8 tokens, 2 repeats")
    parser.add_argument("--variants", type=variant_list, default=DEFAULT_VARIANTS, help="space-separated specs")
    parser.add_argument("--targets", type=comma_list, default=list(QKV), help="adapted modules (default q,k,v)")
    parser.add_argument("--baseline", default=f"peft_lora{MERGED}", help="variant the ratios divide by")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="weights (CPU fp32, CUDA bf16)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.prefill = args.prefill or (["1x128"] if args.quick else ["1x2048"] if cuda else ["1x512"])
    args.decode = args.decode or (["1x32"] if args.quick else ["1x128", "16x128"] if cuda else ["1x128"])
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10 if cuda else 3)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.llama_layers is not None and args.model not in LLAMA_SHAPES:
        parser.error("--llama-layers applies to the random LLaMA shapes only")
    try:
        args.prefill_shapes = [parse_pair(batch) for batch in args.prefill]
        args.decode_shapes = [parse_pair(batch) for batch in args.decode]
    except ValueError as error:
        parser.error(f"--prefill/--decode: {error}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = start(args)
    record = run_record(NAME, args, device)
    base = build_model(args.model, dtype=DTYPES[args.dtype], device=device, layers=args.llama_layers)
    resolved, budget = resolve_variants(base, args.variants, args.targets, args.dropout, args.budget_from)
    variants = {variant.label: variant for variant in resolved}
    models = {label: build_variant(base, variant, args.seed) for label, variant in variants.items()}
    results = measure(models, base.config.vocab_size, args, device)
    record.update(
        model=model_record(args.model, base),
        budget=budget,
        variants={label: asdict(variant) for label, variant in variants.items()},
        results=results,
    )
    header = (
        f"Model {args.model} ({args.dtype} weights), adapters on {', '.join(args.targets)} at a budget of "
        f"{budget['trainable_parameters']:,} trainable parameters ({budget['reference']}); {args.new_tokens} decode "
        f"steps per round; medians of {args.repeats} interleaved rounds. Ratios are times divided by {args.baseline}'s "
        "(above 1 = slower)."
    )
    body = "\n\n".join(part for part in (header, skipped_markdown(budget), markdown(results, variants, args)) if part)
    json_path, md_path = write_results(args.out, NAME, record, body)
    print(f"[{NAME}] wrote {json_path} and {md_path}")
    return record


if __name__ == "__main__":
    main()
