"""Tests for moelora.data: file loading and validation, mixtures, templates, tokenisation, the bundled sample.

The tokenizers are built in memory (word-level, so prompt tokens are an exact prefix of the full text's
tokens and label masks can be checked token by token); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from moelora.data import (
    DataError,
    TrainSource,
    build_datasets,
    bundled_sample_dir,
    bundled_test_files,
    bundled_train_sources,
    check_test_file,
    check_train_file,
    format_prompt,
    load_mixture,
    load_records,
    parse_sources,
    shuffle_answers,
    to_text_targets,
    tokenize_record,
    tokenize_records,
)
from moelora.evaluation import PROTOCOLS
from moelora.tasks import TASKS, split_options

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "commonsense"

RECORD = {
    "instruction": "Please answer the following question with true or false, question: is water wet?",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}

#: D2MoRA training string for RECORD, written out by hand: two spaces after "request.", 16-space indents,
#: empty line after the instruction.
D2MORA_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "  \n\n                ### Instruction:\n"
    "                Please answer the following question with true or false, question: is water wet?\n"
    "\n"
    "                ### Response:\n"
    "                the correct answer is true"
)
#: LLM-Adapters/DoRA variant: the line after the instruction holds 16 spaces.
LLM_ADAPTERS_TEXT = D2MORA_TEXT.replace("wet?\n\n", "wet?\n                \n")


def make_tokenizer(append_eos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of the templates and sample data; adds BOS (and EOS if asked)."""
    words = set()
    for path in list(bundled_train_sources().values()) + list(bundled_test_files().values()):
        for record in json.loads(path.read_text()):
            words.update(pre_tokenizer_words(format_prompt({**record, "input": ""})))
    words.update(pre_tokenizer_words(D2MORA_TEXT + "".join(f" question{i}" for i in range(50))))
    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *sorted(words)])}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if append_eos else "<s> $A"
    model.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def pre_tokenizer_words(text: str) -> list[str]:
    return [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def write_json(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4))
    return path


def boolq_records(count: int, prefix: str = "question") -> list[dict[str, str]]:
    return [
        {
            "instruction": f"Please answer the following question with true or false, question: {prefix}{i}?",
            "input": "",
            "output": f"the correct answer is {'true' if i % 2 else 'false'}",
            "answer": "true" if i % 2 else "false",
        }
        for i in range(count)
    ]


def assert_data_error(error: pytest.ExceptionInfo[DataError], *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ------------------------------------------------------------------------------------------------ templates


def test_format_prompt_matches_literal_templates() -> None:
    assert format_prompt(RECORD) == D2MORA_TEXT
    assert format_prompt(RECORD, template="d2mora") == D2MORA_TEXT
    assert format_prompt(RECORD, template="llm_adapters") == LLM_ADAPTERS_TEXT


def test_format_prompt_missing_input_is_no_input_branch() -> None:
    record = {key: value for key, value in RECORD.items() if key != "input"}
    assert format_prompt(record) == D2MORA_TEXT


def test_format_prompt_rejects_bad_records_and_unknown_template() -> None:
    with pytest.raises(DataError) as error:
        format_prompt({**RECORD, "input": "some passage"})
    assert_data_error(error, "'input'")
    with pytest.raises(DataError) as error:
        format_prompt({"instruction": "q"})
    assert_data_error(error, "missing field 'output'")
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt(RECORD, template="alpaca")


# ------------------------------------------------------------------------------------------------ tokenising


def test_eos_appended_when_room(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = tokenizer(D2MORA_TEXT)["input_ids"]
    assert plain[0] == tokenizer.bos_token_id and plain[-1] != tokenizer.eos_token_id
    result = tokenize_record(RECORD, tokenizer, cutoff_len=256)
    assert result["input_ids"] == [*plain, tokenizer.eos_token_id]
    assert result["attention_mask"] == [1] * len(result["input_ids"])
    assert result["labels"] == result["input_ids"]
    # exactly one short of the cutoff: EOS still fits
    assert tokenize_record(RECORD, tokenizer, cutoff_len=len(plain) + 1)["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_record(RECORD, tokenizer, add_eos=False)["input_ids"] == plain


def test_no_eos_when_truncated_and_cutoff_respected(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = tokenizer(D2MORA_TEXT)["input_ids"]
    for cutoff in (10, len(plain)):
        result = tokenize_record(RECORD, tokenizer, cutoff_len=cutoff)
        assert len(result["input_ids"]) == len(result["labels"]) == len(result["attention_mask"]) == cutoff
        assert result["input_ids"] == plain[:cutoff]
        assert result["input_ids"][-1] != tokenizer.eos_token_id


def test_train_on_inputs_false_masks_prompt_including_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    result = tokenize_record(RECORD, tokenizer, train_on_inputs=False)
    output_ids = [*tokenizer("the correct answer is true", add_special_tokens=False)["input_ids"]]
    output_ids.append(tokenizer.eos_token_id)
    n_prompt = len(result["input_ids"]) - len(output_ids)
    assert result["input_ids"][0] == tokenizer.bos_token_id
    assert result["labels"] == [-100] * n_prompt + output_ids
    assert result["input_ids"][n_prompt:] == output_ids


def test_train_on_inputs_false_with_tokenizer_that_appends_eos() -> None:
    tokenizer = make_tokenizer(append_eos=True)
    result = tokenize_record(RECORD, tokenizer, train_on_inputs=False)
    assert result["input_ids"].count(tokenizer.eos_token_id) == 1  # no second EOS appended
    output_ids = tokenizer("the correct answer is true", add_special_tokens=False)["input_ids"]
    assert result["labels"][-len(output_ids) - 1 :] == [*output_ids, tokenizer.eos_token_id]
    assert result["labels"][-len(output_ids) - 2] == -100


def test_train_on_inputs_false_fully_masked_when_prompt_fills_cutoff(tokenizer: PreTrainedTokenizerFast) -> None:
    result = tokenize_record(RECORD, tokenizer, cutoff_len=12, train_on_inputs=False)
    assert result["labels"] == [-100] * 12


# ------------------------------------------------------------------------------------------------- loading


def test_load_records_json_array(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", [RECORD, {"instruction": "x", "output": "y", "extra": 1}])
    records = load_records(path, task="boolq")
    assert records == [RECORD, {"instruction": "x", "input": "", "output": "y"}]


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_load_records_jsonl(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(record) for record in boolq_records(3)) + "\n\n")
    assert load_records(path, task="boolq") == boolq_records(3)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "boolq" / "train.json"
    with pytest.raises(DataError) as error:
        load_records(path)
    assert_data_error(error, str(path), "not found")


def test_invalid_json_array_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n    {"instruction": "a",\n     "output": }\n]')
    with pytest.raises(DataError) as error:
        load_records(path)
    assert_data_error(error, str(path), "line 3", "column")


def test_invalid_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps(RECORD) + "\n{broken\n")
    with pytest.raises(DataError) as error:
        load_records(path)
    assert_data_error(error, str(path), "line 3", "column")


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    records = boolq_records(3)
    del records[2][field]
    path = write_json(tmp_path / "train.json", records)
    with pytest.raises(DataError) as error:
        load_records(path)
    assert_data_error(error, f"{path}: record 2: missing field {field!r}")


@pytest.mark.parametrize(
    ("change", "field"),
    [({"instruction": "  "}, "'instruction'"), ({"output": 3}, "'output'"), ({"input": ["a"]}, "'input'")],
)
def test_bad_field_values(tmp_path: Path, change: dict, field: str) -> None:
    path = write_json(tmp_path / "train.json", [RECORD, {**RECORD, **change}])
    with pytest.raises(DataError) as error:
        load_records(path)
    assert_data_error(error, str(path), "record 1", field)


def test_record_not_an_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", [RECORD, "just text"])
    with pytest.raises(DataError) as error:
        load_records(path)
    assert_data_error(error, f"{path}: record 1: expected a JSON object")


def test_answer_outside_label_set(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", [RECORD, RECORD, {**RECORD, "answer": "yes"}])
    assert len(load_records(path)) == 3  # no task: labels are not checked
    with pytest.raises(DataError) as error:
        load_records(path, task="boolq")
    assert_data_error(error, str(path), "record 2", "'answer'", "'yes'")
    with pytest.raises(DataError) as error:
        load_records(path, task="nonsense")
    assert_data_error(error, str(path), "unknown task")


def test_hub_id_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach\nthe Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        load_records("someone/commonsense-170k")
    assert_data_error(error, "someone/commonsense-170k", "could not be loaded from the Hugging Face Hub", "local")


def test_hub_id_is_loaded_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"instruction": "q", "input": None, "output": "the correct answer is true", "answer": None}]
    calls = []

    def fake_load(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_records("someone/data", task="boolq") == [
        {"instruction": "q", "input": "", "output": "the correct answer is true"}
    ]
    assert calls == [("someone/data", "train")]


# ------------------------------------------------------------------------------------------------- mixture


def test_parse_sources() -> None:
    parsed = parse_sources(
        [
            "boolq=some/where/train.json",
            "data/piqa/train.json",
            "data/mix/commonsense_170k.json",
            {"task": "ARC-Easy", "path": "a.json", "max_records": 5},
            {"path": "x/openbookqa/train.json"},
        ]
    )
    assert parsed == [
        TrainSource("boolq", "some/where/train.json"),
        TrainSource("piqa", "data/piqa/train.json"),
        TrainSource(None, "data/mix/commonsense_170k.json"),
        TrainSource("ARC-Easy", "a.json", 5),
        TrainSource("openbookqa", "x/openbookqa/train.json"),
    ]
    assert parse_sources("runs/lr=3e-4/train.json") == [TrainSource(None, "runs/lr=3e-4/train.json")]


@pytest.mark.parametrize(
    ("spec", "part"),
    [("bolq=a.json", "unknown task 'bolq'"), ({"path": "a.json", "cap": 3}, "'cap'"), ({"task": "boolq"}, "'path'")],
)
def test_parse_sources_errors(spec: object, part: str) -> None:
    with pytest.raises(DataError) as error:
        parse_sources([spec])
    assert_data_error(error, part)


def test_mixture_caps_tags_and_seed(tmp_path: Path) -> None:
    boolq = write_json(tmp_path / "boolq" / "train.json", boolq_records(50, prefix="b"))
    piqa_records = [
        {"instruction": f"p{i}", "input": "", "output": "x", "answer": f"solution{i % 2 + 1}"} for i in range(40)
    ]
    piqa = write_json(tmp_path / "piqa" / "train.json", piqa_records)
    sources = [{"path": str(boolq), "max_records": 10}, str(piqa)]

    mixture = load_mixture(sources, seed=1)
    assert len(mixture) == 50
    assert sum(record["task"] == "boolq" for record in mixture) == 10
    assert sum(record["task"] == "piqa" for record in mixture) == 40
    originals = {json.dumps(record, sort_keys=True) for record in boolq_records(50, prefix="b") + piqa_records}
    for record in mixture:
        assert json.dumps({k: v for k, v in record.items() if k != "task"}, sort_keys=True) in originals

    assert load_mixture(sources, seed=1) == mixture
    other = load_mixture(sources, seed=2)
    assert other != mixture
    assert {r["instruction"] for r in other if r["task"] == "boolq"} != {
        r["instruction"] for r in mixture if r["task"] == "boolq"
    }
    assert [r["task"] for r in mixture] != ["boolq"] * 10 + ["piqa"] * 40  # shuffled, not concatenated


def test_shuffled_label_control_permutes_answers_within_each_task() -> None:
    mixture = load_mixture(list(bundled_train_sources(include_approx=False).values()), seed=3)
    shuffled = shuffle_answers(mixture, seed=3)

    assert shuffle_answers(mixture, seed=3) == shuffled and shuffle_answers(mixture, seed=4) != shuffled
    moved = 0
    for before, after in zip(mixture, shuffled, strict=True):
        assert {k: v for k, v in after.items() if k not in ("output", "answer")} == {
            k: v for k, v in before.items() if k not in ("output", "answer")
        }
        assert after["output"].endswith(after["answer"]) and after["answer"] in TASKS[after["task"]].labels
        assert after["output"].removesuffix(after["answer"]) == before["output"].removesuffix(before["answer"])
        moved += after["answer"] != before["answer"]
    for task in {r["task"] for r in mixture}:  # the label frequencies of each task are kept
        assert sorted(r["answer"] for r in shuffled if r["task"] == task) == sorted(
            r["answer"] for r in mixture if r["task"] == task
        )
    assert moved > len(mixture) / 3  # the answers no longer follow their questions


def test_shuffled_label_control_needs_tasks_and_answers() -> None:
    with pytest.raises(DataError, match="record 1: the shuffled-label control needs a task and an answer"):
        shuffle_answers([{**RECORD, "task": "boolq"}, {**RECORD, "task": None}])
    with pytest.raises(DataError, match="record 0 .task boolq.: output 'yes' does not name its answer"):
        shuffle_answers([{**RECORD, "output": "yes", "task": "boolq"}])


def test_mixture_validates_labels_per_task(tmp_path: Path) -> None:
    path = write_json(tmp_path / "piqa" / "train.json", boolq_records(3))
    with pytest.raises(DataError) as error:
        load_mixture([str(path)])
    assert_data_error(error, str(path), "record 0", "'answer'", "'false'")


def test_empty_after_filtering(tmp_path: Path) -> None:
    empty = write_json(tmp_path / "boolq" / "train.json", [])
    capped = write_json(tmp_path / "piqa" / "train.json", [RECORD])
    with pytest.raises(DataError) as error:
        load_mixture([str(empty), {"path": str(capped), "task": None, "max_records": 0}])
    assert_data_error(error, "empty dataset after filtering", str(empty), str(capped))


# ------------------------------------------------------------------------------------------------ datasets


def test_build_datasets(tokenizer: PreTrainedTokenizerFast) -> None:
    records = [{**record, "task": "boolq"} for record in boolq_records(30)]
    train, val = build_datasets(records, tokenizer, val_size=5, cutoff_len=64, seed=3)
    assert (len(train), len(val)) == (25, 5)
    for split in (train, val):
        assert split.column_names == ["input_ids", "attention_mask", "labels"]
        assert all(len(ids) <= 64 for ids in split["input_ids"])
        assert split["labels"] == split["input_ids"]
    assert len(set(map(tuple, train["input_ids"]))) == 25  # distinct rows, so the order check below bites
    again, _ = build_datasets(records, tokenizer, val_size=5, cutoff_len=64, seed=3)
    assert again["input_ids"] == train["input_ids"]
    assert build_datasets(records, tokenizer, val_size=5, cutoff_len=64, seed=4)[0]["input_ids"] != train["input_ids"]

    masked, none = build_datasets(records, tokenizer, val_size=0, train_on_inputs=False)
    assert none is None and len(masked) == 30
    assert all(labels[0] == -100 and labels[-1] == tokenizer.eos_token_id for labels in masked["labels"])


def test_records_without_a_label_token_are_dropped_and_counted(tokenizer, caplog) -> None:
    """With train_on_inputs=False a record whose prompt fills cutoff_len has no label left: it is dropped before
    training (a batch of such records would have a loss of 0/0), and the count is logged."""
    records = [{**record, "task": "boolq"} for record in boolq_records(12)]
    long_question = "Please answer the following question with true or false, question: " + "question1 " * 40 + "?"
    for index in (2, 7):
        records[index] = {**records[index], "instruction": long_question}
    with caplog.at_level("WARNING", logger="moelora.data"):
        train, _ = build_datasets(records, tokenizer, val_size=0, cutoff_len=48, train_on_inputs=False)
    assert len(train) == 10 and all(any(label != -100 for label in row) for row in train["labels"])
    assert "dropped 2 of 12 records" in caplog.text and "cutoff_len=48" in caplog.text
    kept, _ = build_datasets(records, tokenizer, val_size=0, cutoff_len=48, train_on_inputs=True)
    assert len(kept) == 12  # with the loss on the prompt every record has labels
    with pytest.raises(DataError) as error:
        build_datasets(records[2:3] + records[7:8], tokenizer, val_size=0, cutoff_len=48, train_on_inputs=False)
    assert_data_error(error, "cutoff_len=48")


def test_batched_tokenisation_equals_one_record_at_a_time(tokenizer) -> None:
    records = boolq_records(7)
    batch = tokenize_records(records, tokenizer, cutoff_len=20, train_on_inputs=False)
    for index, record in enumerate(records):
        one = tokenize_record(record, tokenizer, cutoff_len=20, train_on_inputs=False)
        assert one == {key: values[index] for key, values in batch.items()}


@pytest.mark.parametrize("val_size", [30, 31, -1])
def test_val_size_too_large(tokenizer: PreTrainedTokenizerFast, val_size: int) -> None:
    with pytest.raises(DataError) as error:
        build_datasets(boolq_records(30), tokenizer, val_size=val_size)
    assert_data_error(error, "val_size")


def test_build_datasets_names_record_with_input(tokenizer: PreTrainedTokenizerFast) -> None:
    records = boolq_records(5)
    records[3] = {**records[3], "input": "a passage", "task": "boolq"}
    with pytest.raises(DataError) as error:
        build_datasets(records, tokenizer, val_size=1)
    assert_data_error(error, "record 3", "boolq", "'input'")


# ----------------------------------------------------------------------------------- options and text targets


def _all_real_files() -> list[tuple[str, Path]]:
    files = [(task, path) for task, path in bundled_train_sources().items()]
    files += [(task, path) for task, path in bundled_test_files().items()]
    if SHARED.is_dir():  # the full data, where ../shared is beside the checkout (CI has it)
        files += [(path.parent.name, path) for path in sorted(SHARED.glob("*/*/*.json"))]
        files += [(path.parent.name, path) for path in sorted(SHARED.glob("train/per_task/*/*.json"))]
    return files


def test_every_real_instruction_splits_into_question_and_options() -> None:
    checked = 0
    for task, path in _all_real_files():
        for record in load_records(path, task):
            question, options = split_options(TASKS[task], record["instruction"])
            assert question and record["answer"] in options, (path, record)
            prefix = TASKS[task].option_prefix
            assert prefix is None or f"{prefix}1: " not in question
            checked += 1
    assert checked > 2000


def test_the_checks_before_the_model_loads_accept_every_real_file_in_seconds() -> None:
    """The pre-load checks run on every training and test file of a run before each run starts: they must refuse
    nothing real, with every option that adds a check on, and stay fast on the full 170k-record set (~3 s here)."""
    started = time.perf_counter()
    records = 0
    for task, path in _all_real_files():
        if path.name.startswith("train"):
            records += check_train_file(TrainSource(task, str(path)), target="text", shuffled_label_control=True)
        else:
            check_test_file(path, task, PROTOCOLS)
    assert records > 2000
    assert time.perf_counter() - started < 30


def test_split_options_reads_each_layout() -> None:
    piqa = "Please choose the correct solution to the question: Open a jar?\n\nSolution1: twist it\n\nSolution2: "
    piqa += "hit it\n\nAnswer format: solution1/solution2"
    assert split_options(TASKS["piqa"], piqa) == ("Open a jar?", {"solution1": "twist it", "solution2": "hit it"})
    wino = "Please choose the correct answer to fill in the blank to complete the given sentence: A beat B so _ won."
    wino += "\n\nOption1: A Option2: B Answer format: option1/option2"
    assert split_options(TASKS["winogrande"], wino) == ("A beat B so _ won.", {"option1": "A", "option2": "B"})
    siqa = "Please choose the correct answer to the question: Why?\n\nAnswer1: x Answer2: y Answer3: z w\n\n"
    siqa += "Answer format: answer1/answer2/answer3"
    assert split_options(TASKS["social_i_qa"], siqa)[1] == {"answer1": "x", "answer2": "y", "answer3": "z w"}
    boolq = "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false"
    assert split_options(TASKS["boolq"], boolq) == ("is it?", {"true": "true", "false": "false"})


@pytest.mark.parametrize(
    "task, instruction, message",
    [
        ("piqa", "Choose: Why?\n\nSolution1: a\n\nSolution2: b", "does not start with the task's opening"),
        ("piqa", "Please choose the correct solution to the question: Why?\n\nSolution1: a\n\nAnswer format: "
         "solution1/solution2", "option marker 'Solution2:' not found"),
        ("ARC-Easy", "Please choose the correct answer to the question: Q\n\nAnswer1:  Answer2: b\n\nAnswer "
         "format: answer1/answer2", "option answer1 has no text"),
    ],
)  # fmt: skip
def test_split_options_refuses_other_layouts(task: str, instruction: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_options(TASKS[task], instruction)


def test_text_targets_put_the_option_text_in_the_response() -> None:
    piqa = json.loads(bundled_train_sources()["piqa"].read_text())[0]
    (converted,) = to_text_targets([{**piqa, "task": "piqa"}])
    question, options = split_options(TASKS["piqa"], piqa["instruction"])
    assert converted["instruction"] == question and converted["output"] == options[piqa["answer"]]
    assert converted["answer"] == piqa["answer"] and converted["task"] == "piqa"
    assert "Solution1" not in format_prompt(converted) and "the correct answer is" not in format_prompt(converted)


@pytest.mark.parametrize(
    "change, parts",
    [({"task": None}, ["record 0", "a task and an answer"]), ({"answer": "solution3"}, ["record 0", "'answer'"]),
     ({"instruction": "Please choose the correct solution to the question: x"}, ["record 0", "'instruction'"])],
)  # fmt: skip
def test_text_targets_name_the_record_they_cannot_convert(change: dict, parts: list[str]) -> None:
    piqa = json.loads(bundled_train_sources()["piqa"].read_text())[0]
    with pytest.raises(DataError) as error:
        to_text_targets([{**piqa, "task": "piqa", **change}])
    assert_data_error(error, *parts)


# ------------------------------------------------------------------------------------------- bundled sample


def sample_files() -> list[Path]:
    return sorted(path for path in bundled_sample_dir().rglob("*") if path.is_file())


def test_bundled_sample_layout_and_size() -> None:
    root = bundled_sample_dir()
    assert (root / "README.md").is_file()
    assert "ODC-By" in (root / "README.md").read_text()
    assert sum(path.stat().st_size for path in sample_files()) < 3 * 1024 * 1024
    train, test = bundled_train_sources(), bundled_test_files()
    assert set(train) == set(TASKS) - {"hellaswag"}
    assert set(test) == set(TASKS)
    assert train["winogrande"].name == "train.approx.json"
    assert test["hellaswag"].name == "test.approx.json"
    assert set(bundled_train_sources(include_approx=False)) == set(train) - {"winogrande"}
    assert set(bundled_test_files(include_approx=False)) == set(test) - {"hellaswag"}


def test_bundled_sample_loads_for_every_task() -> None:
    for task, path in bundled_train_sources().items():
        assert len(load_records(path, task)) == 300, path
    for task, path in bundled_test_files().items():
        assert len(load_records(path, task)) == 100, path
    mixture = load_mixture([str(path) for path in bundled_train_sources().values()])
    assert {record["task"] for record in mixture} == set(bundled_train_sources())


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not available")
def test_bundled_sample_is_drawn_from_shared_data(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "scripts" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    for sample_path, source_path in make_sample.TRAIN_FILES + make_sample.TEST_FILES:
        bundled = json.loads((bundled_sample_dir() / sample_path).read_text())
        source = {json.dumps(record) for record in json.loads((SHARED / source_path).read_text())}
        assert all(json.dumps(record) in source for record in bundled), sample_path
        size = 300 if sample_path.startswith("train/") else 100
        make_sample.sample_file(SHARED / source_path, tmp_path / sample_path, size, seed=42)
        assert (tmp_path / sample_path).read_bytes() == (bundled_sample_dir() / sample_path).read_bytes()
    assert {str(path.relative_to(bundled_sample_dir())) for path in sample_files()} == {
        "README.md",
        *(sample for sample, _ in make_sample.TRAIN_FILES + make_sample.TEST_FILES),
    }
