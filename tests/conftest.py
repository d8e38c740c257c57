"""Shared fixtures: tiny random Llama-style models built from a config (no downloads)."""

from __future__ import annotations

import os

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moelora  # noqa: F401  (registers the methods with PEFT)

#: MOELORA_TEST_DEVICE=cuda runs the tests with CUDA as torch's default device, so models and tensors the tests
#: build land on the GPU without each test naming a device (issue 17: the method tests on CUDA). CPU CI leaves it
#: unset. Tests take their generators from `generator(seed)` and their autocast device from `AUTOCAST_DEVICE`
#: below, never a hard-coded CPU one.
TEST_DEVICE = os.environ.get("MOELORA_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)

#: The device type to name in `torch.autocast(...)`: autocast only acts on ops of its own device type, so a CPU
#: autocast around CUDA tensors would silently run the test in fp32.
AUTOCAST_DEVICE = torch.device(TEST_DEVICE).type


def generator(seed: int) -> torch.Generator:
    """A generator seeded with `seed` on the tests' default device, for `torch.randn(..., generator=...)` and the
    like: those draw on the default device and refuse a generator of another one ("Expected a 'cuda' device type
    for generator"). On the CPU it is the `torch.Generator().manual_seed(seed)` of before: the same numbers."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture
def model_factory():
    return tiny_llama


@pytest.fixture
def token_batch():
    return torch.randint(0, 96, (2, 9), generator=generator(1))


def train_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in memory on the bundled sample (no downloads)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moelora.data import bundled_train_sources

    texts = []
    for path in bundled_train_sources().values():
        texts += [r["instruction"] + " " + r["output"] for r in json.loads(path.read_text())[:50]]
    texts.append("Below is an instruction that describes a task. Write a response that appropriately completes")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a local model folder (loads like any HF model)."""
    tokenizer = train_tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
