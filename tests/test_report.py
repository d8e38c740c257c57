"""`moelora report` (routing and expert similarity) and `moelora compare` (one table over runs and seeds), on
tiny random models and run folders written by the real code paths (RunConfig.save, PeftModel.save_pretrained,
evaluation.evaluate / write_result)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelora.cli import main
from moelora.config import BUNDLED, config_from_dict, resolve_test_files
from moelora.data import load_records
from moelora.evaluation import EvalResult, evaluate, write_result
from moelora.report import routing_summary
from moelora.tasks import EVAL_TEMPLATE
from moelora.training import RUN_CONFIG_NAME, build_adapter_config

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("boolq", "piqa")


def bundled_files() -> dict[str, str]:
    files = resolve_test_files(BUNDLED)
    return {task: files[task] for task in TASKS}


def run_config(folder, model, method="d2mora", adapter=None, seed=42, **evaluation):
    return config_from_dict(
        {
            "model": str(model),
            "method": method,
            "adapter": adapter if adapter is not None else {},
            "training": {"output_dir": str(folder), "seed": seed},
            "evaluation": {"test_files": bundled_files(), **evaluation},
        }
    )


def make_run(folder, model_dir, method, adapter, mutate=None):
    """A run folder as `moelora train` leaves it: the saved adapter and moelora_run.yaml."""
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), build_adapter_config(method, adapter))
    if mutate is not None:
        with torch.no_grad():
            mutate(peft_model)
    peft_model.save_pretrained(folder)
    run_config(folder, model_dir, method, adapter).save(folder / RUN_CONFIG_NAME)
    return folder


def collinear_experts(peft_model) -> None:
    """Every expert a multiple of the first (signs included), so every |cos| is 1."""
    for name, param in peft_model.named_parameters():
        if name.endswith(("d2mora_A.default", "d2mora_B.default")):
            scales = torch.tensor([(i + 1.0) * (-1) ** i for i in range(param.shape[0])])
            param.copy_(param[0] * scales.view(-1, *[1] * (param.dim() - 1)))


def mean_abs_cosine_by_hand(experts: torch.Tensor) -> float:
    vectors = [e.flatten().double() for e in experts]
    pairs = [(i, j) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    return sum(abs(float(vectors[i] @ vectors[j] / (vectors[i].norm() * vectors[j].norm()))) for i, j in pairs) / len(
        pairs
    )


D2MORA = {"r": 4, "lora_alpha": 8, "num_down_experts": 3, "num_up_experts": 4, "init_weights": False}


# --- report ----------------------------------------------------------------------------------------------------


def test_report_of_two_d2mora_runs(tmp_path, tiny_model_dir, capsys):
    spread = make_run(tmp_path / "spread", tiny_model_dir, "d2mora", D2MORA)
    collinear = make_run(tmp_path / "collinear", tiny_model_dir, "d2mora", D2MORA, mutate=collinear_experts)
    out = tmp_path / "report"
    assert main(["report", str(spread), str(collinear), "--limit", "2", "--out", str(out)]) == 0
    assert "report written" in capsys.readouterr().out

    record = json.loads((out / "report.json").read_text())
    similarity = record["similarity"]
    assert similarity["collinear"]["A"]["self_attn.q_proj"]["1"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert similarity["collinear"]["B"]["self_attn.v_proj"]["0"]["mean"] == pytest.approx(1.0, abs=1e-5)
    from safetensors.torch import load_file

    weights = load_file(spread / "adapter_model.safetensors")
    B = weights["base_model.model.model.layers.1.self_attn.k_proj.d2mora_B"]
    assert similarity["spread"]["B"]["self_attn.k_proj"]["1"]["mean"] == pytest.approx(
        mean_abs_cosine_by_hand(B), rel=1e-4
    )
    assert similarity["spread"]["B"]["self_attn.k_proj"]["1"]["mean"] < 0.5

    # Routing: every token of the first two prompts of each task, and nothing else (no padding).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for task, path in bundled_files().items():
        prompts = [EVAL_TEMPLATE.format(instruction=r["instruction"]) for r in load_records(path, task)[:2]]
        tokens = sum(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)
        for router in ("router_A", "router_B"):
            stats = record["routing"]["spread"]["stats"][task][router]["self_attn.q_proj"]["0"]
            assert stats["tokens"] == tokens
            assert sum(stats["mean_prob"]) == pytest.approx(1.0)
            assert 0.0 < stats["entropy"] <= math.log(len(stats["mean_prob"])) + 1e-9
    summary = record["routing"]["collinear"]["summary"]["piqa"]["router_B"]
    assert all(0.0 <= summary[metric] <= 1.0 for metric in ("entropy", "balance", "specificity"))

    markdown = (out / "report.md").read_text()
    assert "# moelora report: spread vs collinear" in markdown
    assert "| module | A: spread | A: collinear | B: spread | B: collinear |" in markdown
    assert "| q_proj |" in markdown and "| BoolQ |" in markdown and "Items per task: BoolQ 2, PIQA 2." in markdown
    figures = [
        "usage_spread_router_A.png",
        "usage_collinear_router_B.png",
        "entropy_router_A.png",
        "similarity_layers.png",
        "similarity_heatmap.png",
        "similarity_experts.png",
    ]
    for name in figures:
        assert (out / name).read_bytes().startswith(PNG) and f"({name})" in markdown


def test_routing_summary_numbers():
    """Two tasks on disjoint experts: each routes every token to one expert (entropy 0, balance 0); the mean
    usage is [0.5, 0.5], so specificity = JS([1, 0], [0.5, 0.5]) / ln 2 = (H([.75, .25]) - ln2 / 2) / ln 2."""
    stats = {
        task: {"router": {"attn.q": {0: {"mean_prob": usage, "entropy": 0.0, "tokens": 5}}}}
        for task, usage in (("a", [1.0, 0.0]), ("b", [0.0, 1.0]))
    }
    mixed = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    summary = routing_summary(stats)
    assert summary["a"]["router"] == pytest.approx(
        {"entropy": 0.0, "balance": 0.0, "specificity": (mixed - math.log(2) / 2) / math.log(2)}
    )
    same = routing_summary({"a": stats["a"], "c": stats["a"]})
    assert same["c"]["router"]["specificity"] == pytest.approx(0.0)


def test_report_for_routers_without_stacked_experts_and_similarity_only(tmp_path, tiny_model_dir):
    comol = make_run(tmp_path / "comol", tiny_model_dir, "comol", {"r": 4})
    assert main(["report", str(comol), "--limit", "1"]) == 0
    markdown = (comol / "report" / "report.md").read_text()
    assert "method 'comol' has no stacked experts to compare" in markdown and "router" in markdown

    # HydraLoRA: B heads only (its A is shared). --no-routing loads no model: the recorded one does not exist.
    hydra = make_run(tmp_path / "hydra", tiny_model_dir, "hydralora", {"r": 4, "num_experts": 3, "init_weights": False})
    run_config(hydra, tmp_path / "no-such-model", "hydralora").save(hydra / RUN_CONFIG_NAME)
    assert main(["report", str(hydra), "--no-routing"]) == 0
    markdown = (hydra / "report" / "report.md").read_text()
    assert "hydra: not measured." in markdown and "| module | B: hydra |" in markdown


def test_report_refuses_a_method_with_nothing_to_show(tmp_path, tiny_model_dir, capsys):
    lora = make_run(tmp_path / "lora", tiny_model_dir, "lora", {"r": 4})
    assert main(["report", str(lora), "--limit", "1"]) == 1
    assert "nothing to report: lora (method 'lora') has no routers and no stacked experts" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


# --- compare ---------------------------------------------------------------------------------------------------


def fabricated_run(folder, model="tiny", method="d2mora", adapter=None, seed=42, accuracy=None, counts=None, **extra):
    """A run folder with results written by evaluation.write_result (the writer `moelora train` uses)."""
    folder.mkdir(parents=True)
    run_config(folder, model, method, adapter or {"r": 4}, seed=seed, **extra).save(folder / RUN_CONFIG_NAME)
    counts = counts or {"boolq": 4, "piqa": 4}
    base = {task: value for task, value in {"boolq": 50.0, "piqa": 25.0}.items() if task in counts}
    for label, values, trainable in (("base", base, 0), (method, accuracy, 1234)):
        metadata = {"label": label, "model": model, "method": label, "trainable_parameters": trainable}
        write_result(EvalResult("likelihood", values, counts, 10.0, metadata), folder / f"eval_{label}")
    return folder


def test_compare_averages_seeds_and_keeps_configurations_apart(tmp_path, capsys):
    seeds = [
        fabricated_run(tmp_path / f"d2mora-{seed}", seed=seed, accuracy={"boolq": acc, "piqa": 50.0})
        for seed, acc in ((1, 50.0), (2, 60.0), (3, 70.0))
    ]
    wider = fabricated_run(tmp_path / "d2mora-r8", adapter={"r": 8}, accuracy={"boolq": 75.0, "piqa": 75.0})
    out = tmp_path / "comparison"
    assert main(["compare", *map(str, [*seeds, wider]), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| method | protocol | trainable params | seeds | BoolQ | PIQA | Avg | items | top pred. % |"
    base_row = "| base | likelihood | 0 | - | 50.0 | 25.0 | **37.5** | 8 | - |"
    assert lines[2] == base_row, "one base evaluation, counted once"
    assert lines[3] == (
        "| d2mora (adapter.r=4) | likelihood | 1,234 | 1, 2, 3 | 60.0 ± 10.0 | 50.0 ± 0.0 | **55.0 ± 5.0** | 8 | - |"
    )
    assert lines[4] == "| d2mora (adapter.r=8) | likelihood | 1,234 | 42 | 75.0 | 75.0 | **75.0** | 8 | - |"
    assert "Model: tiny." in table and "Items per task: BoolQ 4, PIQA 4." in table
    written = (out / "comparison.md").read_text()
    assert written.startswith("\n".join(lines[:5])) and "![comparison](comparison.png)" in written
    assert (out / "comparison.png").read_bytes().startswith(PNG)


def test_compare_notes_items_per_protocol_when_protocols_differ_in_items(tmp_path, capsys):
    """Rows are compared within a protocol: a generation subset smaller than the likelihood set is no warning."""
    run = fabricated_run(tmp_path / "run", accuracy={"boolq": 50.0, "piqa": 50.0})
    metadata = {"label": "d2mora", "model": "tiny", "method": "d2mora", "trainable_parameters": 1234}
    write_result(EvalResult("generate", {"boolq": 0.0}, {"boolq": 2}, 1.0, metadata), run / "eval_d2mora")
    assert main(["compare", str(run), "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "not comparable" not in table
    assert "likelihood: Items per task: BoolQ 4, PIQA 4." in table and "generate: Items per task: BoolQ 2." in table


def test_compare_reads_a_real_evaluation_folder(tmp_path, tiny_model_dir, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    metadata = {"label": "base", "model": "tiny", "method": "base", "trainable_parameters": 0}
    result = evaluate(model, tokenizer, bundled_files(), max_items=3, output_dir=tmp_path / "eval", metadata=metadata)
    assert main(["compare", str(tmp_path / "eval"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    row = printed.splitlines()[2]
    cells = [f"{result.accuracy[task]:.1f}" for task in TASKS]
    # the prediction files give how concentrated the predictions are, and the majority-label baseline
    shares, majority = [], []
    for rows in result.predictions.values():
        predicted = [r["prediction"] for r in rows]
        gold = [r["answer"] for r in rows]
        shares.append(100 * max(predicted.count(p) for p in predicted) / len(rows))
        majority.append(100 * max(gold.count(a) for a in gold) / len(rows))
    top = f"{sum(shares) / len(shares):.0f}"
    assert row == f"| base | likelihood | 0 | - | {cells[0]} | {cells[1]} | **{result.average:.1f}** | 6 | {top} |"
    assert f"most frequent gold label would score BoolQ {majority[0]:.1f}, PIQA {majority[1]:.1f}" in printed


@pytest.mark.parametrize(
    ("runs", "options", "message"),
    [
        (lambda p: [p / "empty"], [], "holds no results_<protocol>.json"),
        (lambda p: [fabricated_run(p / "a", accuracy={"boolq": 1.0, "piqa": 1.0})] * 2, [], "is given twice"),
        (
            lambda p: [
                fabricated_run(p / "a", accuracy={"boolq": 1.0, "piqa": 1.0}),
                fabricated_run(p / "b", adapter={"r": 8}, accuracy={"boolq": 1.0}, counts={"boolq": 1}, max_items=1),
            ],
            [],
            "--allow-different-items",
        ),
        (
            lambda p: [
                fabricated_run(p / "a", seed=1, accuracy={"boolq": 1.0, "piqa": 1.0}),
                fabricated_run(p / "b", seed=2, accuracy={"boolq": 1.0, "piqa": 1.0}, counts={"boolq": 4, "piqa": 3}),
            ],
            [],
            "were evaluated on different items",
        ),
        (
            lambda p: [fabricated_run(p / "a", accuracy={"boolq": 1.0, "piqa": 1.0})],
            ["--protocol", "generate"],
            "no results for protocol(s) ['generate']",
        ),
    ],
)
def test_compare_errors(tmp_path, capsys, runs, options, message):
    (tmp_path / "empty").mkdir()
    folders = runs(tmp_path)
    assert main(["compare", *map(str, folders), "--out", str(tmp_path / "out"), *options]) == 1
    assert message in capsys.readouterr().err


def test_compare_refuses_a_results_file_whose_protocol_disagrees_with_its_name(tmp_path, capsys):
    run = fabricated_run(tmp_path / "a", accuracy={"boolq": 1.0, "piqa": 1.0})
    moved = run / "eval_d2mora" / "results_generate.json"
    (run / "eval_d2mora" / "results_likelihood.json").rename(moved)
    assert main(["compare", str(run), "--out", str(tmp_path / "out")]) == 1
    assert "names protocol 'likelihood' inside but 'generate' in its name" in capsys.readouterr().err


def test_compare_names_rows_by_effective_settings_defaults_included(tmp_path, capsys):
    """A run that left a field at its default and one that set it differ by the effective values, not by
    'None' against a value."""
    default = fabricated_run(tmp_path / "default", accuracy={"boolq": 80.0, "piqa": 60.0})
    off = fabricated_run(
        tmp_path / "off", adapter={"r": 4, "orthogonal_loss_weight": 0.0}, accuracy={"boolq": 70.0, "piqa": 60.0}
    )
    spelled = fabricated_run(
        tmp_path / "spelled", adapter={"r": 4, "orthogonal_loss_weight": 1e-4}, seed=7,
        accuracy={"boolq": 60.0, "piqa": 60.0},
    )  # fmt: skip
    assert main(["compare", str(default), str(off), str(spelled), "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "| d2mora (adapter.orthogonal_loss_weight=0.0001) | likelihood | 1,234 | 42, 7 |" in table
    assert "| d2mora (adapter.orthogonal_loss_weight=0.0) | likelihood | 1,234 | 42 |" in table


def test_compare_shows_different_items_when_allowed(tmp_path, capsys):
    a = fabricated_run(tmp_path / "a", accuracy={"boolq": 80.0, "piqa": 60.0})
    b = fabricated_run(tmp_path / "b", adapter={"r": 8}, accuracy={"boolq": 90.0}, counts={"boolq": 1}, max_items=1)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out"), "--allow-different-items"]) == 0
    table = capsys.readouterr().out
    assert "| base (evaluation.max_items=1) | likelihood | 0 | - | 50.0 | - | **50.0** | 1 | - |" in table
    row = "| d2mora (adapter.r=8, evaluation.max_items=1) | likelihood | 1,234 | 42 | 90.0 | - | **90.0** | 1 | - |"
    assert row in table


def test_report_header_ignores_the_order_of_target_modules():
    from moelora.report import Run, _config_differences

    def run(**adapter):
        return Run(Path("x"), "x", "d2mora", adapter, None)

    same = [run(target_modules=["k_proj", "v_proj"], r=8), run(target_modules=["v_proj", "k_proj"], r=8)]
    assert _config_differences(same) == []
    other = [run(target_modules=["k_proj"], r=8), run(target_modules=["q_proj"], r=4)]
    assert _config_differences(other) == ["`r` 8 vs 4", "`target_modules` ['k_proj'] vs ['q_proj']"]


def test_report_labels_runs_by_parent_folder_when_names_collide(tmp_path):
    from moelora.report import _unique_labels

    assert _unique_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert _unique_labels([tmp_path / "d2mora" / "seed42", tmp_path / "no_ortho" / "seed42"]) == [
        "d2mora/seed42",
        "no_ortho/seed42",
    ]
    assert _unique_labels([tmp_path / "x" / "s", tmp_path / "y" / "x" / "s"]) == ["run1 (s)", "run2 (s)"]


def test_mcnemar_exact_p_values():
    from moelora.compare import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(4, 4) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32) and mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_p(8, 1) == pytest.approx(2 * (1 + 9) / 512)


def test_compare_tests_each_run_against_the_base_model_item_by_item(tmp_path, capsys):
    """Per-item predictions: a run right on 10 items the base model misses and wrong on 2 it gets."""
    run = tmp_path / "run"
    run.mkdir()
    run_config(run, "tiny", "d2mora", {"r": 4}).save(run / RUN_CONFIG_NAME)
    answers = ["true"] * 20
    base_correct = [True] * 6 + [False] * 12 + [True] * 2
    run_correct = [True] * 6 + [True] * 10 + [False] * 2 + [False] * 2
    for label, correct in (("base", base_correct), ("d2mora", run_correct)):
        metadata = {"label": label, "model": "tiny", "method": label, "trainable_parameters": 0}
        result = EvalResult("likelihood", {"boolq": 100.0 * sum(correct) / 20}, {"boolq": 20}, 1.0, metadata)
        result.predictions = {
            "boolq": [
                {"index": 100 + i, "answer": answer, "prediction": "true" if ok else "false", "correct": ok}
                for i, (answer, ok) in enumerate(zip(answers, correct, strict=True))
            ]
        }
        write_result(result, run / f"eval_{label}")
    assert main(["compare", str(run), "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    from moelora.compare import mcnemar_p

    expected_p = f"{mcnemar_p(10, 2):.2g}"
    assert f"| likelihood | d2mora (seed 42) | base | 20 | 10 | 2 | +40.0 | {expected_p} |" in table
    assert "BoolQ ±21.9" in table  # 1.96 * sqrt(0.25 / 20)


def test_usage_colour_scale_is_centred_on_uniform_and_never_negative():
    from moelora.report import usage_scale

    assert usage_scale([0.9, 1.05, 1.1]) == pytest.approx((0.9, 1.1))
    assert usage_scale([0.2, 3.2]) == (0.0, pytest.approx(3.2))  # the issue's -1 .. 3.2 scale
    assert usage_scale([1.0]) == pytest.approx((0.99, 1.01))
