"""The evaluation protocols on a tiny random Llama: candidates, likelihood scores, batching, result files."""

from __future__ import annotations

import json

import pytest
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelora.config import BUNDLED, resolve_test_files
from moelora.data import load_records
from moelora.evaluation import EvalResult, _likelihood, candidate_labels, evaluate, results_to_markdown
from moelora.tasks import EVAL_TEMPLATE, TASKS, Task, split_options


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def bundled(*tasks: str) -> dict[str, str]:
    files = resolve_test_files(BUNDLED)
    return {task: files[task] for task in tasks}


def test_candidates_follow_the_answer_format_hint():
    siqa, boolq = TASKS["social_i_qa"], TASKS["boolq"]
    assert candidate_labels(siqa, "Question ...\n\nAnswer format: answer1/answer2/answer3") == [
        "answer1",
        "answer2",
        "answer3",
    ]
    assert candidate_labels(boolq, "Passage ... Answer format: true/false") == ["true", "false"]
    assert candidate_labels(boolq, "no hint here") == ["true", "false"]


def brute_force_scores(model, tokenizer, prompt: str, labels: list[str]) -> list[float]:
    """Full log-probability of each candidate text, one forward pass per candidate, no cache."""
    scores = []
    for label in labels:
        ids = tokenizer(prompt + f"the correct answer is {label}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        scores.append(float(log_probs.gather(1, ids[0, 1:, None]).sum()))
    return scores


def test_likelihood_picks_what_a_brute_force_scorer_picks(tiny, tmp_path):
    model, tokenizer = tiny
    files = bundled("boolq", "social_i_qa", "ARC-Easy")
    result = evaluate(model, tokenizer, files, protocol="likelihood", max_items=6, show_progress=False)
    for task, path in files.items():
        records = load_records(path, task)[:6]
        for record, row in zip(records, result.predictions[task], strict=True):
            labels = candidate_labels(TASKS[task], record["instruction"])
            prompt = EVAL_TEMPLATE.format(instruction=record["instruction"])
            expected = brute_force_scores(model, tokenizer, prompt, labels)
            got = [row["scores"][label] for label in labels]
            # The cached scorer leaves out the tokens every candidate shares, so scores differ by a constant.
            offsets = [e - g for e, g in zip(expected, got, strict=True)]
            assert max(offsets) - min(offsets) < 1e-3
            assert row["prediction"] == labels[max(range(len(labels)), key=lambda k: expected[k])]
            assert row["correct"] == (row["prediction"] == record["answer"])


def test_likelihood_of_candidates_that_differ_in_several_tokens(tiny):
    """Labels that share a first word and then differ in several tokens take the cached two-pass scorer."""
    model, tokenizer = tiny
    task = Task("custom", "Custom", ("very likely yes indeed", "very unlikely no way", "very likely maybe so"))
    records = [{"instruction": f"Question number {i}: is it {'so ' * i}?"} for i in range(4)]
    prompts = [EVAL_TEMPLATE.format(instruction=r["instruction"]) for r in records]
    rows = _likelihood(model, tokenizer, task, records, prompts, 8, tqdm(disable=True))
    for prompt, row in zip(prompts, rows, strict=True):
        expected = brute_force_scores(model, tokenizer, prompt, list(task.labels))
        offsets = [e - row["scores"][label] for e, label in zip(expected, task.labels, strict=True)]
        assert max(offsets) - min(offsets) < 1e-3
        assert row["prediction"] == task.labels[max(range(3), key=lambda k: expected[k])]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_generation_equals_one_at_a_time(tiny, num_beams):
    model, tokenizer = tiny
    files = bundled("piqa", "ARC-Challenge")  # prompts of very different lengths, so batches are padded
    settings = dict(protocol="generate", max_items=5, num_beams=num_beams, max_new_tokens=8, show_progress=False)
    batched = evaluate(model, tokenizer, files, batch_size=5, **settings)
    single = evaluate(model, tokenizer, files, batch_size=1, **settings)
    for task in files:
        assert [r["output"] for r in batched.predictions[task]] == [r["output"] for r in single.predictions[task]]


def test_results_are_written_and_accuracy_matches_predictions(tiny, tmp_path):
    model, tokenizer = tiny
    files = bundled("boolq", "winogrande")
    result = evaluate(
        model, tokenizer, files, max_items=7, output_dir=tmp_path, metadata={"label": "base"}, show_progress=False
    )
    summary = json.loads((tmp_path / "results_likelihood.json").read_text())
    assert summary["protocol"] == "likelihood" and summary["label"] == "base"
    for task in files:
        lines = (tmp_path / f"predictions_likelihood_{task}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 7 == summary["counts"][task]
        assert summary["accuracy"][task] == pytest.approx(100 * sum(r["correct"] for r in rows) / 7)
    assert summary["average"] == pytest.approx(sum(summary["accuracy"].values()) / 2)
    assert result.average == pytest.approx(summary["average"])


def test_generation_predictions_are_extracted_from_the_response(tiny):
    model, tokenizer = tiny
    result = evaluate(
        model, tokenizer, bundled("boolq"), protocol="generate", max_items=2, num_beams=1, max_new_tokens=4,
        show_progress=False,
    )  # fmt: skip
    for row in result.predictions["boolq"]:
        assert row["output"].startswith("Below is an instruction")
        assert row["prediction"] in ("", "true", "false")


def test_markdown_table_has_tasks_average_and_parameters():
    base = EvalResult("likelihood", {"boolq": 50.0, "piqa": 60.0}, {"boolq": 10, "piqa": 10}, 1.0,
                      {"label": "base", "trainable_parameters": 0, "model": "m"})  # fmt: skip
    tuned = EvalResult("likelihood", {"boolq": 70.0, "piqa": 80.0}, {"boolq": 10, "piqa": 10}, 1.0,
                       {"label": "d2mora", "trainable_parameters": 1234567})  # fmt: skip
    table = results_to_markdown([base, tuned])
    assert "| run | protocol | trainable params | BoolQ | PIQA | Avg | items |" in table
    assert "| d2mora | likelihood | 1,234,567 | 70.0 | 80.0 | **75.0** | 20 |" in table
    assert "Model: m." in table


def test_bad_arguments_are_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="unknown protocol 'beam'"):
        evaluate(model, tokenizer, bundled("boolq"), protocol="beam")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        evaluate(model, tokenizer, {"mmlu": "x.json"}, show_progress=False)


def test_random_subset_is_fixed_per_seed_and_recorded(tiny, tmp_path):
    from moelora.evaluation import load_test_items

    files = bundled("piqa", "boolq")
    first = load_test_items(files, 5)
    drawn = load_test_items(files, 5, subset_seed=3)
    assert [i for i, _ in first["piqa"]] == [0, 1, 2, 3, 4]
    indices = [i for i, _ in drawn["piqa"]]
    assert indices == sorted(indices) and len(set(indices)) == 5 and indices != [0, 1, 2, 3, 4]
    assert load_test_items(files, 5, subset_seed=3) == drawn  # the same items every time
    assert [i for i, _ in load_test_items(files, 5, subset_seed=4)["piqa"]] != indices
    assert [i for i, _ in drawn["boolq"]] != indices  # tasks draw independently
    with pytest.raises(ValueError, match="set max_items too"):
        load_test_items(files, None, subset_seed=3)
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        load_test_items(files, 0)
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, files, max_items=5, subset_seed=3, output_dir=tmp_path, show_progress=False)
    assert result.metadata["settings"]["subset_seed"] == 3
    rows = [json.loads(line) for line in (tmp_path / "predictions_likelihood_piqa.jsonl").read_text().splitlines()]
    records = load_records(files["piqa"], "piqa")
    assert [row["index"] for row in rows] == indices  # indices into the file, so items can be looked up
    assert [row["instruction"] for row in rows] == [records[i]["instruction"] for i in indices]


# ------------------------------------------------------------------------------------------------ cloze


def brute_force_cloze(model, tokenizer, prompt: str, option: str) -> float:
    """Log-probability of the option's tokens after the prompt, one forward pass, computed without moelora's
    batching: the trailing indent of the prompt joins the option (lm-eval's rule), and the option's tokens are
    those that follow the stripped prompt's own tokens in the tokenised whole."""
    stripped = prompt.rstrip()
    ids = tokenizer(prompt + option, return_tensors="pt")["input_ids"]
    start = len(tokenizer(stripped)["input_ids"])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(log_probs[p - 1, ids[0, p]]) for p in range(start, ids.shape[1]))


def test_cloze_scores_option_texts_after_the_bare_question(tiny, tmp_path):
    model, tokenizer = tiny
    files = bundled("boolq", "piqa", "winogrande", "ARC-Challenge", "hellaswag")
    result = evaluate(
        model, tokenizer, files, protocol="cloze", max_items=5, batch_size=3, show_progress=False, output_dir=tmp_path
    )
    (normalised,) = result.variants
    assert (result.protocol, normalised.protocol) == ("cloze", "cloze_norm")
    for task, path in files.items():
        for record, row, row_norm in zip(
            load_records(path, task)[:5], result.predictions[task], normalised.predictions[task], strict=True
        ):
            question, options = split_options(TASKS[task], record["instruction"])
            assert "Answer format" not in question and f"{TASKS[task].option_prefix}1: " not in question
            prompt = EVAL_TEMPLATE.format(instruction=question)
            expected = {label: brute_force_cloze(model, tokenizer, prompt, text) for label, text in options.items()}
            assert row["scores"] == pytest.approx(expected, abs=1e-3)
            assert row["prediction"] == max(expected, key=expected.get)
            per_char = {label: expected[label] / len(options[label]) for label in options}
            assert row_norm["prediction"] == max(per_char, key=per_char.get)
            assert row_norm["correct"] == (row_norm["prediction"] == record["answer"])
    for protocol in ("cloze", "cloze_norm"):
        written = json.loads((tmp_path / f"results_{protocol}.json").read_text())
        assert written["protocol"] == protocol and set(written["accuracy"]) == set(files)
        assert (tmp_path / f"predictions_{protocol}_piqa.jsonl").is_file()


def test_cloze_norm_can_disagree_with_cloze(tiny):
    """acc_norm divides by the option's length in characters: on items with options of different lengths the two
    rules must pick differently somewhere, or the normalisation would not be applied."""
    model, tokenizer = tiny
    result = evaluate(model, tokenizer, bundled("ARC-Easy", "piqa"), protocol="cloze", max_items=20, batch_size=8,
                      show_progress=False)  # fmt: skip
    raw = [row["prediction"] for rows in result.predictions.values() for row in rows]
    normalised = [row["prediction"] for rows in result.variants[0].predictions.values() for row in rows]
    assert raw != normalised


def test_cloze_refuses_an_instruction_without_its_options(tiny, tmp_path):
    model, tokenizer = tiny
    broken = tmp_path / "piqa.json"
    instruction = "Please choose the correct solution to the question: Why?\n\nAnswer format: solution1/solution2"
    broken.write_text(json.dumps([{"instruction": instruction, "output": "x", "answer": "solution1"}]))
    with pytest.raises(ValueError, match="cloze protocol: piqa: option marker 'Solution1:' not found"):
        evaluate(model, tokenizer, {"piqa": broken}, protocol="cloze", show_progress=False)
