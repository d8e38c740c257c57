"""lm-evaluation-harness as a second, independent evaluator of the commonsense tasks (commonsense_protocol.md §6).

The same local LLM-Adapters test files and the same in-memory model (moelora adapters included) go through
lm-eval's own request building, batching, scoring and metrics, so a bug in moelora's evaluator would show up
as a disagreement between the two:

- `likelihood` → lm-eval `multiple_choice`: context = the exact evaluation prompt, choices = "the correct
  answer is <label>" for the labels offered by the item (the targets the model was trained to write), gold =
  the index of the record's answer; lm-eval's `acc` (sum of continuation log-probabilities) picks the best
  choice, which is moelora's likelihood protocol computed independently.
- `cloze` → lm-eval `multiple_choice` as it scores PIQA or ARC: context = the evaluation prompt around the bare
  question, choices = the option texts; lm-eval's `acc` and `acc_norm` (per character) are moelora's `cloze` and
  `cloze_norm`, with lm-eval's own tokenisation of context and continuation.
- `generate` → lm-eval `generate_until`: the same prompt, beam search (4 beams, 32 new tokens, greedy with
  `num_beams=1`), no stop string but EOS, then lm-eval's `regex` filter with the task's label alternation and
  `take_first`, scored by `exact_match` against the answer: the LLM-Adapters protocol.

Nothing is downloaded: each task is a YAML in a temporary include directory whose documents are a JSONL file
written here (the `json` builder ships with `datasets`). Results come back as moelora `EvalResult`s, labelled
`lm-eval-<protocol>` (cloze with its `lm-eval-cloze_norm` variant), and are written in the same JSON/JSONL format.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .evaluation import (
    EvalResult,
    cloze_prompt_and_options,
    evaluation_settings,
    load_test_items,
    write_result,
)
from .tasks import EVAL_TEMPLATE, TASKS, Task, candidate_labels

HARNESS_PROTOCOLS = ("likelihood", "generate", "cloze")
_METRICS = {"likelihood": ["acc"], "cloze": ["acc", "acc_norm"], "generate": ["exact_match"]}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError(
            "the lm-eval harness is not installed; install it with `pip install 'moelora[harness]'`"
        ) from error
    return lm_eval, HFLM, TaskManager


def _harness_task_name(task: Task, protocol: str) -> str:
    return f"moelora_{task.name.lower().replace('-', '_')}_{protocol}"


def _write_task(
    task: Task, items: list[tuple[int, dict]], protocol: str, folder: Path, generation: dict[str, Any]
) -> str:
    """Write one task's documents (JSONL; `items` are (index in the test file, record)) and its lm-eval YAML
    into `folder`; return the task name."""
    name = _harness_task_name(task, protocol)
    documents = folder / f"{name}.jsonl"
    with open(documents, "w") as handle:
        for index, record in items:
            if protocol == "cloze":
                query, options = cloze_prompt_and_options(task, record)
                labels, choices = list(options), list(options.values())
            else:
                query = EVAL_TEMPLATE.format(instruction=record["instruction"])
                labels = candidate_labels(task, record["instruction"])
                choices = [f"the correct answer is {label}" for label in labels]
            answer = record.get("answer", "")
            document = {
                "index": index,
                "query": query,
                "answer": answer,
                "labels": labels,
                "choices": choices,
                # -1 when the answer is not among the offered labels: no choice can be right, as in moelora
                "gold": labels.index(answer) if answer in labels else -1,
            }
            handle.write(json.dumps(document) + "\n")
    spec: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(documents)}},
        "test_split": "test",
        "doc_to_text": "query",
        # the prompt ends where the model writes: no separator between it and the continuation
        "target_delimiter": "",
    }
    if protocol in ("likelihood", "cloze"):
        spec |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [
                {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in _METRICS[protocol]
            ],
        }
    else:
        spec |= {
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": generation,
            "filter_list": [
                {
                    "name": "first_label",
                    "filter": [
                        {"function": "regex", "regex_pattern": f"({task.pattern.pattern})"},
                        {"function": "take_first"},
                    ],
                }
            ],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return name


def _prediction_rows(task: Task, protocol: str, samples: list[dict], normalised: bool = False) -> list[dict[str, Any]]:
    """What lm-eval predicted per item; `normalised` picks the best score per character of the choice (acc_norm)."""
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc"]["index"]):
        document = sample["doc"]
        if protocol in ("likelihood", "cloze"):
            scores = [float(response[0]) for response in sample["filtered_resps"]]
            lengths = [len(choice) for choice in document["choices"]] if normalised else [1] * len(scores)
            best = max(range(len(scores)), key=lambda k: scores[k] / lengths[k])
            out = {"prediction": document["labels"][best], "scores": dict(zip(document["labels"], scores, strict=True))}
        else:
            generated = sample["resps"][0][0]
            prediction = sample["filtered_resps"][0]
            out = {"output": generated, "prediction": prediction if prediction in task.labels else ""}
        rows.append(
            {
                "index": document["index"],
                "answer": document["answer"],
                **out,
                "correct": out["prediction"] == document["answer"],
            }
        )
    return rows


def evaluate_with_lm_eval(
    model,
    tokenizer,
    test_files: Mapping[str, str | Path],
    *,
    protocol: str = "likelihood",
    batch_size: int = 8,
    max_items: int | None = None,
    subset_seed: int | None = None,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    output_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> EvalResult:
    """Accuracy per task computed by lm-evaluation-harness on an in-memory model (a PeftModel works)."""
    if protocol not in HARNESS_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(HARNESS_PROTOCOLS)}")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    model.eval()
    loaded = load_test_items(test_files, max_items, subset_seed)
    with tempfile.TemporaryDirectory(prefix="moelora-lm-eval-") as folder:
        # no stop string but EOS, as LLM-Adapters (lm-eval would otherwise stop at its few-shot delimiter)
        generation = {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False, "num_beams": num_beams}
        harness_names = {
            name: _write_task(TASKS[name], items, protocol, Path(folder), generation) for name, items in loaded.items()
        }
        language_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        started = time.perf_counter()
        output = lm_eval.simple_evaluate(
            model=language_model,
            tasks=list(harness_names.values()),
            task_manager=TaskManager(include_path=folder),
            log_samples=True,
            bootstrap_iters=0,
        )
        elapsed = time.perf_counter() - started
    total = sum(len(items) for items in loaded.values())
    settings = evaluation_settings(protocol, max_items, subset_seed, batch_size, num_beams, max_new_tokens)
    info = {"evaluator": f"lm-eval {lm_eval.__version__}", "settings": settings, **(metadata or {})}
    results = []
    for metric in _METRICS[protocol]:
        key = f"{metric},first_label" if protocol == "generate" else f"{metric},none"
        accuracy, counts, predictions = {}, {}, {}
        for name, harness_name in harness_names.items():
            # lm-eval's own metric is the accuracy; the rows only record what it predicted per item
            accuracy[name] = 100.0 * float(output["results"][harness_name][key])
            samples = output["samples"][harness_name]
            predictions[name] = _prediction_rows(TASKS[name], protocol, samples, normalised=metric == "acc_norm")
            counts[name] = len(predictions[name])
        label = f"lm-eval-{protocol}" + ("_norm" if metric == "acc_norm" else "")
        results.append(EvalResult(label, accuracy, counts, total / elapsed if elapsed else float("nan"), info))
        results[-1].predictions = predictions
    result = results[0]
    result.variants = results[1:]
    if output_dir is not None:
        write_result(result, Path(output_dir))
    return result
