"""Training data in the LLM-Adapters commonsense format: loading, mixing, prompt formatting, tokenisation.

The record format, the training templates and the tokenisation rules follow LLM-Adapters' `finetune.py`
(specs: commonsense_protocol.md §1-2, d2mora.md §6-7) so that a model trained here sees the same token
sequences as the published runs. Templates and label sets live in `moelora.tasks`; this module only applies
them. Every data problem raises `DataError` with a one-line message naming the file, the record and the field,
because a bad record in a 170k-record mix is otherwise hard to find.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import datasets

from moelora.tasks import TASKS, TRAIN_TEMPLATES, get_task, split_options

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "TrainSource",
    "build_datasets",
    "bundled_sample_dir",
    "bundled_test_files",
    "bundled_train_sources",
    "check_test_file",
    "check_train_file",
    "format_prompt",
    "load_mixture",
    "load_records",
    "parse_sources",
    "to_text_targets",
    "tokenize_record",
    "tokenize_records",
]

#: Hub dataset ids look like `owner/name`; anything else that does not exist is reported as a missing file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """A data file or record that cannot be used; the message is one line naming file, record and field."""


def _one_line(text: str) -> str:
    """Collapse whitespace so that wrapped third-party messages keep DataError's one-line promise."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------- loading


def load_records(source: str | Path, task: str | None = None) -> list[dict[str, str]]:
    """Load and validate one LLM-Adapters-format file (JSON array or JSON Lines) or a Hub dataset id.

    Returned records carry `instruction`, `input` (default "") and `output`, plus `answer` when the file has
    it; other fields are dropped because nothing downstream reads them. With `task` given, every `answer`
    must be one of the task's labels: a wrong label would silently score as an error at evaluation time.
    """
    name = str(source)
    labels = _task_labels(task, name)
    path = Path(source)
    if path.exists():
        raw = _read_local(path)
    elif _is_hub_id(name):
        raw = _read_hub(name)
    else:
        raise DataError(f"{name}: file not found")
    return [_validate(item, name, index, labels) for index, item in enumerate(raw)]


def _is_hub_id(name: str) -> bool:
    """An `owner/name` that is not a local-looking file name: what `load_records` tries on the Hub."""
    return bool(_HUB_ID.match(name)) and not name.endswith(_LOCAL_SUFFIXES)


def missing_source(name: str) -> bool:
    """True when `name` is neither an existing path nor something the Hub loader would try."""
    return not Path(name).exists() and not _is_hub_id(name)


def _task_labels(task: str | None, name: str) -> tuple[str, ...] | None:
    if task is None:
        return None
    try:
        return get_task(task).labels
    except ValueError as error:
        raise DataError(f"{name}: {error}") from None


def _read_local(path: Path) -> list[Any]:
    """Parse a JSON array or JSON Lines by content, not suffix: LLM-Adapters files named .json are arrays,
    but converted files are often JSONL under the same suffix."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
        except RecursionError:  # json's parser recurses per nesting level; a garbled file can nest thousands deep
            raise DataError(f"{path}: invalid JSON: nested too deeply to be an LLM-Adapters data file") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: invalid JSON at line {lineno}, column {error.colno}: {error.msg} "
                "(read as JSON Lines because the file does not start with '[')"
            ) from None
        except RecursionError:
            raise DataError(f"{path}: invalid JSON at line {lineno}: nested too deeply to be a record") from None
    return records


def _read_hub(name: str) -> list[dict[str, Any]]:
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as error:  # offline, unknown repo, gated, bad config: all mean "use a local file"
        raise DataError(
            f"{name}: the dataset could not be loaded from the Hugging Face Hub "
            f"({type(error).__name__}: {_one_line(str(error))}); local .json/.jsonl paths work offline"
        ) from error
    return [dict(row) for row in dataset]


def _validate(item: Any, name: str, index: int, labels: tuple[str, ...] | None) -> dict[str, str]:
    where = f"{name}: record {index}"
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for field in ("instruction", "output"):
        if field not in item:
            raise DataError(f"{where}: missing field {field!r}")
    record = {}
    for field in ("instruction", "input", "output", "answer"):
        value = item.get(field)
        if value is None and field in ("input", "answer"):  # Hub rows fill absent columns with None
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
        record[field] = value
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    record.setdefault("input", "")
    if labels is not None and "answer" in record and record["answer"] not in labels:
        raise DataError(f"{where}: field 'answer' has value {record['answer']!r}, not one of {', '.join(labels)}")
    return record


# ---------------------------------------------------------------------------------------------- the mixture


@dataclass
class TrainSource:
    """One training file of the mixture; `max_records` caps it by a seeded random sample."""

    task: str | None
    path: str
    max_records: int | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise DataError(f"{self.path}: unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if self.max_records is not None and self.max_records < 0:
            raise DataError(f"{self.path}: field 'max_records' must be >= 0, got {self.max_records}")


SourceSpec = str | Path | Mapping[str, Any] | TrainSource


def parse_sources(spec: SourceSpec | Sequence[SourceSpec]) -> list[TrainSource]:
    """Turn CLI/YAML source specs into TrainSources.

    Accepted items: `"task=path"`, a plain path (task taken from the parent folder when that is a task name,
    as in LLM-Adapters' `dataset/<task>/train.json` layout, else None), a mapping with keys `task`, `path`,
    `max_records`, or a TrainSource. A single item is accepted in place of a list.
    """
    items = [spec] if isinstance(spec, str | Path | Mapping | TrainSource) else list(spec)
    return [_parse_source(item) for item in items]


def _parse_source(item: SourceSpec) -> TrainSource:
    if isinstance(item, TrainSource):
        return item
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"task", "path", "max_records"})
        if unknown:
            raise DataError(f"source {dict(item)!r}: unknown field {unknown[0]!r}")
        if "path" not in item:
            raise DataError(f"source {dict(item)!r}: missing field 'path'")
        path = str(item["path"])
        task = item.get("task", _task_from_folder(path))
        return TrainSource(task=task, path=path, max_records=item.get("max_records"))
    text = str(item)
    prefix, sep, rest = text.partition("=")
    if sep and "/" not in prefix and "\\" not in prefix:  # `task=path`; a path containing "=" has a "/" first
        return TrainSource(task=prefix, path=rest)
    return TrainSource(task=_task_from_folder(text), path=text)


def _task_from_folder(path: str) -> str | None:
    folder = Path(path).parent.name
    return folder if folder in TASKS else None


def load_mixture(sources: SourceSpec | Sequence[SourceSpec], seed: int = 42) -> list[dict[str, str | None]]:
    """Load every source, cap each with a seeded sample, tag records with their task, and shuffle the union.

    The cap keeps the sampled records in file order, and the same seed always gives the same mixture, so a
    capped run can be repeated exactly.
    """
    parsed = parse_sources(sources)
    mixture: list[dict[str, str | None]] = []
    for source in parsed:
        records = load_records(source.path, source.task)
        if source.max_records is not None and len(records) > source.max_records:
            keep = sorted(random.Random(seed).sample(range(len(records)), source.max_records))
            records = [records[index] for index in keep]
        mixture.extend({**record, "task": source.task} for record in records)
    if not mixture:
        names = ", ".join(f"{source.task or '?'}={source.path}" for source in parsed)
        raise DataError(f"empty dataset after filtering; sources: {names or '(none)'}")
    random.Random(seed).shuffle(mixture)
    return mixture


def _task_and_answer(record: Mapping[str, Any], index: int, who_needs: str) -> tuple[str, str]:
    task, answer = record.get("task"), record.get("answer")
    if task is None or not answer:
        raise DataError(
            f"record {index}: {who_needs} a task and an answer for every record (task {task!r}, answer {answer!r})"
        )
    return task, answer


def shuffle_answers(records: Sequence[Mapping[str, Any]], seed: int = 42) -> list[dict[str, Any]]:
    """The shuffled-label control: within each task, permute the answers among the records and rewrite each
    output to name its new answer. Label frequencies stay as they were, but no answer is tied to its question
    any more, so a model trained on this set must score at the level of its label prior; a clearly higher
    score means the evaluation leaks answers.

    Every record needs a known task and an `answer` that its `output` names.
    """
    by_task: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        task, answer = _task_and_answer(record, index, "the shuffled-label control needs")
        if answer not in record["output"]:
            raise DataError(f"record {index} (task {task}): output {record['output']!r} does not name its answer")
        by_task.setdefault(task, []).append(index)
    shuffled = [dict(record) for record in records]
    rng = random.Random(seed)
    for indices in by_task.values():
        answers = [records[i]["answer"] for i in indices]
        rng.shuffle(answers)
        for i, answer in zip(indices, answers, strict=True):
            old = records[i]["answer"]
            head, _, tail = records[i]["output"].rpartition(old)  # the last mention is the stated answer
            shuffled[i]["output"], shuffled[i]["answer"] = head + answer + tail, answer
    return shuffled


def to_text_targets(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The text form of the training targets (`data.target: text`): the bare question as the instruction and the
    correct option's text as the output, instead of the options-and-label form ("... Answer1: ... Answer2: ...",
    "the correct answer is answer2"). Models below about a billion parameters do not learn to bind option labels
    to option texts; in this form they learn what the cloze protocol then measures (its prompt is this
    instruction, its continuations these outputs). Every record needs a known task and an `answer`.
    """
    converted = []
    for index, record in enumerate(records):
        task, answer = _task_and_answer(record, index, "text targets need")
        try:
            question, options = split_options(get_task(task), record["instruction"])
        except ValueError as error:
            raise DataError(f"record {index}: field 'instruction': {error}") from None
        if answer not in options:
            raise DataError(f"record {index} (task {task}): field 'answer' {answer!r} names none of the options")
        converted.append({**record, "instruction": question, "output": options[answer]})
    return converted


# ------------------------------------------------------------------------------ checks before a model loads


def check_train_file(
    source: TrainSource, *, template: str = "d2mora", target: str = "label", shuffled_label_control: bool = False
) -> int:
    """Validate one local training file the way training will use it and return its record count (before any cap).

    Beyond `load_records`, each record goes through what training does to it later, after the model has loaded:
    the prompt template (which refuses a non-empty `input`), the shuffled-label control and the text targets. These
    are pure and fast (0.7-1.9 s for the 121k records of the full training set), so a bad record costs seconds, not a
    model load.
    An empty file is refused too: it would silently add nothing to the mixture.
    """
    records = load_records(source.path, source.task)
    if not records:
        raise DataError(f"{source.path}: no records")
    for index, record in enumerate(records):
        try:
            format_prompt(record, template)
        except DataError as error:
            raise DataError(f"{source.path}: record {index}: {error}") from None
    tagged = [{**record, "task": source.task} for record in records]
    try:  # their messages name the record by its index in `tagged`, which is its index in the file
        if shuffled_label_control:
            shuffle_answers(tagged)
        if target == "text":
            to_text_targets(tagged)
    except DataError as error:
        raise DataError(f"{source.path}: {error}") from None
    return len(records)


def check_test_file(path: str | Path, task: str, protocols: Sequence[str] = ()) -> None:
    """Validate one test file for evaluation: known task, labels of the task, an answer in every record (a record
    without one would silently score as wrong), at least one record, and with the cloze protocol the task's option
    layout in every instruction."""
    records = load_records(path, task)
    if not records:
        raise DataError(f"{path}: no records")
    for index, record in enumerate(records):
        if not record.get("answer"):
            raise DataError(f"{path}: record {index}: missing field 'answer' (evaluation scores against it)")
        if "cloze" in protocols:
            try:
                split_options(get_task(task), record["instruction"])
            except ValueError as error:
                raise DataError(f"{path}: record {index}: field 'instruction' (cloze protocol): {error}") from None


# ------------------------------------------------------------------------------------ prompts and tokens


def format_prompt(record: Mapping[str, Any], template: str = "d2mora") -> str:
    """The full training string (prompt plus output) for one record.

    Only the no-input branch exists: `input` is empty in every LLM-Adapters commonsense file, and the exact
    bytes of the "paired with an input" variant differ between LLM-Adapters revisions and are not known for
    D2MoRA, so guessing them would train on an unverified template.
    """
    try:
        pattern = TRAIN_TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; known templates: {', '.join(TRAIN_TEMPLATES)}") from None
    for field in ("instruction", "output"):
        if field not in record:
            raise DataError(f"missing field {field!r}")
    if record.get("input"):
        raise DataError(
            "field 'input' is non-empty; only the no-input template branch is implemented (commonsense_protocol.md §2)"
        )
    return pattern.format(instruction=record["instruction"], output=record["output"])


def _tokenize(tokenizer: Any, texts: list[str], cutoff_len: int, add_eos: bool) -> list[list[int]]:
    """LLM-Adapters' `tokenize` over a batch: truncate at cutoff_len, no padding, EOS appended only if there is
    room. (Without padding the attention mask is all ones, so it is not returned.)"""
    encoded = tokenizer(texts, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    eos = tokenizer.eos_token_id
    batch = []
    for ids in encoded["input_ids"]:
        ids = list(ids)
        if add_eos and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        batch.append(ids)
    return batch


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    template: str = "d2mora",
    add_eos: bool = True,
) -> dict[str, list[list[int]]]:
    """Token ids, attention masks and labels for a batch of records, as LLM-Adapters' `generate_and_tokenize_prompt`
    does for each (one tokenizer call per batch, which the fast tokenizers run in parallel).

    With `train_on_inputs=False` the first N labels are -100, N being the token count of the prompt alone
    (the template with an empty output), tokenised the same way as the full text so that a BOS token the
    tokenizer adds is counted on both sides. An EOS that the tokenizer itself appends to the prompt is not
    counted: it would mask the first output token instead.
    """
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True needs a tokenizer with an eos_token_id")
    full = _tokenize(tokenizer, [format_prompt(record, template) for record in records], cutoff_len, add_eos)
    labels = [list(ids) for ids in full]
    if not train_on_inputs:
        prompts = [format_prompt({**record, "output": ""}, template) for record in records]
        for row, prompt_ids in zip(labels, _tokenize(tokenizer, prompts, cutoff_len, False), strict=True):
            prompt_len = len(prompt_ids)
            if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
                prompt_len -= 1
            prompt_len = min(prompt_len, len(row))
            row[:prompt_len] = [-100] * prompt_len
    return {"input_ids": full, "attention_mask": [[1] * len(ids) for ids in full], "labels": labels}


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    template: str = "d2mora",
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """`tokenize_records` for one record."""
    batch = tokenize_records([record], tokenizer, cutoff_len, train_on_inputs, template, add_eos)
    return {key: values[0] for key, values in batch.items()}


def _has_label(labels: list[int]) -> bool:
    return any(label != -100 for label in labels)


def build_datasets(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    val_size: int = 2000,
    seed: int = 42,
    template: str = "d2mora",
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off a validation set, shuffle and tokenise, returning model-ready train/validation datasets.

    The split is `train_test_split(test_size=val_size, seed=seed)` as in LLM-Adapters, so the same records
    are held out; the follow-up shuffle is seeded too (the official one is not) to make runs repeatable.
    Only `input_ids`, `attention_mask` and `labels` remain: `task` and `answer` are not model inputs and
    would break the collator. Records left without a label token (with `train_on_inputs=False`, those whose
    response lies beyond `cutoff_len`) are dropped, and the count is logged: they teach nothing, and a batch
    made of them only would have a loss of 0/0.
    """
    if not records:
        raise DataError("empty dataset: no records to build datasets from")
    if not 0 <= val_size < len(records):
        raise DataError(f"val_size: {val_size} must be >= 0 and smaller than the number of records ({len(records)})")
    for index, record in enumerate(records):
        try:
            format_prompt(record, template)
        except DataError as error:  # say which record: `.map` would only report a position after shuffling
            raise DataError(f"record {index} (task {record.get('task')}): {error}") from None
    table = datasets.Dataset.from_dict(
        {field: [record.get(field, "") for record in records] for field in ("instruction", "input", "output")}
    )

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        return tokenize_records(
            rows, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, template=template
        )

    def prepare(split: datasets.Dataset) -> datasets.Dataset:
        tokenized = split.shuffle(seed=seed).map(tokenize, batched=True, remove_columns=split.column_names)
        kept = tokenized.filter(_has_label, input_columns="labels")
        if len(kept) < len(tokenized):
            logger.warning(
                "dropped %d of %d records whose response lies beyond cutoff_len=%d: with train_on_inputs=False "
                "they have no label token left", len(tokenized) - len(kept), len(tokenized), cutoff_len
            )  # fmt: skip
        if not len(kept):
            raise DataError(f"no record keeps a label token within cutoff_len={cutoff_len}; raise cutoff_len")
        return kept

    if val_size == 0:
        return prepare(table), None
    parts = table.train_test_split(test_size=val_size, shuffle=True, seed=seed)
    return prepare(parts["train"]), prepare(parts["test"])


# ------------------------------------------------------------------------------------------ bundled sample


def bundled_sample_dir() -> Path:
    """Folder of the small real-data sample shipped in the wheel, for offline smoke runs and tests."""
    return Path(str(files("moelora") / "sample_data"))


def _bundled_files(split: str, include_approx: bool) -> dict[str, Path]:
    found = {}
    for task in TASKS:
        folder = bundled_sample_dir() / split / task
        names = [f"{split}.json"] + ([f"{split}.approx.json"] if include_approx else [])
        paths = [folder / name for name in names if (folder / name).is_file()]
        if paths:
            found[task] = paths[0]
    return found


def bundled_train_sources(include_approx: bool = True) -> dict[str, Path]:
    """Task -> bundled training file. WinoGrande's is drawn from an approximate rebuild (see the sample's
    README); `include_approx=False` leaves it out."""
    return _bundled_files("train", include_approx)


def bundled_test_files(include_approx: bool = True) -> dict[str, Path]:
    """Task -> bundled test file. HellaSwag's is drawn from an approximate rebuild (see the sample's README);
    `include_approx=False` leaves it out."""
    return _bundled_files("test", include_approx)
