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
    """One commonsense task: its folder name in LLM-Adapters' `dataset/`, display name and label vocabulary."""

    name: str
    display: str
    labels: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern[str]:
        """Case-sensitive alternation of the labels; the first match in the response is the prediction."""
        return re.compile("|".join(re.escape(label) for label in self.labels))


_ANSWERS_1_TO_5 = tuple(f"answer{i}" for i in range(1, 6))

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("boolq", "BoolQ", ("true", "false")),
        Task("piqa", "PIQA", ("solution1", "solution2")),
        Task("social_i_qa", "SIQA", _ANSWERS_1_TO_5),
        Task("hellaswag", "HellaSwag", tuple(f"ending{i}" for i in range(1, 5))),
        Task("winogrande", "WinoGrande", ("option1", "option2")),
        Task("ARC-Challenge", "ARC-c", _ANSWERS_1_TO_5),
        Task("ARC-Easy", "ARC-e", _ANSWERS_1_TO_5),
        Task("openbookqa", "OBQA", _ANSWERS_1_TO_5),
    )
}


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
