"""What every registered method must do through PEFT, on a tiny random Llama: zero update at init, gradients
to every adapter tensor, exact save/load, bf16 autocast, merge (or a clear refusal). Method-specific math
lives in each method's own test file."""

from __future__ import annotations

import pytest
import torch
from conftest import AUTOCAST_DEVICE
from peft import PeftModel, get_peft_model

from moelora import METHODS, MoeLoraLayer

#: Small settings per method for a model with hidden size 32. Every registered method needs an entry.
TINY_SETTINGS: dict[str, dict] = {
    "lora": {},
    "d2mora": {"num_down_experts": 2, "num_up_experts": 3},
    "hydralora": {"num_experts": 3},
    "molora": {"num_experts": 4, "top_k": 2},
    "moslora": {},
    "comol": {"num_experts": 3},
    "teamlora": {"num_experts": 2},
    "malora": {"num_experts": 3, "top_k": 2, "subspace_rank": 8},
    "smora": {"top_k": 2},
    # zero-init PA so the update is exactly zero at init (the official PA init is only near zero: test_moa.py)
    "moa_soft": {"parallel_adapter_zero_init": True},
    "moa_sparse": {"parallel_adapter_zero_init": True},
    "peft_lora": {},
    "peft_dora": {},
}
#: Methods that adapt the routed experts of MoE models (DR-LoRA) refuse this dense Llama; test_drlora.py runs the
#: same contract on tiny MoE models of every architecture they support.
MOE_ONLY_METHODS = {name for name, method in METHODS.items() if method.moe_only}
#: The contract below is moelora's; PEFT's own methods (peft_lora, peft_dora) only train through the pipeline.
OWN_METHODS = sorted(
    name for name, method in METHODS.items() if not method.native_to_peft and name not in MOE_ONLY_METHODS
)


def make_config(method: str, **overrides):
    entry = METHODS[method]  # with its preset, as the pipeline builds it (moa_sparse: MoAConfig with sparse=True)
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **entry.preset)
    settings.update(TINY_SETTINGS[method], **overrides)
    return entry.config_cls(**settings)


def test_every_method_has_tiny_settings():
    assert set(TINY_SETTINGS) == set(METHODS) - MOE_ONLY_METHODS


@pytest.mark.parametrize("method", OWN_METHODS)
def test_update_is_zero_at_init(method, model_factory, token_batch):
    base_logits = model_factory()(token_batch).logits
    model = get_peft_model(model_factory(), make_config(method))
    torch.testing.assert_close(model(token_batch).logits, base_logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", OWN_METHODS)
def test_gradients_reach_every_adapter_tensor_and_never_the_base(method, model_factory, token_batch):
    model = get_peft_model(model_factory(), make_config(method, init_weights=False)).train()
    model(token_batch, labels=token_batch).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert param.grad is None, f"the frozen {name} got a gradient"


@pytest.mark.parametrize("method", OWN_METHODS)
def test_save_and_load_reproduce_outputs_exactly(method, model_factory, token_batch, tmp_path):
    model = get_peft_model(model_factory(), make_config(method, init_weights=False)).eval()
    expected = model(token_batch).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    assert type(reloaded.peft_config["default"]) is METHODS[method].config_cls
    torch.testing.assert_close(reloaded(token_batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", OWN_METHODS)
def test_bf16_autocast_keeps_fp32_adapter_weights(method, model_factory, token_batch):
    model = get_peft_model(model_factory(), make_config(method, init_weights=False)).train()
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        loss = model(token_batch, labels=token_batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", OWN_METHODS)
def test_merge_is_exact_or_refused_with_a_reason(method, model_factory, token_batch):
    model = get_peft_model(model_factory(), make_config(method, init_weights=False)).eval()
    expected = model(token_batch).logits
    layer_cls = model.base_model.tuner_layer_cls
    if layer_cls.merge_unsupported_reason:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_and_unload()
    else:
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(token_batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", OWN_METHODS)
def test_unload_gives_back_the_plain_model_without_hooks(method, model_factory, token_batch):
    expected = model_factory()(token_batch).logits
    plain = get_peft_model(model_factory(), make_config(method, init_weights=False)).unload()
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    assert not any(isinstance(module, MoeLoraLayer) for module in plain.modules())
    torch.testing.assert_close(plain(token_batch).logits, expected, rtol=0, atol=0)
