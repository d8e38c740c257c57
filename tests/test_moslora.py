"""MoSLoRA against its spec (baselines.md §2.9): formula, mixer init, exact merge, counts, PEFT round trip."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AUTOCAST_DEVICE
from peft import PeftModel, get_peft_model
from reference import recording_keep_masks
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import LoraConfig, MoSLoRAConfig
from moelora.methods.moslora import MoSLoRALinear


def moslora_reference(x, A, mixer, B, scaling):
    """Δy = s · B W_mix A x, one token at a time, in float64."""
    flat = x.double().reshape(-1, x.shape[-1])
    rows = [scaling * (B.double() @ (mixer.double() @ (A.double() @ token))) for token in flat]
    return torch.stack(rows).reshape(*x.shape[:-1], B.shape[0])


def make_layer(d_in=16, d_out=24, **config) -> MoSLoRALinear:
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, init_weights=False)
    settings.update(config)
    return MoSLoRALinear(nn.Linear(d_in, d_out), "default", MoSLoRAConfig(**settings))


def params(layer: MoSLoRALinear):
    return layer.moslora_A["default"], layer.moslora_mixer["default"], layer.moslora_B["default"]


# --- forward against the formula --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16)])
def test_forward_equals_the_formula_in_eval_mode(shape):
    layer = make_layer(lora_dropout=0.3).eval()
    x = torch.randn(*shape)
    expected = layer.base_layer(x).double() + moslora_reference(x, *params(layer), scaling=2.0)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_forward_equals_the_formula_in_train_mode_without_dropout():
    layer = make_layer(lora_dropout=0.0).train()
    x = torch.randn(3, 6, 16)
    expected = layer.base_layer(x).double() + moslora_reference(x, *params(layer), scaling=2.0)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_dropout_is_applied_once_to_the_input_before_A(monkeypatch):
    layer = make_layer(lora_dropout=0.5).train()
    x = torch.randn(5, 16, requires_grad=True)
    masks = recording_keep_masks(monkeypatch)
    got = layer(x)
    ((keep,),) = masks  # one mask [1, T, d_in]
    assert keep.shape == x.shape and (keep == 0).any()
    x_ref = x.detach().clone().requires_grad_()
    ref_params = [t.detach().clone().requires_grad_() for t in params(layer)]
    expected = layer.base_layer(x_ref).double() + moslora_reference(x_ref * keep / 0.5, *ref_params, scaling=2.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    got.double().pow(2).sum().backward()
    expected.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for name, reference in zip(MoSLoRALinear.adapter_layer_names, ref_params, strict=True):
        torch.testing.assert_close(getattr(layer, name)["default"].grad, reference.grad, atol=1e-5, rtol=1e-5)


def test_identity_mixer_equals_lora(model_factory, token_batch):
    common = dict(r=4, lora_alpha=8, init_weights=False, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    moslora = get_peft_model(model_factory(), MoSLoRAConfig(**common))
    lora = get_peft_model(model_factory(), LoraConfig(**common))
    with torch.no_grad():
        moslora_layers = [m for m in moslora.modules() if isinstance(m, MoSLoRALinear)]
        lora_layers = [m for m in lora.modules() if type(m).__name__ == "LoraLinear"]
        for ours, theirs in zip(moslora_layers, lora_layers, strict=True):
            ours.moslora_mixer["default"].copy_(torch.eye(4))
            theirs.lora_A["default"].copy_(ours.moslora_A["default"])
            theirs.lora_B["default"].copy_(ours.moslora_B["default"])
        torch.testing.assert_close(
            moslora(input_ids=token_batch).logits, lora(input_ids=token_batch).logits, atol=1e-6, rtol=1e-6
        )


# --- init ------------------------------------------------------------------------------------------------------


def test_update_is_zero_at_init(model_factory, token_batch):
    base_logits = model_factory()(input_ids=token_batch).logits
    model = get_peft_model(model_factory(), MoSLoRAConfig(r=4))
    assert torch.equal(model(input_ids=token_batch).logits, base_logits)


def test_mixer_init_is_kaiming_uniform_a_sqrt5():
    """kaiming_uniform(a=√5) on an r×r matrix is U(±1/sqrt(r)); B is zero, A is U(±1/sqrt(d_in))."""
    torch.manual_seed(0)
    layer = MoSLoRALinear(nn.Linear(256, 128), "default", MoSLoRAConfig(r=64))
    A, mixer, B = params(layer)
    bound = 1 / math.sqrt(64)
    assert mixer.abs().max() <= bound and mixer.abs().max() > 0.99 * bound
    assert math.isclose(float(mixer.detach().std()), bound / math.sqrt(3), rel_tol=0.05)
    assert A.abs().max() <= 1 / math.sqrt(256) and A.abs().max() > 0.99 / math.sqrt(256)
    assert not B.any()
    reference = nn.Linear(64, 64, bias=False).weight  # torch's own default init of an r×r Linear
    assert math.isclose(float(reference.detach().std()), float(mixer.detach().std()), rel_tol=0.1)


# --- merging -------------------------------------------------------------------------------------------------


def test_merge_and_unload_equals_the_unmerged_output(model_factory, token_batch):
    assert MoSLoRALinear.merge_unsupported_reason == "", "declared mergeable (test_all_methods relies on it)"
    model = get_peft_model(model_factory(), MoSLoRAConfig(r=4, lora_alpha=8, init_weights=False)).eval()
    unmerged = model(input_ids=token_batch).logits
    base = model_factory()(input_ids=token_batch).logits
    assert (unmerged - base).abs().max() > 1e-3, "the adapters must actually change the output"
    merged = model.merge_and_unload()
    assert not any("moslora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=token_batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_s_B_mixer_A_and_unmerge_restores_the_base():
    layer = make_layer(lora_alpha=12).eval()
    A, mixer, B = params(layer)
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(delta.double(), 3.0 * B.double() @ mixer.double() @ A.double(), atol=1e-6, rtol=1e-6)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 16)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)


# --- gradients, counts ---------------------------------------------------------------------------------------


def test_gradients_reach_A_the_mixer_and_B_and_not_the_base(model_factory, token_batch):
    model = get_peft_model(model_factory(), MoSLoRAConfig(r=4, lora_alpha=8)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B has gradient (B = 0 blocks the rest); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "moslora_" in name
            assert (param.grad.abs().sum(-1) > 0).all(), f"{name}: a row got no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 3  # 2 layers x q,k,v x 3 tensors


def test_d2mora_table_parameter_count_r64():
    llama7b = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(llama7b)
    peft_model = get_peft_model(model, MoSLoRAConfig(r=64, lora_alpha=128))  # q, k, v by default
    count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert (64 * (4096 + 4096) + 64 * 64) * 96 == 50_724_864
    assert count == 50_724_864


# --- PEFT round trip, dtypes, config --------------------------------------------------------------------------


def test_save_and_load_reproduce_outputs_exactly(model_factory, token_batch, tmp_path):
    model = get_peft_model(model_factory(), MoSLoRAConfig(r=4, init_weights=False, task_type="CAUSAL_LM")).eval()
    expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], MoSLoRAConfig)
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


def test_bf16_autocast_on_cpu(model_factory, token_batch):
    model = get_peft_model(model_factory(), MoSLoRAConfig(r=4, init_weights=False))
    reference = model(input_ids=token_batch).logits
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=token_batch, labels=token_batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (out.logits.float() - reference).abs().max() < 0.1
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"r": 0}, r"MoSLoRAConfig\.r "), ({"lora_alpha": -1}, r"MoSLoRAConfig\.lora_alpha")],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MoSLoRAConfig(**overrides)
