"""The README's Python examples run as written, offline, on the embedded default model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_ten_line_example_trains_saves_and_reloads(tmp_path, monkeypatch):
    example = python_blocks()[0]
    assert len([line for line in example.splitlines() if line.strip()]) <= 15  # the section title's promise
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)

    model, reloaded = namespace["model"], namespace["reloaded"]
    assert (tmp_path / "d2mora-adapter" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(namespace["loss"])
    batch = namespace["batch"]
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        assert torch.equal(trained, reloaded(**batch).logits)
        with model.disable_adapter():
            base = model(**batch).logits
    assert not torch.equal(trained, base)  # the one optimizer step changed the adapter's output


def test_the_second_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    steps = [line.removeprefix(".venv/bin/") for line in ci if line.startswith(("bash scripts", ".venv/bin/"))]
    command = next(line for line in README.read_text().splitlines() if "pytest" in line and "&&" in line)
    assert [step.strip().removeprefix(".venv/bin/") for step in command.split("&&")] == steps


def test_the_budget_table_has_a_row_per_method_of_dense_models():
    from moelora.methods import METHODS

    table = README.read_text().split("### `moelora budget`", 1)[1].split("### ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| \{", table, flags=re.M)
    assert rows == [name for name, method in METHODS.items() if not method.moe_only]
