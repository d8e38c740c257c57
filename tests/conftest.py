"""Shared fixtures: tiny random Llama-style models built from a config (no downloads)."""

from __future__ import annotations

import os

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moelora  # noqa: F401  (registers the methods with PEFT)


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
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 9), generator=generator)
