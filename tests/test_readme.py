"""The README's ten-line D2MoRA example runs as written, on the real default model instead of the hub id."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moelora.models import default_model_path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_ten_line_example_trains_saves_and_reloads(tmp_path, monkeypatch):
    example = python_blocks()[0]
    assert len(example.strip().splitlines()) <= 15
    hub_id = 'model_id = "HuggingFaceTB/SmolLM2-135M"'
    assert hub_id in example
    example = example.replace(hub_id, f"model_id = {str(default_model_path())!r}")
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
