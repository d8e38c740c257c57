"""Matched parameter budgets on LLaMA-7B shapes (meta device): the paper's parameter column and the search."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from moelora import METHODS
from moelora.budget import budget_markdown, budget_table, count_trainable, meta_model, parse_count
from moelora.cli import main
from moelora.config import load_config


@pytest.fixture(scope="module")
def llama7b_shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama7b")
    LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    ).save_pretrained(folder)  # fmt: skip
    return str(folder)


def test_paper_budget_picks_the_paper_d2mora_and_the_largest_lora_below_it(llama7b_shapes):
    rows = budget_table(llama7b_shapes, 35_800_000, ["q_proj", "k_proj", "v_proj"], ["d2mora", "lora"])
    d2mora, lora = rows
    assert d2mora.settings["r"] == 8 and d2mora.trainable_parameters == 35_788_800  # {3, 8, 8} of the paper
    assert lora.settings["r"] == 45 and lora.trainable_parameters == 96 * 2 * 4096 * 45  # r = 46 would exceed
    assert 96 * 2 * 4096 * 46 > 35_800_000


def test_structure_is_kept_and_shown(llama7b_shapes):
    rows = budget_table(
        llama7b_shapes, 45_700_000, ["q_proj", "k_proj", "v_proj"], ["hydralora"], {"hydralora": {"num_experts": 8}}
    )
    assert rows[0].trainable_parameters == 45_613_056  # the paper's HydraLoRA {1, 8, 12}
    assert "'num_experts': 8" in budget_markdown(rows, 45_700_000) and "'r': 12" in budget_markdown(rows, 45_700_000)


def test_a_budget_below_rank_one_is_reported(llama7b_shapes):
    rows = budget_table(llama7b_shapes, 1000, ["q_proj"], ["lora"])
    assert rows[0].trainable_parameters == 0
    assert "over budget at r=1" in budget_markdown(rows, 1000)


@pytest.mark.parametrize(("text", "count"), [("35.8M", 35_800_000), ("800k", 800_000), ("45,613,056", 45_613_056)])
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_cli_errors_name_the_bad_argument(llama7b_shapes, capsys):
    assert main(["budget", "--model", llama7b_shapes, "--params", "lots"]) == 1
    assert "--params 'lots'" in capsys.readouterr().err
    assert main(["budget", "--model", llama7b_shapes, "--params", "1M", "--set", "nomethod.r=2"]) == 1
    assert "nomethod" in capsys.readouterr().err


def test_cli_prints_the_table(llama7b_shapes, capsys):
    assert (
        main(["budget", "--model", llama7b_shapes, "--params", "35.8M", "--methods", "d2mora", "--targets", "q,k,v"])
        == 0
    )
    out = capsys.readouterr().out
    assert "| d2mora |" in out and "35,788,800" in out and "'num_down_experts': 3" in out


COMPARE = Path(__file__).parents[1] / "configs" / "compare" / "llama7b_35.8M"


def test_comparison_configs_are_within_the_budget(llama7b_shapes):
    """configs/compare/llama7b_35.8M: every method's config builds, and its count is the one in its header,
    within the D2MoRA {3, 8, 8} budget."""
    files = sorted(COMPARE.glob("*.yaml"))
    assert {f.stem for f in files} == {name for name, method in METHODS.items() if not method.moe_only}
    model = meta_model(llama7b_shapes)
    for path in files:
        config = load_config(path)
        count = count_trainable(model, config.method, config.adapter)
        header = path.read_text().splitlines()[0]
        assert f"{count:,} trainable parameters" in header, path.name
        assert count <= 35_800_000


def test_ranks_a_small_model_cannot_hold_count_as_over_budget(tiny_model_dir):
    """The search probes ranks up to max_rank; on a small model most exceed min(d_in, d_out) of a target."""
    rows = budget_table(str(tiny_model_dir), 10**9, ["q_proj", "k_proj", "v_proj"], ["comol", "lora"])
    for row in rows:
        assert row.trainable_parameters > 0 and row.settings["r"] <= 16  # tiny Llama: k/v project 32 -> 16
