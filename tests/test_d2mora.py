"""D2MoRA against its spec (d2mora.md): equivalences, init, gradients, fused vs loop form, counts, losses."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from conftest import AUTOCAST_DEVICE
from peft import get_peft_model
from reference import check_masks_against_loop, d2mora_loop, orthogonality_by_hand
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import D2MoRAConfig, LoraConfig
from moelora.core import pairwise_abs_cosine
from moelora.methods.d2mora import D2MoRALinear


def make_layer(d_in=16, d_out=24, **config) -> D2MoRALinear:
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, num_down_experts=3, num_up_experts=5, init_weights=False)
    settings.update(config)
    return D2MoRALinear(nn.Linear(d_in, d_out), "default", D2MoRAConfig(**settings))


def params(layer: D2MoRALinear):
    return (
        layer.d2mora_A["default"],
        layer.d2mora_B["default"],
        layer.d2mora_router_A["default"],
        layer.d2mora_router_B["default"],
    )


# --- fused form against the official loop form --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_fused_equals_loop_form_in_eval_mode(shape):
    layer = make_layer(lora_dropout=0.3).eval()
    x = torch.randn(*shape)
    expected = layer.base_layer(x).double() + d2mora_loop(x, *params(layer), scaling=2.0)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_fused_equals_loop_form_in_train_mode_without_dropout():
    layer = make_layer(lora_dropout=0.0).train()
    x = torch.randn(3, 6, 16)
    expected = layer.base_layer(x).double() + d2mora_loop(x, *params(layer), scaling=2.0)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_fused_equals_loop_form_with_the_same_independent_dropout_masks(form, monkeypatch):
    """Record the mask each A expert drew, feed the same dropped inputs to the loop form: outputs and gradients."""
    layer = make_layer(lora_dropout=0.5).train()
    check_masks_against_loop(
        layer,
        torch.randn(4, 16),
        lambda x, *weights, dropped_inputs: d2mora_loop(x, *weights, 2.0, dropped_inputs=dropped_inputs),
        params(layer),
        0.5,
        monkeypatch,
        form=form,
    )


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_shared_dropout_mask_option_uses_one_mask(form, monkeypatch):
    layer = make_layer(lora_dropout=0.5, shared_dropout_mask=True).train()
    check_masks_against_loop(
        layer,
        torch.randn(4, 16),
        lambda x, *weights, dropped_inputs: d2mora_loop(x, *weights, 2.0, dropped_inputs=dropped_inputs),
        params(layer),
        0.5,
        monkeypatch,
        experts_sharing_one_mask=3,
        form=form,
    )


def test_router_A_sees_input_without_dropout(monkeypatch):
    layer = make_layer(lora_dropout=0.9).train()
    x = torch.randn(5, 16)
    layer.routing.enabled = True
    layer(x)
    mean_prob = torch.tensor(layer.routing.stats["default/router_A"].as_dict()["mean_prob"], dtype=torch.float64)
    expected = torch.softmax(x.double() @ layer.d2mora_router_A["default"].double().T, -1).mean(0)
    torch.testing.assert_close(mean_prob, expected, atol=1e-6, rtol=1e-6)


# --- equivalence with LoRA when M = N = 1 -------------------------------------------------------------------


def test_single_expert_d2mora_equals_our_lora_and_peft_lora(model_factory, token_batch):
    targets = ["q_proj", "k_proj", "v_proj"]
    common = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    d2 = get_peft_model(model_factory(), D2MoRAConfig(num_down_experts=1, num_up_experts=1, **common))
    ours = get_peft_model(model_factory(), LoraConfig(**common))
    theirs = get_peft_model(model_factory(), peft.LoraConfig(**common))
    torch.manual_seed(3)
    with torch.no_grad():
        for (_name, d2_layer), ours_layer, theirs_layer in zip(
            [(n, m) for n, m in d2.named_modules() if isinstance(m, D2MoRALinear)],
            [m for m in ours.modules() if type(m).__name__ == "LoraLinear"],
            [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)],
            strict=True,
        ):
            A = torch.randn(4, 32) * 0.2
            B = torch.randn(d2_layer.out_features, 4) * 0.2
            d2_layer.d2mora_A["default"].copy_(A.unsqueeze(0))
            d2_layer.d2mora_B["default"].copy_(B.unsqueeze(0))
            ours_layer.lora_A["default"].copy_(A)
            ours_layer.lora_B["default"].copy_(B)
            theirs_layer.lora_A["default"].weight.copy_(A)
            theirs_layer.lora_B["default"].weight.copy_(B)
        logits = {name: m(input_ids=token_batch).logits for name, m in [("d2", d2), ("ours", ours), ("peft", theirs)]}
        with d2.disable_adapter():
            base = d2(input_ids=token_batch).logits
    assert (logits["d2"] - base).abs().max() > 1e-3, "the adapters must actually change the output"
    assert (logits["d2"] - logits["ours"]).abs().max() < 1e-6
    assert (logits["d2"] - logits["peft"]).abs().max() < 1e-6


# --- init, gradients, freezing ------------------------------------------------------------------------------


def test_update_is_zero_at_init(model_factory, token_batch):
    base_logits = model_factory()(input_ids=token_batch).logits
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8))
    assert torch.equal(model(input_ids=token_batch).logits, base_logits)


def test_gradients_reach_every_expert_and_both_routers_and_not_the_base(model_factory, token_batch):
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8, num_down_experts=3, num_up_experts=4))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B has gradient (B = 0 blocks the rest); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "d2mora_" in name
            grad = param.grad
            per_expert = grad.flatten(1).abs().sum(1) if grad.dim() == 3 else grad.abs().sum(-1)
            assert (per_expert > 0).all(), f"{name}: an expert or router row got no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 4  # 2 layers x q,k,v x 4 tensors


# --- parameter counts of the paper (LLaMA-7B shapes, meta device) ------------------------------------------


@pytest.fixture(scope="module")
def llama7b_config():
    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )


def trainable_on_meta(config, peft_config) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    peft_model = get_peft_model(model, peft_config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("m", "n", "r", "expected"),
    [(3, 8, 8, 35_788_800), (4, 3, 16, 45_617_664), (3, 4, 16, 45_225_984)],
)
def test_paper_parameter_counts(llama7b_config, m, n, r, expected):
    config = D2MoRAConfig(r=r, lora_alpha=2 * r, num_down_experts=m, num_up_experts=n)  # q,k,v by default
    per_module = m * r * 4096 + n * 4096 * r + 4096 * m + r * n
    assert per_module * 96 == expected
    assert trainable_on_meta(llama7b_config, config) == expected


def test_lora_r64_parameter_count(llama7b_config):
    assert trainable_on_meta(llama7b_config, LoraConfig(r=64, lora_alpha=128)) == 50_331_648


# --- dual orthogonality loss --------------------------------------------------------------------------------


def test_orthogonality_matches_hand_computation():
    torch.manual_seed(5)
    experts = torch.randn(5, 3, 7)
    assert math.isclose(float(pairwise_abs_cosine(experts)), orthogonality_by_hand(experts), rel_tol=1e-5)
    orthogonal = torch.eye(4).reshape(4, 2, 2)
    assert float(pairwise_abs_cosine(orthogonal)) == 0.0
    assert math.isclose(float(pairwise_abs_cosine(torch.ones(3, 2, 2))), 3.0, rel_tol=1e-5)


def test_layer_orthogonality_term_is_weighted_sum_over_A_and_B():
    layer = make_layer(orthogonal_loss_weight=0.25)
    A, B, _, _ = params(layer)
    expected = 0.25 * (orthogonality_by_hand(A.detach()) + orthogonality_by_hand(B.detach()))
    assert math.isclose(float(layer.auxiliary_losses("default")["orthogonality"]), expected, rel_tol=1e-5)


def test_orthogonality_finite_with_zero_B_experts():
    layer = make_layer(init_weights=True)
    assert not params(layer)[1].any()
    loss = layer.auxiliary_losses("default")["orthogonality"]
    loss.backward()
    assert torch.isfinite(loss)
    for p in params(layer)[:2]:
        assert torch.isfinite(p.grad).all()


def test_orthogonality_loss_is_added_to_the_model_loss_and_summed_over_modules(model_factory, token_batch):
    config = D2MoRAConfig(r=4, lora_alpha=8, orthogonal_loss_weight=0.5, lora_dropout=0.0)
    model = get_peft_model(model_factory(), config)
    with_aux = model(input_ids=token_batch, labels=token_batch).loss
    expected_aux = sum(
        0.5 * (orthogonality_by_hand(m.d2mora_A["default"].detach()) + orthogonality_by_hand(m.d2mora_B["default"]))
        for m in model.modules()
        if isinstance(m, D2MoRALinear)
    )
    tuner = model.base_model
    assert math.isclose(tuner.last_auxiliary_losses["orthogonality"], expected_aux, rel_tol=1e-5)
    tuner.add_auxiliary_losses_to_loss = False
    plain = model(input_ids=token_batch, labels=token_batch).loss
    assert math.isclose(float(with_aux - plain), expected_aux, rel_tol=1e-4)
    assert model(input_ids=token_batch).loss is None


def test_batched_orthogonality_equals_the_per_module_sum_with_its_gradients(model_factory):
    """The tuner stacks the experts of all modules of one shape (q and k/v differ here); value and gradients must
    be those of the per-module terms summed one by one."""
    config = D2MoRAConfig(r=4, lora_alpha=8, orthogonal_loss_weight=0.3, init_weights=False)
    model = get_peft_model(model_factory(), config)
    layers = [m for m in model.modules() if isinstance(m, D2MoRALinear)]
    assert len({tuple(m.d2mora_B["default"].shape) for m in layers}) > 1
    weights = [p for m in layers for p in (m.d2mora_A["default"], m.d2mora_B["default"])]
    batched = model.base_model.auxiliary_losses()["orthogonality"]
    batched_grads = torch.autograd.grad(batched, weights)
    one_by_one = sum(m.auxiliary_losses("default")["orthogonality"] for m in layers)
    expected_grads = torch.autograd.grad(one_by_one, weights)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-6, atol=0)
    for got, expected in zip(batched_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_zero_weight_turns_the_orthogonality_loss_off(model_factory, token_batch):
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8, orthogonal_loss_weight=0.0))
    model(input_ids=token_batch, labels=token_batch)
    assert model.base_model.auxiliary_losses() == {}


# --- dtypes ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu(model_factory, token_batch):
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8, init_weights=False, lora_dropout=0.0))
    reference = model(input_ids=token_batch).logits
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=token_batch, labels=token_batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (out.logits.float() - reference).abs().max() < 0.1
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


def test_bf16_base_model_keeps_fp32_adapter_weights(model_factory, token_batch):
    model = get_peft_model(model_factory().to(torch.bfloat16), D2MoRAConfig(r=4, lora_alpha=8))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model(input_ids=token_batch).logits.dtype == torch.bfloat16


# --- routing statistics ---------------------------------------------------------------------------------------


def test_routing_statistics_are_off_by_default_and_consistent_when_on(model_factory, token_batch):
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8, num_down_experts=3, num_up_experts=4))
    model(input_ids=token_batch)
    assert model.base_model.routing_statistics() == {}
    model.base_model.record_routing(True)
    model(input_ids=token_batch)
    stats = model.base_model.routing_statistics()
    assert len(stats) == 6
    for per_router in stats.values():
        for key, experts in (("default/router_A", 3), ("default/router_B", 4)):
            entry = per_router[key]
            assert len(entry["mean_prob"]) == experts
            assert math.isclose(sum(entry["mean_prob"]), 1.0, rel_tol=1e-6)
            assert 0 <= entry["entropy"] <= math.log(experts) + 1e-9
            assert entry["tokens"] == token_batch.numel()
    model.base_model.reset_routing_statistics()
    assert model.base_model.routing_statistics() == {}


# --- merging ------------------------------------------------------------------------------------------------


def test_d2mora_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="cannot be merged.*routers"):
        model.merge_and_unload()


def test_gradient_checkpointing_gives_the_same_gradients(model_factory, token_batch):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8, init_weights=False, lora_dropout=0.0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_orthogonality_loss_is_fp32_under_bf16_autocast():
    """The loss is formed inside the model's forward, hence under the trainer's autocast; a bf16 matmul of the unit
    vectors would move its value and gradient by ~1e-3 relative (seen as a 0.25 % gradient error under TRL)."""
    from moelora.core.losses import pairwise_abs_cosine

    experts = torch.randn(3, 5, 8, 64, requires_grad=True)
    exact = pairwise_abs_cosine(experts, batch_dims=1)
    (exact_grad,) = torch.autograd.grad(exact, experts)
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        cast = pairwise_abs_cosine(experts, batch_dims=1)
    (cast_grad,) = torch.autograd.grad(cast, experts)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(cast_grad, exact_grad, rtol=1e-5, atol=1e-8)
