"""Smoke test of the benchmarks in bench/: each runs in its smallest mode (tiny shapes, one round, no warm-up)
and writes its JSON and Markdown with the rows the full runs report. Timings are not checked, only structure and
the deterministic counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ONE_ROUND = ["--warmup", "0", "--repeats", "1"]
#: Variants every benchmark must measure (the issue's method set and its baselines).
CORE = ("frozen", "lora", "peft_lora", "d2mora", "hydralora", "comol", "molora", "teamlora")


@pytest.fixture
def load_bench(monkeypatch):
    """Import a bench script by file name; bench/ goes on sys.path because the scripts import `common` as a
    sibling module, as they do when run as `python bench/<name>.py`."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def read_outputs(out: Path, name: str) -> tuple[dict, str]:
    record = json.loads((out / f"{name}.json").read_text())
    markdown = (out / f"{name}.md").read_text()
    assert record["benchmark"] == name
    assert record["environment"]["torch_threads"] >= 1 and record["environment"]["cpu_model"]
    assert markdown.startswith(f"# {name}\n")
    return record, markdown


def test_modules_smallest(load_bench, tmp_path):
    modules = load_bench("modules")
    modules.main(["--shapes", "64x16", *ONE_ROUND, "--out", str(tmp_path)])
    record, markdown = read_outputs(tmp_path, "modules")
    rows = {row["label"]: row for row in record["results"]}
    budget_record = record["budgets"]["64"]
    # every default variant is measured, or left out with its reason (a method that cannot adapt a lone linear)
    assert set(modules.DEFAULT_VARIANTS) == (set(rows) | set(budget_record["skipped"])) - {
        "d2mora [loop, fp64]",
        "d2mora [fast, fp64]",
    }
    assert set(CORE) <= set(rows) and {"d2mora [loop, fp64]", "d2mora [fast, fp64]"} <= set(rows)
    budget = budget_record["trainable_parameters"]
    for label, row in rows.items():
        assert row["forward"]["median_s"] > 0 and row["forward_backward"]["median_s"] > 0
        if row["method"] is None:
            assert row["saved_bytes"] == 0 and row["trainable_parameters"] == 0
            continue
        assert row["saved_bytes"] > 0
        if "r" not in label:  # sized to the budget
            assert 0 < row["trainable_parameters"] <= budget
    assert rows["peft_lora"]["forward_backward_vs_baseline"] == pytest.approx(1.0)
    # the fused path runs a fixed number of ops; the loop form's grows with the experts
    assert rows["d2mora [loop, fp64]"]["ops_forward"] > rows["d2mora [fast, fp64]"]["ops_forward"]
    assert "Loop form" in markdown


def test_train_step_smallest(load_bench, tmp_path):
    train_step = load_bench("train_step")
    argv = ["--models", "llama-tiny", "--batches", "1x8", "--precisions", "fp32,bf16", "--checkpointing", "off,on"]
    train_step.main([*argv, *ONE_ROUND, "--out", str(tmp_path)])
    record, markdown = read_outputs(tmp_path, "train_step")
    (result,) = record["results"]
    assert len(result["cells"]) == 4
    for cell in result["cells"]:
        rows = {row["label"]: row for row in cell["rows"]}
        assert set(rows) == set(train_step.DEFAULT_VARIANTS)
        assert rows["frozen"]["step_vs_frozen"] == pytest.approx(1.0)
        assert rows["peft_lora"]["step_vs_baseline"] == pytest.approx(1.0)
        targets = {"step_vs_baseline", "step_vs_equal_rank", "step_vs_frozen", "memory_vs_baseline"}
        assert all(set(rows[label]["targets"]) == targets for label in ("d2mora", "molora:top_k=2", "moa_soft"))
        assert "targets" not in rows["peft_lora:r=8"] and "targets" not in rows["frozen"]
        # D2MoRA's r 8 has PEFT LoRA r 8 beside it; CoMoL's matched rank has no PEFT LoRA of its own
        assert rows["d2mora"]["step_vs_equal_rank"] == pytest.approx(
            rows["d2mora"]["step"]["median_s"] / rows["peft_lora:r=8"]["step"]["median_s"]
        )
        assert rows["comol"]["targets"]["step_vs_equal_rank"]["value"] is None
    assert "## Targets (issue 17)" in markdown and "at equal rank" in markdown


def test_inference_smallest(load_bench, tmp_path):
    inference = load_bench("inference")
    argv = ["--model", "llama-tiny", "--prefill", "1x8", "--decode", "1x4", "--new-tokens", "2"]
    inference.main([*argv, *ONE_ROUND, "--out", str(tmp_path)])
    record, markdown = read_outputs(tmp_path, "inference")
    assert record["variants"]["peft_lora@merged"]["merged"]
    (decode,) = record["results"]["decode"]
    measured = set(decode["timings"])
    assert measured | set(record["budget"]["skipped"]) == set(inference.DEFAULT_VARIANTS)
    assert {"peft_lora@merged", *CORE[1:]} <= measured
    assert all(timing["median_s"] > 0 for timing in decode["timings"].values())
    assert "decode b1" in markdown


def test_train_step_times_compiled_variants_beside_eager_ones(load_bench, tmp_path):
    train_step = load_bench("train_step")
    argv = ["--models", "llama-tiny", "--batches", "1x8", "--variants", "peft_lora d2mora", "--compile", "off,on"]
    train_step.main([*argv, *ONE_ROUND, "--out", str(tmp_path)])
    record, markdown = read_outputs(tmp_path, "train_step")
    (cell,) = record["results"][0]["cells"]
    labels = [row["label"] for row in cell["rows"]]
    assert labels == ["peft_lora", "d2mora", "peft_lora +compile", "d2mora +compile"]
    assert "| d2mora +compile |" in markdown
