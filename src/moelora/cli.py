"""`moelora` command line: train, eval, quickstart, budget, import-d2mora, report, compare, experiment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import BUNDLED, config_keys_help, load_config, recipe_path, resolve_test_files
from .experiment import add_arguments as add_experiment_arguments
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: MOELORA_DEBUG=1)"
    )

    def subcommand(name: str, **settings: object) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], **settings)

    raw = argparse.RawDescriptionHelpFormatter
    train = subcommand(
        "train",
        help="fine-tune (then evaluate if evaluation.test_files is set)",
        epilog=_EPILOG + "\n\n" + config_keys_help(),
        formatter_class=raw,
    )
    _add_run_arguments(train, config_required=True)
    quick = subcommand(
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
    budget = subcommand(
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
    evaluate = subcommand("eval", help="evaluate a base model or a saved adapter")
    evaluate.add_argument("--model", default=None, help="base model: 'smollm2-135m', a hub id or a local folder")
    evaluate.add_argument("--adapter", default=None, help="adapter folder saved by `moelora train`")
    evaluate.add_argument(
        "--test", action="append", default=[], metavar="TASK=PATH", help="test file (repeatable); default: bundled"
    )
    evaluate.add_argument(
        "--protocol", action="append", choices=["likelihood", "generate", "cloze"], default=None,
        help="likelihood (default): the label targets scored | generate: beam search and answer extraction, the "
        "LLM-Adapters protocol | cloze: option texts scored after the bare question, acc and acc_norm (writes "
        "cloze and cloze_norm), for small models and text targets. Repeatable.",
    )  # fmt: skip
    evaluate.add_argument("--max-items", type=int, default=None, help="items per task (default: all)")
    evaluate.add_argument(
        "--subset-seed", type=int, default=None, help="draw the --max-items items at random with this seed"
    )
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam 4")
    evaluate.add_argument("--output-dir", default=None)
    evaluate.add_argument(
        "--dtype", default="fp32", help="base-model weights: fp32 | bf16 | fp16 (bf16 logits score more coarsely)"
    )
    evaluate.add_argument(
        "--harness",
        choices=["moelora", "lm-eval"],
        default="moelora",
        help="the evaluator: moelora's own, or lm-evaluation-harness on the same items (a cross-check)",
    )
    evaluate.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="bitsandbytes base (CUDA)")
    official = subcommand(
        "import-d2mora",
        help="convert an official D2MoRA adapter folder (adapter_config.json + pickled weights) into a moelora one",
    )
    official.add_argument("source", metavar="DIR", help="the official adapter folder (only read)")
    official.add_argument("--out", required=True, help="the moelora adapter folder to write")
    official.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder at --out")
    official.add_argument("--weights", default=None, help="the weights file, when DIR holds several")
    official.add_argument(
        "--base-model", default=None, help="record this base model instead of the checkpoint's base_model_name_or_path"
    )
    report = subcommand(
        "report", help="routing and expert-similarity figures with a Markdown summary, for one run or two side by side"
    )
    report.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="a run (or adapter) folder; a second one is shown beside it"
    )
    report.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report of the first run)")
    report.add_argument(
        "--data", action="append", default=[], metavar="TASK=PATH",
        help="evaluation file to route (repeatable); default: the run's test files, else the bundled sample",
    )  # fmt: skip
    report.add_argument("--limit", type=int, default=50, help="items per task for the routing statistics (default 50)")
    report.add_argument("--no-routing", action="store_true", help="expert similarity only; loads no model")
    report.add_argument("--model", default=None, help="base model (default: the run's)")
    report.add_argument("--dtype", default=None, help="base-model weights: fp32 | bf16 | fp16 (default: the run's)")
    report.add_argument(
        "--layers", default=None, help="comma-separated layers of the expert-matrix figure (default: first, mid, last)"
    )
    compare = subcommand(
        "compare", help="one table (methods x tasks, mean ± std over seeds) and a bar chart of evaluated runs"
    )
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or `moelora eval` output folders")
    compare.add_argument(
        "--out", default="comparison", help="folder for comparison.md and comparison.png (default: ./comparison)"
    )
    compare.add_argument("--protocol", action="append", default=None, help="only this protocol (repeatable)")
    compare.add_argument(
        "--allow-different-items", action="store_true",
        help="compare rows evaluated on different tasks or numbers of items (their accuracies are not comparable)",
    )  # fmt: skip
    experiment = subcommand(
        "experiment",
        help="train and evaluate the runs of an experiment file (seeds, methods, groups), then compare them",
    )
    add_experiment_arguments(experiment)
    return parser


def _task_files(specs: list[str], option: str) -> dict[str, str]:
    files = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"{option} {spec!r}: expected TASK=PATH")
        files[task] = path
    return files


def _test_files(specs: list[str]) -> dict[str, str]:
    return _task_files(specs, "--test") if specs else resolve_test_files(BUNDLED)


def command_train(config, resume: bool, overwrite: bool) -> int:
    from .pipeline import train_and_evaluate

    outcome = train_and_evaluate(config, resume=resume, overwrite=overwrite)
    if outcome is not None:  # under torchrun / accelerate launch, the main process reports
        print(outcome.summary())
    return 0


def command_eval(args) -> int:
    from peft import get_peft_model_state_dict

    from .evaluation import evaluate, results_to_markdown, with_variants
    from .harness import evaluate_with_lm_eval
    from .methods import method_name_of
    from .models import DEFAULT_MODEL, load_adapter, load_model_and_tokenizer, parse_dtype
    from .pipeline import check_writable_folder

    dtype = parse_dtype(args.dtype, "--dtype")
    if args.output_dir:
        check_writable_folder(args.output_dir, "--output-dir")  # before the model loads and the items are scored
    label, trainable = "base", 0
    if args.adapter:
        model, tokenizer = load_adapter(args.adapter, args.model, dtype=dtype, quantization=args.quantization)
        model_name = model.peft_config["default"].base_model_name_or_path
        label = method_name_of(model.peft_config["default"])
        trainable = sum(weight.numel() for weight in get_peft_model_state_dict(model).values())
    else:
        model_name = args.model or DEFAULT_MODEL
        model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype, quantization=args.quantization)
    model.eval()
    evaluator = evaluate_with_lm_eval if args.harness == "lm-eval" else evaluate
    results = [
        variant
        for protocol in args.protocol or ["likelihood"]
        for variant in with_variants(
            evaluator(
                model,
                tokenizer,
                _test_files(args.test),
                protocol=protocol,
                batch_size=args.batch_size,
                max_items=args.max_items,
                subset_seed=args.subset_seed,
                num_beams=1 if args.greedy else 4,
                output_dir=Path(args.output_dir) if args.output_dir else None,
                metadata={"label": label, "model": model_name, "method": label, "trainable_parameters": trainable},
            )
        )
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


def command_import_d2mora(args) -> int:
    from .official import import_d2mora

    imported = import_d2mora(
        args.source, args.out, overwrite=args.overwrite, weights=args.weights, base_model=args.base_model
    )
    print(
        f"imported {imported.weights_file}: {imported.modules} modules, M={imported.num_down_experts} down / "
        f"N={imported.num_up_experts} up experts, r={imported.r}; moelora adapter in {imported.path}"
    )
    return 0


def command_report(args) -> int:
    from .report import report

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    try:
        layers = [int(layer) for layer in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: expected comma-separated layer numbers") from None
    markdown = report(
        args.runs,
        out=args.out,
        data=_task_files(args.data, "--data") or None,
        limit=args.limit,
        routing=not args.no_routing,
        model=args.model,
        dtype=args.dtype,
        layers=layers,
    )
    print(f"report written to {markdown} (figures beside it)")
    return 0


def command_compare(args) -> int:
    from .compare import COMPARISON_NAME, compare

    print(compare(args.runs, out=args.out, protocols=args.protocol, allow_different_items=args.allow_different_items))
    print(f"\nwritten to {Path(args.out) / COMPARISON_NAME}.md and .png")
    return 0


def quickstart_figures(config) -> int:
    """The figures a newcomer looks at first, in the quickstart's run folder: the training curves (written by every
    run) and `moelora report` of the adapter (expert usage per task on a few test items, expert similarity)."""
    from .report import report

    run = Path(config.training.output_dir)
    markdown = report([run], limit=8)
    figures = sorted(str(path) for path in [*run.glob("training_curves.png"), *markdown.parent.glob("*.png")])
    print("figures:\n  " + "\n  ".join(figures))
    return 0


def _replaceable_quickstart(config) -> bool:
    """The quickstart replaces its own earlier runs (trained on the bundled sample, minutes to redo), never a run
    on other data that an override pointed it at."""
    from .training import RUN_CONFIG_NAME

    saved = Path(config.training.output_dir) / RUN_CONFIG_NAME
    return saved.is_file() and load_config(saved).data.train_files == [BUNDLED]


def main(argv: list[str] | None = None) -> int:
    from .pipeline import report_errors

    args = build_parser().parse_args(argv)
    return report_errors(lambda: _run_command(args), debug=args.debug)


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return command_eval(args)
    if args.command == "budget":
        return command_budget(args)
    if args.command == "import-d2mora":
        return command_import_d2mora(args)
    if args.command == "report":
        return command_report(args)
    if args.command == "compare":
        return command_compare(args)
    if args.command == "experiment":
        from .experiment import run_experiment

        summary = run_experiment(
            args.file,
            jobs=args.jobs,
            only=args.only,
            compare_only=args.compare_only,
            overrides=args.overrides,
            output_dir=args.output_dir,
        )
        print(f"\n{summary.read_text()}\nwritten to {summary}")
        return 0
    if args.command == "quickstart":
        config = load_config(recipe_path("quickstart"), _overrides(args))
        code = command_train(config, resume=False, overwrite=args.overwrite or _replaceable_quickstart(config))
        return code or quickstart_figures(config)
    config = load_config(args.config, _overrides(args))
    return command_train(config, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
