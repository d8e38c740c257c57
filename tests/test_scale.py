"""Scaling features every method must support: gradient checkpointing gives the same gradients, and
GPU-only options fail with a clear message on CPU."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_all_methods import OWN_METHODS, make_config

from moelora import METHODS
from moelora.models import load_model_and_tokenizer

DENSE_METHODS = sorted(set(OWN_METHODS) | {"peft_lora", "peft_dora"})
#: Methods whose auxiliary losses are functions of forward values (router probabilities), not only of weights.
LOSSES_OF_FORWARD_VALUES = {"molora", "malora", "teamlora"}


def _gradients(
    method: str, model_factory, token_batch, checkpointing: str | None
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and adapter gradients of one training step; checks that checkpointing really recomputes."""
    base = model_factory()
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # the reentrant form only backpropagates into a checkpoint whose input needs grad
            base.enable_input_require_grads()
    if METHODS[method].native_to_peft:  # PEFT's own config: its init flag, and the method's preset (DoRA)
        config = make_config(method, init_lora_weights=False, lora_dropout=0.0, **METHODS[method].preset)
    else:
        config = make_config(method, init_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config).train()
    calls = []
    model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").register_forward_hook(
        lambda *_: calls.append(1)
    )
    loss = model(token_batch, labels=token_batch).loss
    loss.backward()
    assert len(calls) == (2 if checkpointing else 1), "the decoder layer should run again in backward"
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method, checkpointing, model_factory, token_batch):
    loss, grads = _gradients(method, model_factory, token_batch, checkpointing=None)
    if checkpointing == "reentrant" and method in LOSSES_OF_FORWARD_VALUES:
        # the no-grad first pass would leave the balance loss without a graph: refused, never silently wrong
        with pytest.raises(RuntimeError, match=r"auxiliary loss\(es\) \['(load_)?balance'\] have no gradient"):
            _gradients(method, model_factory, token_batch, checkpointing)
        return
    checkpointed_loss, checkpointed_grads = _gradients(method, model_factory, token_batch, checkpointing)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert checkpointed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_dense_method_is_covered():
    assert set(DENSE_METHODS) <= set(METHODS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message only")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_models_are_refused_on_cpu(quantization, tiny_model_dir):
    with pytest.raises(ValueError, match=f"quantization={quantization!r} needs a CUDA GPU"):
        load_model_and_tokenizer(str(tiny_model_dir), quantization=quantization)


@pytest.mark.parametrize("method", sorted(LOSSES_OF_FORWARD_VALUES))
def test_the_pipeline_checkpoints_without_losing_auxiliary_losses(method, tmp_path, tiny_model_dir):
    from test_all_methods import TINY_SETTINGS
    from test_training import load, make_config

    from moelora.training import train

    config = make_config(tmp_path / "run", max_steps=2, gradient_checkpointing=True)
    config.method, config.adapter = method, {"r": 4, "lora_alpha": 8, **TINY_SETTINGS[method]}
    result = train(config, *load(tiny_model_dir))  # reentrant checkpointing would raise on the balance loss
    assert (result.output_dir / "adapter_model.safetensors").is_file()
