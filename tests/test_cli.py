"""The `moelora` command line on a tiny random Llama: help, train + eval, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moelora.cli import main
from moelora.config import BUNDLED, resolve_test_files
from moelora.data import bundled_train_sources
from moelora.methods import METHODS


def write_config(path, model_dir, output_dir) -> None:
    train_files = [f"{task}={file}" for task, file in bundled_train_sources(include_approx=False).items()]
    path.write_text(
        f"""
model: {model_dir}
method: d2mora
adapter: {{r: 4, lora_alpha: 8, num_down_experts: 2, num_up_experts: 3}}
data: {{train_files: {json.dumps(train_files)}, max_records_per_task: 4, val_size: 0, cutoff_len: 96}}
training: {{output_dir: {output_dir}, max_steps: 2, warmup_steps: 0, global_batch_size: 4, micro_batch_size: 4,
           save_steps: 2, report_to: []}}
evaluation: {{test_files: bundled, protocols: [likelihood, generate], evaluate_base_model: true, max_items: 2,
             max_new_tokens: 4, num_beams: 1}}
"""
    )


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert name in text


def test_train_then_eval_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_config(config, tiny_model_dir, run)
    assert main(["train", str(config), "training.learning_rate=1e-3"]) == 0
    table = capsys.readouterr().out
    assert "| base | likelihood | 0 |" in table and "| d2mora | generate |" in table
    assert (run / "results.md").read_text().strip() == table[table.index("| run") :].split("\ntotal wall")[0].strip()
    assert json.loads((run / "eval_d2mora" / "results_likelihood.json").read_text())["counts"]["boolq"] == 2
    assert "learning_rate: 0.001" in (run / "moelora_run.yaml").read_text()

    test_file = resolve_test_files(BUNDLED)["piqa"]
    code = main(["eval", "--adapter", str(run), "--test", f"piqa={test_file}", "--max-items", "3",
                 "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0
    trained_count = json.loads((run / "train_metrics.json").read_text())["trainable_parameters"]
    assert f"| d2mora | likelihood | {trained_count:,} |" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "results_likelihood.json").read_text())["counts"] == {"piqa": 3}


def test_text_targets_train_and_the_cloze_protocol_evaluates(tmp_path, tiny_model_dir, capsys):
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_config(config, tiny_model_dir, run)
    overrides = ["data.target=text", "evaluation.protocols=[cloze]", "evaluation.max_items=3"]
    assert main(["train", str(config), *overrides]) == 0
    table = capsys.readouterr().out
    for row in ("| base | cloze | 0 |", "| base | cloze_norm | 0 |", "| d2mora | cloze |", "| d2mora | cloze_norm |"):
        assert row in table
    for label in ("base", "d2mora"):
        for protocol in ("cloze", "cloze_norm"):
            assert json.loads((run / f"eval_{label}" / f"results_{protocol}.json").read_text())["counts"]["piqa"] == 3
    tasks = len(bundled_train_sources(include_approx=False))
    assert json.loads((run / "train_metrics.json").read_text())["train_records"] == 4 * tasks

    code = main(["eval", "--adapter", str(run), "--protocol", "cloze", "--max-items", "2",
                 "--test", f"ARC-Easy={resolve_test_files(BUNDLED)['ARC-Easy']}"])  # fmt: skip
    assert code == 0 and "| d2mora | cloze_norm |" in capsys.readouterr().out


def test_a_second_train_into_the_same_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_config(config, tiny_model_dir, run)
    assert main(["train", str(config), "evaluation.test_files={}"]) == 0
    before = (run / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(config), "evaluation.test_files={}"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.learning_rat=1e-3", "unknown key"),
        ("adapter.num_down_experts=0", "num_down_experts"),
        ("method=no_such_method", "no_such_method"),
        ("data.train_files=[boolq=/nonexistent/train.json]", "/nonexistent/train.json"),
        ("model_dtype=fp8", "model_dtype: expected one of fp32, bf16, fp16, got 'fp8'"),
        ("data.target=words", "data.target: expected one of label, text, got 'words'"),
        ("evaluation.protocols=[likelihood,cloz]", "evaluation.protocols: unknown ['cloz']"),
    ],
)
def test_bad_settings_give_one_line_errors(tmp_path, tiny_model_dir, capsys, override, message):
    config = tmp_path / "run.yaml"
    write_config(config, tiny_model_dir, tmp_path / "run")
    assert main(["train", str(config), override]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("moelora: error:") and message in last_line
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_quickstart_end_to_end_on_the_real_default_model(tmp_path, capsys):
    """The README's main job, shortened: real SmolLM2-135M, bundled data, both protocols, base vs tuned."""
    run = tmp_path / "quickstart"
    code = main(["quickstart", f"training.output_dir={run}", "training.max_steps=2", "training.save_steps=2",
                 "training.logging_steps=1",
                 "evaluation.max_items=2", "evaluation.generate_max_items=1"])  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    rows = ("| base | likelihood | 0 |", "| base | generate | 0 |", "| d2mora | likelihood |", "| d2mora | generate |")
    for row in rows:
        assert row in table
    assert "Model: smollm2-135m" in table
    metrics = json.loads((run / "train_metrics.json").read_text())
    # M*r*d_in + N*d_out*r + d_in*M + r*N per module, M=3, N=8, r=8; q: 576->576, k and v: 576->192; 30 layers
    per_layer = sum(3 * 8 * 576 + 8 * d_out * 8 + 576 * 3 + 8 * 8 for d_out in (576, 192, 192))
    assert metrics["train_tokens_per_second"] > 0 and metrics["trainable_parameters"] == 30 * per_layer
    # what a newcomer looks at: curves and the report's figures, named at the end; no checkpoint folders
    assert "figures:" in table and (run / "training_curves.png").is_file()
    assert (run / "report" / "report.md").is_file() and list((run / "report").glob("*.png"))
    assert not list(run.glob("checkpoint-*"))


def test_quickstart_never_replaces_a_run_on_other_data(tmp_path, tiny_model_dir, capsys):
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_config(config, tiny_model_dir, run)
    assert main(["train", str(config), "evaluation.test_files={}"]) == 0
    before = (run / "adapter_model.safetensors").read_bytes()
    assert main(["quickstart", f"training.output_dir={run}"]) == 1
    assert "--overwrite" in capsys.readouterr().err.splitlines()[-1]
    assert (run / "adapter_model.safetensors").read_bytes() == before


def test_half_precision_base_model_keeps_fp32_adapter_weights(tmp_path, tiny_model_dir):
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_config(config, tiny_model_dir, run)
    assert main(["train", str(config), "model_dtype=bf16", "training.precision=bf16", "evaluation.test_files={}"]) == 0
    weights = load_file(run / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert any(name.endswith("d2mora_B") and w.abs().sum() > 0 for name, w in weights.items())


def test_model_option_overrides_the_config(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "run.yaml"
    write_config(config, tiny_model_dir, tmp_path / "run")
    assert main(["train", str(config), "--model", str(tmp_path / "no-such-model")]) == 1
    assert "no-such-model" in capsys.readouterr().err.strip().splitlines()[-1]


def test_every_input_problem_is_listed_before_the_model_loads(tmp_path, capsys):
    """A model folder that does not exist would fail to load: the input problems must be reported first, all of
    them in one pass."""
    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_config(config, tmp_path / "no-such-model", run)
    overrides = ["data.cutoff_len=0", "training.global_batch_size=6", "evaluation.test_files={piqa: /nowhere.json}",
                 "data.train_files=[boolq=/nowhere/train.json]"]  # fmt: skip
    assert main(["train", str(config), *overrides]) == 1
    error = capsys.readouterr().err
    for problem in ("data.cutoff_len: must be at least 1, got 0", "global_batch_size=6 is not divisible",
                    "/nowhere.json: file not found", "/nowhere/train.json: file not found"):  # fmt: skip
        assert problem in error
    assert "no-such-model" not in error and not run.exists()


def test_the_same_command_twice_prints_the_same_table(tmp_path, tiny_model_dir, capsys):
    """Same seed, same machine, same thread count: the same adapter bit for bit and the same table, with the
    quickstart's sources of randomness on (bf16 autocast, length-grouped batches, per-expert dropout, response-only
    loss). A different thread count reorders bf16 reductions and may move the adapter's last bits (README)."""
    config = tmp_path / "run.yaml"
    tables, weights = [], []
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        write_config(config, tiny_model_dir, run)
        settings = ["training.precision=bf16", "training.train_sampling=group_by_length", "data.train_on_inputs=false",
                    "adapter.lora_dropout=0.1", "training.max_steps=3", "evaluation.protocols=[likelihood]",
                    "data.cutoff_len=256"]  # fmt: skip
        assert main(["train", str(config), *settings]) == 0
        tables.append(capsys.readouterr().out.split("| run |", 1)[1].split("\ntotal wall")[0])
        weights.append((run / "adapter_model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    assert tables[0] == tables[1]
