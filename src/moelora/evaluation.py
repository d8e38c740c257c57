"""The commonsense evaluation: the LLM-Adapters generation protocol and a likelihood protocol.

- `generate` (commonsense_protocol.md §3-5): the exact evaluation prompt, beam search with 4 beams and 32 new
  tokens (greedy as an option), the whole sequence decoded, the first label match after the last
  "### Response:" is the prediction, exact-match accuracy. Batched with left padding *and* the attention
  mask (the original passes no mask, which is why it needs batch size 1), items sorted by length.
- `likelihood`: each candidate label is scored by the log-probability of the target the model was trained to
  write, "the correct answer is <label>", after the same prompt; the best-scoring candidate is the
  prediction. The shared words score the same for every candidate of an item, so only the label decides.
  Candidates are the labels named in the instruction's "Answer format:" hint (SIQA offers 3 of answer1..5).
  Deterministic, one forward pass per item (its candidates form one batch), and informative even before a
  small model has learned the answer format.
- `cloze`: what lm-evaluation-harness does for PIQA, ARC, HellaSwag and the rest, and what small models can be
  measured by (below about a billion parameters they do not learn to bind option labels to option texts).
  The prompt holds the question alone (`tasks.split_options`: no options, no answer-format hint); each option's
  text is scored by the sum of its tokens' log-probabilities after it. `cloze` predicts the best sum (lm-eval's
  `acc`), `cloze_norm` the best sum per character of the option (lm-eval's `acc_norm`, which removes the bias
  towards short options). Tokenisation follows lm-eval: the prompt's trailing whitespace moves into the
  continuation, the whole text is tokenised at once and the continuation is what follows the prompt's tokens.
  A model trained with `data.target: text` writes exactly these continuations.

All run in eval mode under inference_mode; results name their protocol.
"""

from __future__ import annotations

import inspect
import json
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .data import load_records
from .tasks import EVAL_TEMPLATE, TASKS, Task, candidate_labels, extract_answer, get_task, split_options

PROTOCOLS = ("likelihood", "generate", "cloze")
#: Results a protocol writes besides its own: `cloze` scores once and predicts twice.
VARIANTS = {"cloze": ("cloze_norm",)}


@dataclass
class EvalResult:
    protocol: str
    accuracy: dict[str, float]  # task -> accuracy in %
    counts: dict[str, int]
    items_per_second: float
    metadata: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    #: Results computed from the same scores under another rule (`cloze_norm` beside `cloze`).
    variants: list[EvalResult] = field(default_factory=list, repr=False)

    @property
    def average(self) -> float:
        """Unweighted mean over the evaluated tasks, as the papers report."""
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "accuracy": self.accuracy,
            "average": self.average,
            "counts": self.counts,
            "items_per_second": self.items_per_second,
            **self.metadata,
        }


def with_variants(result: EvalResult) -> list[EvalResult]:
    """The result followed by its variants, for tables and files that list every protocol."""
    return [result, *result.variants]


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


@torch.inference_mode()
def _generate(model, tokenizer, task: Task, prompts: list[str], batch_size: int, config: GenerationConfig, bar):
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[str] = [""] * len(prompts)
    for batch in _batches(order, batch_size):
        inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(model.device)
        output = model.generate(**inputs, generation_config=config)
        for i, sequence in zip(batch, tokenizer.batch_decode(output, skip_special_tokens=True), strict=True):
            texts[i] = sequence
        bar.update(len(batch))
    return [{"output": text, "prediction": extract_answer(task, text)} for text in texts]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    shortest = min(len(ids) for ids in sequences)
    while length < shortest and all(ids[length] == sequences[0][length] for ids in sequences):
        length += 1
    return length


def _candidate_sequences(tokenizer, task: Task, record: dict, prompt: str) -> tuple[list[str], list[int], list]:
    """The candidate labels, the token ids they share (prompt and "the correct answer is ..."), and the tail
    of ids where each candidate differs. Each text is tokenised whole (prompt + target), as in training."""
    labels = candidate_labels(task, record["instruction"])
    sequences = [tokenizer(prompt + f"the correct answer is {label}")["input_ids"] for label in labels]
    shared = min(_common_prefix_length(sequences), min(len(ids) for ids in sequences) - 1)
    return labels, sequences[0][:shared], [ids[shared:] for ids in sequences]


def _next_token_log_probs(model, prefixes: list[list[int]], pad: int) -> torch.Tensor:
    """Log-probabilities of the next token after each prefix, in one left-padded forward pass."""
    width = max(len(prefix) for prefix in prefixes)
    input_ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, prefix in enumerate(prefixes):
        input_ids[row, width - len(prefix) :] = torch.tensor(prefix)
        attention[row, width - len(prefix) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        position_ids=positions.to(model.device),
        logits_to_keep=1,
    ).logits
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def _cache_keyword(model) -> str:
    """The KV cache's name in this transformers version: `cache` since 5.2x (`past_key_values` then warns on
    every call), `past_key_values` before; the same name is the output's field."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"


def _tail_scores(model, prefix: list[int], tails: list[list[int]], pad: int) -> list[float]:
    """Candidates that differ in more than one token: the prefix runs once and its KV cache is repeated for
    the candidates, which then only run their own tokens (right padded, so each keeps its positions)."""
    head = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True, logits_to_keep=1)
    first_log_probs = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
    width = max(len(tail) for tail in tails)
    tail_ids = torch.full((len(tails), width), pad, dtype=torch.long)
    attention = torch.zeros((len(tails), len(prefix) + width), dtype=torch.long)
    attention[:, : len(prefix)] = 1
    for row, tail in enumerate(tails):
        tail_ids[row, : len(tail)] = torch.tensor(tail)
        attention[row, len(prefix) : len(prefix) + len(tail)] = 1
    keyword = _cache_keyword(model)
    cache = getattr(head, keyword)
    cache.batch_repeat_interleave(len(tails))
    logits = model(
        input_ids=tail_ids.to(model.device), attention_mask=attention.to(model.device), **{keyword: cache}
    ).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return [
        float(
            first_log_probs[tail[0]]
            + log_probs[row, torch.arange(len(tail) - 1), torch.tensor(tail[1:], dtype=torch.long)].sum()
        )
        for row, tail in enumerate(tails)
    ]


@torch.inference_mode()
def _likelihood(model, tokenizer, task: Task, records: list[dict], prompts: list[str], batch_size: int, bar):
    """Score each item's candidates by the log-probability of the tokens where they differ (the shared tokens
    would add the same amount to every candidate) and predict the best.

    When the candidates differ in their last token only (true/false, answer1..answer4 with most tokenizers),
    one forward pass over the shared prefix scores them all, and items run in length-sorted batches; otherwise
    an item takes a second, cached pass over its candidates' tails.
    """
    pad = tokenizer.pad_token_id
    items = [_candidate_sequences(tokenizer, task, r, p) for r, p in zip(records, prompts, strict=True)]
    scores: list[list[float]] = [[] for _ in items]
    single = [i for i, (_, _, tails) in enumerate(items) if all(len(tail) == 1 for tail in tails)]
    for batch in _batches(sorted(single, key=lambda i: -len(items[i][1])), batch_size):
        log_probs = _next_token_log_probs(model, [items[i][1] for i in batch], pad)
        for row, i in enumerate(batch):
            scores[i] = [float(log_probs[row, tail[0]]) for tail in items[i][2]]
        bar.update(len(batch))
    for i in sorted(set(range(len(items))) - set(single)):
        scores[i] = _tail_scores(model, items[i][1], items[i][2], pad)
        bar.update(1)
    results = []
    for (labels, _, _), item_scores in zip(items, scores, strict=True):
        best = max(range(len(labels)), key=lambda k: item_scores[k])
        results.append({"prediction": labels[best], "scores": dict(zip(labels, item_scores, strict=True))})
    return results


def cloze_prompt_and_options(task: Task, record: dict) -> tuple[str, dict[str, str]]:
    """The cloze prompt (the evaluation template around the bare question) and the option texts, per label."""
    try:
        question, options = split_options(task, record["instruction"])
    except ValueError as error:
        raise ValueError(f"cloze protocol: {error}: {record['instruction'][:80]!r}...") from None
    return EVAL_TEMPLATE.format(instruction=question), options


def continuation_tokens(tokenizer, context: str, continuations: list[str]) -> list[tuple[list[int], int]]:
    """lm-eval's `_encode_pair` for each continuation of one context: trailing whitespace of the context joins the
    continuation, the whole text is tokenised at once, and the continuation is what follows the context's own
    tokens. Returns per continuation the token ids of the whole text and where the continuation starts (always
    leaving it at least one token); the context is tokenised once."""
    spaces = len(context) - len(context.rstrip())
    head, tail = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
    context_length = len(tokenizer(head)["input_ids"])
    pairs = []
    for continuation in continuations:
        whole = tokenizer(head + tail + continuation)["input_ids"]
        pairs.append((whole, min(context_length, len(whole) - 1)))
    return pairs


def _sequence_log_probs(model, sequences: list[tuple[list[int], int]], pad: int) -> list[float]:
    """For each (token ids, continuation start), the summed log-probability of the continuation tokens, in one
    right-padded forward pass."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    scored = torch.zeros((len(sequences), width - 1))  # position p scores token p + 1
    for row, (ids, start) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        scored[row, start - 1 : len(ids) - 1] = 1
    input_ids = input_ids.to(model.device)
    logits = model(input_ids=input_ids, attention_mask=attention.to(model.device)).logits[:, :-1].float()
    picked = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(scored.to(picked.device).bool(), picked, 0.0).sum(-1).tolist()


@torch.inference_mode()
def _cloze(model, tokenizer, task: Task, records: list[dict], batch_size: int, bar) -> list[list[dict[str, Any]]]:
    """Per item, the (acc, acc_norm) prediction rows: every option of every item is one sequence, and the
    sequences run in length-sorted batches of `batch_size`."""
    items = [cloze_prompt_and_options(task, record) for record in records]
    sequences = []  # (item, label, token ids, continuation start)
    for number, (prompt, options) in enumerate(items):
        pairs = continuation_tokens(tokenizer, prompt, list(options.values()))
        sequences += [(number, label, *pair) for label, pair in zip(options, pairs, strict=True)]
    order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k][2]))
    scores: list[dict[str, float]] = [{} for _ in items]
    for batch in _batches(order, batch_size):
        totals = _sequence_log_probs(model, [sequences[k][2:] for k in batch], tokenizer.pad_token_id)
        for k, total in zip(batch, totals, strict=True):
            scores[sequences[k][0]][sequences[k][1]] = total
        bar.update(len(batch) * len(items) / len(sequences))  # in items, as the other protocols count
    rows = []
    for (_, options), item_scores in zip(items, scores, strict=True):
        labels = list(options)
        lengths = {label: len(options[label]) for label in labels}
        best = max(labels, key=lambda label: item_scores[label])
        best_norm = max(labels, key=lambda label: item_scores[label] / lengths[label])
        common = {"scores": {label: item_scores[label] for label in labels}, "lengths": lengths}
        rows.append([{"prediction": best, **common}, {"prediction": best_norm, **common}])
    return rows


def _scored_rows(items: list[tuple[int, dict]], outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"index": index, "instruction": r["instruction"], "answer": r.get("answer", ""), **out,
         "correct": out["prediction"] == r.get("answer")}
        for (index, r), out in zip(items, outputs, strict=True)
    ]  # fmt: skip


def _accuracy(rows: list[dict[str, Any]]) -> float:
    return 100.0 * sum(row["correct"] for row in rows) / len(rows) if rows else float("nan")


def evaluate(
    model,
    tokenizer: PreTrainedTokenizerBase,
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
    show_progress: bool = True,
) -> EvalResult:
    """Accuracy per task on LLM-Adapters-format test files; writes predictions and results if `output_dir`.

    `cloze` returns the `acc` result with the `cloze_norm` (acc_norm) result in its `variants`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token (moelora.models.load_model_and_tokenizer sets one)")
    tokenizer.padding_side = "left"
    model.eval()
    generation = GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    loaded = load_test_items(test_files, max_items, subset_seed)
    total = sum(len(records) for records in loaded.values())
    names = [protocol, *VARIANTS.get(protocol, ())]
    predictions: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in names}
    started = time.perf_counter()
    with tqdm(total=total, desc=f"eval ({protocol})", unit="item", disable=not show_progress) as bar:
        for name, items in loaded.items():
            task = TASKS[name]
            records = [record for _, record in items]
            prompts = [EVAL_TEMPLATE.format(instruction=record["instruction"]) for record in records]
            if protocol == "generate":
                outputs = [_generate(model, tokenizer, task, prompts, batch_size, generation, bar)]
            elif protocol == "cloze":
                rows = _cloze(model, tokenizer, task, records, batch_size, bar)
                outputs = [[row[k] for row in rows] for k in range(len(names))]
            else:
                outputs = [_likelihood(model, tokenizer, task, records, prompts, batch_size, bar)]
            for variant, variant_outputs in zip(names, outputs, strict=True):
                predictions[variant][name] = _scored_rows(items, list(variant_outputs))
    elapsed = time.perf_counter() - started
    settings = evaluation_settings(protocol, max_items, subset_seed, batch_size, num_beams, max_new_tokens)
    info = {"evaluator": "moelora", "settings": settings, **(metadata or {})}
    results = []
    for variant in names:
        by_task = predictions[variant]
        accuracy = {task: _accuracy(rows) for task, rows in by_task.items()}
        counts = {task: len(rows) for task, rows in by_task.items()}
        results.append(EvalResult(variant, accuracy, counts, total / elapsed if elapsed else float("nan"), info))
        results[-1].predictions = by_task
    result = results[0]
    result.variants = results[1:]
    if output_dir is not None:
        write_result(result, Path(output_dir))
    return result


def load_test_items(
    test_files: Mapping[str, str | Path], max_items: int | None, subset_seed: int | None = None
) -> dict[str, list[tuple[int, dict]]]:
    """Per task, the (index in the file, record) pairs to evaluate: all of them, the first `max_items`, or, with
    `subset_seed`, `max_items` drawn at random without replacement (the same draw for every run with that seed,
    kept in file order). The first N items of a file are not a fair sample (BoolQ's open with one label run)."""
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    if subset_seed is not None and max_items is None:
        raise ValueError("subset_seed draws max_items items per task; set max_items too")
    loaded = {}
    for name, path in test_files.items():
        records = load_records(path, get_task(name).name)
        indices = list(range(len(records)))
        if max_items is not None and subset_seed is not None and max_items < len(records):
            # the task name in the seed: tasks of equal size get different draws
            indices = sorted(random.Random(f"{subset_seed}:{name}").sample(indices, max_items))
        elif max_items is not None:
            indices = indices[:max_items]
        loaded[name] = [(index, records[index]) for index in indices]
    return loaded


def evaluation_settings(
    protocol: str,
    max_items: int | None,
    subset_seed: int | None,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """What a result depends on beyond model and items, recorded with it so comparisons can check it."""
    settings: dict[str, Any] = {"max_items": max_items, "batch_size": batch_size}
    if subset_seed is not None:
        settings["subset_seed"] = subset_seed
    if protocol.endswith("generate"):
        settings |= {"num_beams": num_beams, "max_new_tokens": max_new_tokens}
    return settings


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Add the file's name to an OSError raised while writing it: a full disk raises ENOSPC from write() or close(),
    whose message ("No space left on device") names no file."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        if error.errno is None:
            raise OSError(f"{path}: {error}") from error
        raise type(error)(error.errno, f"{error.strerror} (writing the evaluation results)", str(path)) from error


def write_result(result: EvalResult, output_dir: Path) -> None:
    """`results_<protocol>.json` and `predictions_<protocol>_<task>.jsonl`, for the result and its variants."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for each in with_variants(result):
        for task, rows in each.predictions.items():
            path = output_dir / f"predictions_{each.protocol}_{task}.jsonl"
            with _naming(path), open(path, "w") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
        path = output_dir / f"results_{each.protocol}.json"
        with _naming(path):
            path.write_text(json.dumps(each.summary(), indent=2))


def results_to_markdown(results: list[EvalResult]) -> str:
    """One row per result (e.g. base vs tuned, per protocol); tasks as columns, then the average."""
    tasks = [name for name in TASKS if any(name in r.accuracy for r in results)]
    header = ["run", "protocol", "trainable params", *(TASKS[t].display for t in tasks), "Avg", "items"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        params = r.metadata.get("trainable_parameters")
        cells = [
            str(r.metadata.get("label", r.metadata.get("method", "?"))),
            r.protocol,
            f"{params:,}" if isinstance(params, int) else "-",
            *(f"{r.accuracy[t]:.1f}" if t in r.accuracy else "-" for t in tasks),
            f"**{r.average:.1f}**",
            str(sum(r.counts.values())),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    model = next((r.metadata["model"] for r in results if r.metadata.get("model")), None)
    if model:
        lines.append(f"\nModel: {model}. Accuracy in %; Avg is the unweighted mean over the tasks shown.")
    return "\n".join(lines)
