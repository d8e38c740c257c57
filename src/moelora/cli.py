"""`moelora` command line: train, eval, quickstart."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import BUNDLED, load_config, recipe_path, resolve_test_files
from .methods import METHODS

_EPILOG = "methods:\n" + "\n".join(f"  {m.name:<10} {m.summary}" for m in METHODS.values())


def _add_run_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    parser.add_argument("config", nargs=None if config_required else "?", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.learning_rate=1e-4")
    parser.add_argument("--resume", action="store_true", help="continue the run in training.output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in training.output_dir")
    _add_model_argument(parser)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model ('smollm2-135m', a hub id or a local folder); same as model=..."
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"model={args.model}"] if args.model else [])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora",
        description="Fine-tune causal LMs with Mixture-of-Experts LoRA methods and evaluate them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    train = commands.add_parser(
        "train", help="fine-tune (then evaluate if evaluation.test_files is set)", epilog=_EPILOG, formatter_class=raw
    )
    _add_run_arguments(train, config_required=True)
    quick = commands.add_parser(
        "quickstart",
        help="D2MoRA on the default model and the bundled sample; base vs tuned table",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    quick.add_argument("overrides", nargs="*", help="section.key=value overrides of the quickstart settings")
    quick.add_argument(
        "--overwrite", action="store_true", help="replace a run in training.output_dir that used other data"
    )
    _add_model_argument(quick)
    budget = commands.add_parser(
        "budget",
        help="per method, the rank closest to a trainable-parameter budget without exceeding it",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    budget.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', a hub id or a local folder")
    budget.add_argument("--params", required=True, help="the budget: 35.8M, 800k, 45613056, ...")
    budget.add_argument(
        "--targets", default="q,k,v", help="comma-separated target modules; q,k,v,o,gate,up,down mean *_proj"
    )
    budget.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    budget.add_argument(
        "--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
        help="fix a structural field, e.g. d2mora.num_up_experts=4 (repeatable)",
    )  # fmt: skip
    budget.add_argument("--max-rank", type=int, default=1024)
    evaluate = commands.add_parser("eval", help="evaluate a base model or a saved adapter")
    evaluate.add_argument("--model", default=None, help="base model: 'smollm2-135m', a hub id or a local folder")
    evaluate.add_argument("--adapter", default=None, help="adapter folder saved by `moelora train`")
    evaluate.add_argument(
        "--test", action="append", default=[], metavar="TASK=PATH", help="test file (repeatable); default: bundled"
    )
    evaluate.add_argument("--protocol", action="append", choices=["likelihood", "generate"], default=None)
    evaluate.add_argument("--max-items", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam 4")
    evaluate.add_argument("--output-dir", default=None)
    evaluate.add_argument(
        "--dtype", default="fp32", help="base-model weights: fp32 | bf16 | fp16 (bf16 logits score more coarsely)"
    )
    return parser


def _test_files(specs: list[str]) -> dict[str, str]:
    if not specs:
        return resolve_test_files(BUNDLED)
    files = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--test {spec!r}: expected TASK=PATH")
        files[task] = path
    return files


def run_evaluations(config, model, tokenizer, output_dir: Path, label: str, trainable: int | None):
    """Evaluate with every configured protocol; returns the result objects."""
    from .evaluation import evaluate

    results = []
    for protocol in config.evaluation.protocols:
        max_items = config.evaluation.max_items
        if protocol == "generate" and config.evaluation.generate_max_items is not None:
            max_items = config.evaluation.generate_max_items
        results.append(
            evaluate(
                model,
                tokenizer,
                resolve_test_files(config.evaluation.test_files),
                protocol=protocol,
                batch_size=config.evaluation.batch_size,
                max_items=max_items,
                num_beams=config.evaluation.num_beams,
                max_new_tokens=config.evaluation.max_new_tokens,
                output_dir=output_dir / f"eval_{label}",
                metadata={"label": label, "model": config.model, "method": label, "trainable_parameters": trainable},
            )
        )
    return results


def command_train(config, resume: bool, overwrite: bool) -> int:
    from accelerate import PartialState

    from .evaluation import results_to_markdown
    from .models import load_model_and_tokenizer, parse_dtype
    from .training import build_adapter_config, check_output_dir, train

    started = time.perf_counter()
    # A bad adapter field, dtype or output folder fails before the model loads.
    build_adapter_config(config.method, config.adapter)
    dtype = parse_dtype(config.model_dtype)
    check_output_dir(config, resume=resume, overwrite=overwrite)
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=dtype)
    result = train(config, model, tokenizer, resume=resume, overwrite=overwrite)
    metrics = result.metrics
    print(
        f"trained {config.method} in {metrics['train_runtime']:.0f}s: {metrics['tokens_seen']:,} tokens, "
        f"{metrics['train_tokens_per_second']:.0f} tokens/s, train loss {metrics.get('train_loss', float('nan')):.4f}"
    )
    if not config.evaluation.test_files or not PartialState().is_main_process:
        return 0  # under torchrun / accelerate launch, the main process evaluates
    rows = []
    result.model.eval()
    if config.evaluation.evaluate_base_model:
        with result.model.disable_adapter():
            rows += run_evaluations(config, result.model, tokenizer, result.output_dir, "base", 0)
    rows += run_evaluations(
        config, result.model, tokenizer, result.output_dir, config.method, metrics["trainable_parameters"]
    )
    table = results_to_markdown(rows)
    (result.output_dir / "results.md").write_text(table + "\n")
    print(table)
    print(f"total wall time {time.perf_counter() - started:.0f}s; results in {result.output_dir}")
    return 0


def command_eval(args) -> int:
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    from .evaluation import evaluate, results_to_markdown
    from .methods import method_name_of
    from .models import DEFAULT_MODEL, load_model_and_tokenizer, parse_dtype

    dtype = parse_dtype(args.dtype, "--dtype")
    model_name = args.model
    if model_name is None and args.adapter:
        model_name = PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    model, tokenizer = load_model_and_tokenizer(model_name or DEFAULT_MODEL, dtype=dtype)
    label, trainable = "base", 0
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
        label = method_name_of(model.peft_config["default"])
        trainable = sum(weight.numel() for weight in get_peft_model_state_dict(model).values())
    model.eval()
    results = [
        evaluate(
            model,
            tokenizer,
            _test_files(args.test),
            protocol=protocol,
            batch_size=args.batch_size,
            max_items=args.max_items,
            num_beams=1 if args.greedy else 4,
            output_dir=Path(args.output_dir) if args.output_dir else None,
            metadata={"label": label, "model": model_name, "method": label, "trainable_parameters": trainable},
        )
        for protocol in args.protocol or ["likelihood"]
    ]
    print(results_to_markdown(results))
    return 0


_PROJECTIONS = {"q", "k", "v", "o", "gate", "up", "down"}


def command_budget(args) -> int:
    import yaml

    from .budget import budget_markdown, budget_table, parse_count

    budget = parse_count(args.params)
    targets = [f"{t}_proj" if t in _PROJECTIONS else t for t in args.targets.split(",") if t]
    settings: dict[str, dict] = {}
    for spec in args.set:
        key, sep, value = spec.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {spec!r}: expected METHOD.FIELD=VALUE")
        settings.setdefault(method, {})[name] = yaml.safe_load(value)
    methods = args.methods.split(",") if args.methods else None
    rows = budget_table(args.model, budget, targets, methods, settings, max_rank=args.max_rank)
    print(budget_markdown(rows, budget))
    return 0


def _replaceable_quickstart(config) -> bool:
    """The quickstart replaces its own earlier runs (trained on the bundled sample, minutes to redo), never a run
    on other data that an override pointed it at."""
    from .training import RUN_CONFIG_NAME

    saved = Path(config.training.output_dir) / RUN_CONFIG_NAME
    return saved.is_file() and load_config(saved).data.train_files == [BUNDLED]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            return command_eval(args)
        if args.command == "budget":
            return command_budget(args)
        if args.command == "quickstart":
            config = load_config(recipe_path("quickstart"), _overrides(args))
            return command_train(config, resume=False, overwrite=args.overwrite or _replaceable_quickstart(config))
        config = load_config(args.config, _overrides(args))
        return command_train(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"moelora: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
