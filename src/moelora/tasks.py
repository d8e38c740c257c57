"""The eight commonsense tasks of the LLM-Adapters protocol: prompt templates, label sets, answer extraction.

The template strings are a data format and must stay byte-exact (specs: commonsense_protocol.md §2,
d2mora.md §7): later lines carry 16 spaces of indentation inherited from the original source files, the
training templates end the first line with two spaces, the evaluation template with one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INDENT = " " * 16

#: D2MoRA's training template: the line after the instruction is empty (d2mora.md §7).
D2MORA_TRAIN_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Response:\n{_INDENT}{{output}}"
)

#: LLM-Adapters / DoRA training template: the line after the instruction holds 16 spaces.
LLM_ADAPTERS_TRAIN_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{{output}}"
)

#: Evaluation prompt shared by LLM-Adapters, DoRA and D2MoRA; the model continues after the final indent.
EVAL_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Response:\n{_INDENT}"
)

TRAIN_TEMPLATES = {"d2mora": D2MORA_TRAIN_TEMPLATE, "llm_adapters": LLM_ADAPTERS_TRAIN_TEMPLATE}

RESPONSE_MARKER = "### Response:"


@dataclass(frozen=True)
class Task:
    """One commonsense task: its folder name in LLM-Adapters' `dataset/`, display name and label vocabulary.

    `opening` is the sentence every instruction of the task starts with, before the question; `option_prefix`
    introduces each option in the instruction ("Solution" for "Solution1: ..."), None where the labels are the
    answers themselves (BoolQ's true/false). Both let `split_options` read the question and the option texts
    back out of an instruction, for the cloze protocol and the text training targets.
    """

    name: str
    display: str
    labels: tuple[str, ...]
    opening: str = ""
    option_prefix: str | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        """Case-sensitive alternation of the labels; the first match in the response is the prediction."""
        return re.compile("|".join(re.escape(label) for label in self.labels))


_ANSWERS_1_TO_5 = tuple(f"answer{i}" for i in range(1, 6))
_PLEASE = "Please choose the correct "
_BOOLQ = "Please answer the following question with true or false, question: "
_QUESTION = f"{_PLEASE}answer to the question: "

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("boolq", "BoolQ", ("true", "false"), _BOOLQ),
        Task("piqa", "PIQA", ("solution1", "solution2"), f"{_PLEASE}solution to the question: ", "Solution"),
        Task("social_i_qa", "SIQA", _ANSWERS_1_TO_5, _QUESTION, "Answer"),
        Task(
            "hellaswag", "HellaSwag", tuple(f"ending{i}" for i in range(1, 5)),
            f"{_PLEASE}ending to complete the given sentence: ", "Ending",
        ),
        Task(
            "winogrande", "WinoGrande", ("option1", "option2"),
            f"{_PLEASE}answer to fill in the blank to complete the given sentence: ", "Option",
        ),
        Task("ARC-Challenge", "ARC-c", _ANSWERS_1_TO_5, _QUESTION, "Answer"),
        Task("ARC-Easy", "ARC-e", _ANSWERS_1_TO_5, _QUESTION, "Answer"),
        Task("openbookqa", "OBQA", _ANSWERS_1_TO_5, _QUESTION, "Answer"),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def extract_answer(task: Task, generated_text: str) -> str:
    """LLM-Adapters answer extraction: text after the last response marker, first label match, else ''."""
    response = generated_text.rsplit(RESPONSE_MARKER, 1)[-1].strip()
    match = task.pattern.search(response)
    return match.group(0) if match else ""


_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)")


def candidate_labels(task: Task, instruction: str) -> list[str]:
    """The labels an item offers: those named in its "Answer format:" hint (SIQA offers 3 of answer1..5), else
    all of the task's labels."""
    match = _ANSWER_FORMAT.search(instruction)
    if match:
        offered = [label for label in match.group(1).split("/") if label in task.labels]
        if offered:
            return offered
    return list(task.labels)


def split_options(task: Task, instruction: str) -> tuple[str, dict[str, str]]:
    """The question (the instruction without its opening sentence, options and answer-format hint) and, per
    offered label, the option's text, read back out of an LLM-Adapters instruction.

    Options are found in order ("Answer1: ", then "Answer2: " after it, ...), each running to the next one or to
    the hint, so an option's text may contain anything but the next option's marker. Raises ValueError when the
    instruction does not have the task's layout: a question scored without its options would be a silent error.
    """
    if not instruction.startswith(task.opening):
        raise ValueError(f"{task.name}: instruction does not start with the task's opening {task.opening!r}")
    body = instruction[len(task.opening) :].rsplit("Answer format:", 1)[0]
    labels = candidate_labels(task, instruction)
    if task.option_prefix is None:
        return body.strip(), {label: label for label in labels}
    starts = []
    for number in range(1, len(labels) + 1):
        marker = f"{task.option_prefix}{number}: "
        position = body.find(marker, starts[-1][1] if starts else 0)
        if position < 0:
            raise ValueError(f"{task.name}: option marker {marker.strip()!r} not found in the instruction")
        starts.append((position, position + len(marker)))
    ends = [position for position, _ in starts[1:]] + [len(body)]
    options = {label: body[start:end].strip() for label, (_, start), end in zip(labels, starts, ends, strict=True)}
    empty = [label for label, text in options.items() if not text]
    if empty:
        raise ValueError(f"{task.name}: option {empty[0]} has no text")
    return body[: starts[0][0]].strip(), options
