"""HydraLoRA against its spec (baselines.md §2.2): loop form, dropout, LoRA equivalence, counts, PEFT round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import AUTOCAST_DEVICE
from peft import PeftModel, get_peft_model
from reference import check_masks_against_loop
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import HydraLoRAConfig, LoraConfig
from moelora.methods.hydralora import HydraLoRALinear


def hydra_loop(x, A, B, router, scaling, dropped_inputs=None):
    """Official-style HydraLoRA forward, one head at a time, in float64.

    x: [..., d_in]; A: [r, d_in]; B: [K, d_out, r]; router: [K, d_in].
    dropped_inputs: optional list of K tensors like x, the input each head's A projection sees after dropout.
    """
    g = torch.softmax(x.double() @ router.double().T, dim=-1)
    delta = torch.zeros(*x.shape[:-1], B.shape[1], dtype=torch.float64)
    for k in range(B.shape[0]):
        x_k = x if dropped_inputs is None else dropped_inputs[k]
        delta = delta + g[..., k : k + 1] * ((x_k.double() @ A.double().T) @ B[k].double().T) * scaling
    return delta


def make_layer(d_in=16, d_out=24, **config) -> HydraLoRALinear:
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, num_experts=5, init_weights=False)
    settings.update(config)
    return HydraLoRALinear(nn.Linear(d_in, d_out), "default", HydraLoRAConfig(**settings))


def params(layer: HydraLoRALinear):
    return layer.hydra_A["default"], layer.hydra_B["default"], layer.hydra_router["default"]


# --- fused form against the per-head loop -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_fused_equals_loop_form_in_eval_mode(shape):
    layer = make_layer(lora_dropout=0.3).eval()
    x = torch.randn(*shape)
    expected = layer.base_layer(x).double() + hydra_loop(x, *params(layer), scaling=2.0)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_fused_equals_loop_form_in_train_mode_without_dropout():
    layer = make_layer(lora_dropout=0.0).train()
    x = torch.randn(3, 6, 16)
    expected = layer.base_layer(x).double() + hydra_loop(x, *params(layer), scaling=2.0)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_default_dropout_is_one_mask_shared_by_all_heads(form, monkeypatch):
    """A·x is computed once, on one dropped copy of x."""
    layer = make_layer(lora_dropout=0.5).train()
    check_masks_against_loop(
        layer,
        torch.randn(4, 16),
        lambda x, *weights, dropped_inputs: hydra_loop(x, *weights, 2.0, dropped_inputs=dropped_inputs),
        params(layer),
        0.5,
        monkeypatch,
        experts_sharing_one_mask=5,
        form=form,
    )


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_independent_mask_per_head_option_matches_the_official_loop(form, monkeypatch):
    layer = make_layer(lora_dropout=0.5, shared_dropout_mask=False).train()
    check_masks_against_loop(
        layer,
        torch.randn(4, 16),
        lambda x, *weights, dropped_inputs: hydra_loop(x, *weights, 2.0, dropped_inputs=dropped_inputs),
        params(layer),
        0.5,
        monkeypatch,
        form=form,
    )


def test_router_sees_the_input_without_dropout():
    layer = make_layer(lora_dropout=0.9).train()
    x = torch.randn(6, 16)
    layer.routing.enabled = True
    layer(x)
    mean_prob = torch.tensor(layer.routing.stats["default/router"].as_dict()["mean_prob"], dtype=torch.float64)
    expected = torch.softmax(x.double() @ layer.hydra_router["default"].double().T, -1).mean(0)
    torch.testing.assert_close(mean_prob, expected, atol=1e-6, rtol=1e-6)


# --- equivalence with LoRA for one head ---------------------------------------------------------------------


def test_one_head_equals_lora_with_the_same_A_and_B(model_factory, token_batch):
    common = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    hydra = get_peft_model(model_factory(), HydraLoRAConfig(num_experts=1, **common))
    lora = get_peft_model(model_factory(), LoraConfig(**common))
    torch.manual_seed(3)
    with torch.no_grad():
        hydra_layers = [m for m in hydra.modules() if isinstance(m, HydraLoRALinear)]
        lora_layers = [m for m in lora.modules() if type(m).__name__ == "LoraLinear"]
        for hydra_layer, lora_layer in zip(hydra_layers, lora_layers, strict=True):
            A, B = torch.randn(4, 32) * 0.2, torch.randn(hydra_layer.out_features, 4) * 0.2
            hydra_layer.hydra_A["default"].copy_(A)
            hydra_layer.hydra_B["default"].copy_(B.unsqueeze(0))
            hydra_layer.hydra_router["default"].normal_()  # a single softmax weight is 1 whatever the router
            lora_layer.lora_A["default"].copy_(A)
            lora_layer.lora_B["default"].copy_(B)
        got, expected = hydra(input_ids=token_batch).logits, lora(input_ids=token_batch).logits
        with hydra.disable_adapter():
            base = hydra(input_ids=token_batch).logits
    assert (got - base).abs().max() > 1e-3, "the adapters must actually change the output"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# --- init, gradients, freezing, merging -------------------------------------------------------------------


def test_update_is_zero_at_init(model_factory, token_batch):
    base_logits = model_factory()(input_ids=token_batch).logits
    model = get_peft_model(model_factory(), HydraLoRAConfig(r=4, num_experts=3))
    assert torch.equal(model(input_ids=token_batch).logits, base_logits)


def test_gradients_reach_every_head_the_router_and_A_and_not_the_base(model_factory, token_batch):
    model = get_peft_model(model_factory(), HydraLoRAConfig(r=4, num_experts=3)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B has gradient (B = 0 blocks the rest); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "hydra_" in name
            per_row = param.grad.flatten(1).abs().sum(1) if param.grad.dim() == 3 else param.grad.abs().sum(-1)
            assert (per_row > 0).all(), f"{name}: a head, router row or A row got no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 3  # 2 layers x q,k,v x 3 tensors


def test_no_auxiliary_loss(model_factory, token_batch):
    model = get_peft_model(model_factory(), HydraLoRAConfig(r=4, init_weights=False)).train()
    model(input_ids=token_batch, labels=token_batch)
    assert model.base_model.auxiliary_losses() == {}


def test_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), HydraLoRAConfig(r=4))
    with pytest.raises(ValueError, match="HydraLoRALinear cannot be merged.*routers"):
        model.merge_and_unload()


# --- parameter counts (LLaMA-7B shapes on the meta device, D2MoRA table) -----------------------------------


def trainable_on_meta(config, peft_config) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in get_peft_model(model, peft_config).parameters() if p.requires_grad)


@pytest.mark.parametrize(("r", "heads", "expected"), [(12, 8, 45_613_056), (16, 6, 46_399_488)])
def test_d2mora_table_parameter_counts(r, heads, expected):
    llama7b = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    per_module = r * 4096 + heads * 4096 * r + 4096 * heads  # A, B heads, router (no bias)
    assert per_module * 96 == expected
    config = HydraLoRAConfig(r=r, lora_alpha=2 * r, num_experts=heads)  # q, k, v by default
    assert trainable_on_meta(llama7b, config) == expected


def test_comol_table_parameter_count_on_llama31_8b():
    """comol.md §5: HydraLoRA A r8 + 8 B on q, k, v, o, down of Llama-3.1-8B = 45.09M."""
    llama31 = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    config = HydraLoRAConfig(r=8, num_experts=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    count = trainable_on_meta(llama31, config)
    assert count == 45_088_768
    assert round(count / 1e6, 2) == 45.09


# --- PEFT round trip, dtypes, config --------------------------------------------------------------------------


def test_save_and_load_reproduce_outputs_exactly(model_factory, token_batch, tmp_path):
    config = HydraLoRAConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model_factory(), config).eval()
    expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], HydraLoRAConfig)
    assert loaded.peft_config["default"].num_experts == 3
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


def test_bf16_autocast_on_cpu(model_factory, token_batch):
    model = get_peft_model(model_factory(), HydraLoRAConfig(r=4, init_weights=False, lora_dropout=0.0))
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
    [
        ({"num_experts": 0}, r"HydraLoRAConfig\.num_experts"),
        ({"num_experts": 2.0}, r"HydraLoRAConfig\.num_experts"),
        ({"r": 0}, r"HydraLoRAConfig\.r "),
        ({"lora_dropout": 1.0}, r"HydraLoRAConfig\.lora_dropout"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        HydraLoRAConfig(**overrides)
