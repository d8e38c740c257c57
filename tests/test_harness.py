"""lm-evaluation-harness as a second evaluator: on the bundled test sample and a tiny in-memory D2MoRA model,
lm-eval's own scoring must reproduce moelora's predictions item by item."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_llama, train_tiny_tokenizer
from peft import get_peft_model

from moelora import D2MoRAConfig
from moelora.data import bundled_test_files
from moelora.evaluation import evaluate
from moelora.harness import evaluate_with_lm_eval

pytest.importorskip("lm_eval")

TASKS = ("boolq", "piqa", "ARC-Easy")


@pytest.fixture(scope="module")
def tiny_adapted_model():
    tokenizer = train_tiny_tokenizer()
    # a wide init makes the random model's choices differ from item to item, so agreement means something
    base = tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=1.0,
    )
    config = D2MoRAConfig(r=4, num_down_experts=2, num_up_experts=3, init_weights=False)
    return get_peft_model(base, config).eval(), tokenizer


def _predictions(result):
    return {task: [row["prediction"] for row in rows] for task, rows in result.predictions.items()}


def test_lm_eval_likelihood_reproduces_moelora_predictions(tiny_adapted_model, tmp_path):
    model, tokenizer = tiny_adapted_model
    files = {task: path for task, path in bundled_test_files().items() if task in TASKS}
    ours = evaluate(model, tokenizer, files, protocol="likelihood", max_items=8, show_progress=False)
    theirs = evaluate_with_lm_eval(model, tokenizer, files, protocol="likelihood", max_items=8, output_dir=tmp_path)

    assert _predictions(theirs) == _predictions(ours)
    assert len({p for rows in _predictions(ours).values() for p in rows}) > 3, "the check needs varied predictions"
    assert theirs.accuracy == pytest.approx(ours.accuracy)
    for task, rows in theirs.predictions.items():
        for mine, other in zip(ours.predictions[task], rows, strict=True):
            assert other["scores"].keys() == mine["scores"].keys()
    written = json.loads((tmp_path / "results_lm-eval-likelihood.json").read_text())
    assert written["protocol"] == "lm-eval-likelihood" and written["evaluator"].startswith("lm-eval")
    assert (tmp_path / "predictions_lm-eval-likelihood_piqa.jsonl").exists()


def test_lm_eval_generation_matches_moelora_generation(tiny_adapted_model):
    model, tokenizer = tiny_adapted_model
    files = {task: path for task, path in bundled_test_files().items() if task in TASKS}
    settings = dict(protocol="generate", max_items=3, max_new_tokens=6, num_beams=2)
    ours = evaluate(model, tokenizer, files, show_progress=False, **settings)
    theirs = evaluate_with_lm_eval(model, tokenizer, files, **settings)

    assert _predictions(theirs) == _predictions(ours)
    assert theirs.accuracy == pytest.approx(ours.accuracy)
    for task, rows in theirs.predictions.items():
        for mine, other in zip(ours.predictions[task], rows, strict=True):
            # moelora decodes prompt and continuation, lm-eval only the continuation: same generated text
            assert other["output"].strip() and mine["output"].endswith(other["output"].rstrip())


def test_unknown_harness_protocol_is_refused(tiny_adapted_model):
    model, tokenizer = tiny_adapted_model
    with pytest.raises(ValueError, match="unknown protocol 'mc2'"):
        evaluate_with_lm_eval(model, tokenizer, {}, protocol="mc2")


def test_eval_command_runs_the_harness(tiny_model_dir, tmp_path, capsys):
    from moelora.cli import main

    boolq = bundled_test_files()["boolq"]
    argv = ["eval", "--model", str(tiny_model_dir), "--harness", "lm-eval", "--test", f"boolq={boolq}"]
    assert main([*argv, "--max-items", "3", "--output-dir", str(tmp_path)]) == 0
    assert "| base | lm-eval-likelihood |" in capsys.readouterr().out
    written = json.loads((tmp_path / "results_lm-eval-likelihood.json").read_text())
    assert written["counts"] == {"boolq": 3} and written["settings"]["max_items"] == 3


def test_lm_eval_cloze_reproduces_moelora_cloze_and_cloze_norm(tiny_adapted_model, tmp_path):
    model, tokenizer = tiny_adapted_model
    files = {task: path for task, path in bundled_test_files().items() if task in (*TASKS, "winogrande", "hellaswag")}
    ours = evaluate(model, tokenizer, files, protocol="cloze", max_items=6, show_progress=False)
    theirs = evaluate_with_lm_eval(model, tokenizer, files, protocol="cloze", max_items=6, output_dir=tmp_path)

    for mine, other in ((ours, theirs), (ours.variants[0], theirs.variants[0])):
        assert _predictions(other) == _predictions(mine)
        assert other.accuracy == pytest.approx(mine.accuracy)
    assert _predictions(ours) != _predictions(ours.variants[0]), "the check needs acc and acc_norm to differ"
    for task, rows in theirs.predictions.items():
        for mine, other in zip(ours.predictions[task], rows, strict=True):
            assert other["scores"] == pytest.approx(mine["scores"], abs=1e-3)
    for protocol in ("lm-eval-cloze", "lm-eval-cloze_norm"):
        assert json.loads((tmp_path / f"results_{protocol}.json").read_text())["protocol"] == protocol
