"""MALoRA against its spec (baselines.md §2.7, routing of §2.1 / §2.3): zero init, fused form vs a per-expert loop,
top-k, the load-balancing loss, gradients, parameter counts, PEFT round trip, config validation."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from reference import recording_keep_masks
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import MALoRAConfig, MoLoRAConfig
from moelora.methods.malora import MALoRALinear


def top_k_by_hand(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def malora_loop(x, S, P, B, router, scaling, top_k=None):
    """Per-token, per-expert MALoRA update in float64: Σ_t w_t s B̄_t (P_t (S_A x)), routing in plain Python.

    x: [..., d_in]; S: [d_s, d_in]; P: [E, r, d_s]; B: [E, d_out, r]; router: [E, d_in].
    """
    experts = P.shape[0]
    flat = x.double().reshape(-1, x.shape[-1])
    probs = torch.softmax(flat @ router.double().T, dim=-1).tolist()
    rows = []
    for t, p in enumerate(probs):
        chosen = range(experts) if top_k is None else top_k_by_hand(p, top_k)
        total = sum(p[i] for i in chosen)
        row = torch.zeros(B.shape[1], dtype=torch.float64)
        for i in chosen:
            row += (p[i] / total) * scaling * (B[i].double() @ (P[i].double() @ (S.double() @ flat[t])))
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], B.shape[1])


def load_balance_by_hand(x, router, top_k, weight) -> float:
    """λ · E · Σ_i f_i P_i with f_i = top-k selections of expert i / N and P_i the mean probability."""
    probs = torch.softmax(x.double().reshape(-1, x.shape[-1]) @ router.double().T, dim=-1)
    tokens, experts = probs.shape
    counts = [0] * experts
    for row in probs.tolist():
        for i in top_k_by_hand(row, top_k):
            counts[i] += 1
    mean_prob = probs.mean(0).tolist()
    return weight * experts * sum(counts[i] / tokens * mean_prob[i] for i in range(experts))


def make_layer(d_in=16, d_out=24, **config) -> MALoRALinear:
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, num_experts=5, subspace_rank=6, init_weights=False, lora_dropout=0.0)
    settings.update(config)
    return MALoRALinear(nn.Linear(d_in, d_out), "default", MALoRAConfig(**settings))


def params(layer: MALoRALinear):
    return tuple(getattr(layer, name)["default"] for name in ("malora_S", "malora_P", "malora_B", "malora_router"))


# --- init ----------------------------------------------------------------------------------------------------


def test_update_is_zero_at_init_and_shapes_and_init_ranges():
    layer = make_layer(init_weights=True, d_in=64).train()
    S, P, B, router = params(layer)
    assert S.shape == (6, 64) and P.shape == (5, 4, 6) and B.shape == (5, 24, 4) and router.shape == (5, 64)
    assert torch.count_nonzero(B) == 0
    assert S.abs().max() <= 1 / math.sqrt(64) and S.abs().max() > 0.8 / math.sqrt(64), "S_A ~ U(±1/sqrt(d_in))"
    assert P.abs().max() <= 1 / math.sqrt(6) and P.abs().max() > 0.8 / math.sqrt(6), "P_t ~ U(±1/sqrt(d_s))"
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), layer.base_layer(x))


# --- fused form against the loop form -----------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 4, 16)])
def test_fused_equals_loop_form_in_eval_mode(shape, top_k):
    layer = make_layer(lora_dropout=0.3, top_k=top_k).eval()
    x = torch.randn(*shape)
    expected = layer.base_layer(x).double() + malora_loop(x, *params(layer), scaling=2.0, top_k=top_k)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    assert (got - layer.base_layer(x)).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_fused_equals_loop_form_in_train_mode_without_dropout(top_k):
    layer = make_layer(top_k=top_k).train()
    x = torch.randn(3, 6, 16)
    expected = layer.base_layer(x).double() + malora_loop(x, *params(layer), scaling=2.0, top_k=top_k)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_dropout_is_one_mask_on_the_input_and_the_router_sees_x_undropped(monkeypatch):
    layer = make_layer(lora_dropout=0.5, top_k=2).train()
    x = torch.randn(6, 16)
    masks = recording_keep_masks(monkeypatch)
    got = layer(x)
    ((keep,),) = masks  # one mask [1, T, d_in] for the shared subspace
    assert keep.shape == (6, 16) and (keep == 0).any()
    dropped = x * keep / 0.5
    S, P, B, router = params(layer)
    # the expert weights come from x, the expert inputs from the dropped x
    probs = torch.softmax(x.double() @ router.double().T, -1)
    expected = torch.zeros(6, 24, dtype=torch.float64)
    for t in range(6):
        chosen = top_k_by_hand(probs[t].tolist(), 2)
        for i in chosen:
            w = probs[t, i] / probs[t, chosen].sum()
            expected[t] += w * 2.0 * (B[i].double() @ P[i].double() @ S.double() @ dropped[t].double())
    torch.testing.assert_close(got.double(), layer.base_layer(x).double() + expected, atol=1e-5, rtol=1e-5)


# --- top-k routing -------------------------------------------------------------------------------------------


def test_top_k_equal_to_num_experts_is_the_dense_mixture():
    dense, every = make_layer(top_k=None).eval(), make_layer(top_k=5).eval()
    for a, b in zip(params(dense), params(every), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(3, 7, 16)
    assert (dense(x) - dense.base_layer(x)).abs().max() > 1e-3
    torch.testing.assert_close(every(x), dense(x), atol=1e-6, rtol=1e-6)
    assert (make_layer(top_k=2).eval()(x) - dense(x)).abs().max() > 1e-4, "k < E must differ from dense"


# --- load-balancing loss -------------------------------------------------------------------------------------


def test_load_balance_loss_equals_the_hand_computation():
    layer = make_layer(top_k=2, load_balance_loss_weight=0.3).train()
    x = torch.randn(4, 5, 16)
    layer(x)
    got = layer.auxiliary_losses("default")["load_balance"]
    expected = load_balance_by_hand(x, layer.malora_router["default"], top_k=2, weight=0.3)
    assert math.isclose(float(got.detach()), expected, rel_tol=1e-5)
    got.backward()
    assert layer.malora_router["default"].grad.abs().sum(-1).gt(0).all()
    layer.eval()
    layer(x)
    assert layer.auxiliary_losses("default") == {}, "no term from an eval forward"


def test_no_load_balance_loss_for_the_dense_mixture():
    layer = make_layer(top_k=None, load_balance_loss_weight=0.5).train()
    layer(torch.randn(5, 16))
    assert layer.auxiliary_losses("default") == {}


def test_load_balance_loss_reaches_the_model_loss(model_factory, token_batch):
    config = MALoRAConfig(r=4, num_experts=4, subspace_rank=8, top_k=2, load_balance_loss_weight=0.5)
    config.init_weights, config.lora_dropout = False, 0.0
    model = get_peft_model(model_factory(), config).train()
    layers = [m for m in model.modules() if isinstance(m, MALoRALinear)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0])) for m in layers]
    with_aux = model(input_ids=token_batch, labels=token_batch).loss
    for hook in hooks:
        hook.remove()
    expected = sum(load_balance_by_hand(inputs[id(m)], m.malora_router["default"], 2, 0.5) for m in layers)
    assert len(layers) == 6 and expected > 0
    tuner = model.base_model
    assert math.isclose(tuner.last_auxiliary_losses["load_balance"], expected, rel_tol=1e-5)
    tuner.add_auxiliary_losses_to_loss = False
    plain = model(input_ids=token_batch, labels=token_batch).loss
    assert math.isclose(float(with_aux - plain), expected, rel_tol=1e-4)


# --- gradients, merging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 2])
def test_gradients_reach_every_tensor_and_not_the_base(model_factory, token_batch, top_k):
    config = MALoRAConfig(r=4, num_experts=4, subspace_rank=8, top_k=top_k, load_balance_loss_weight=1e-2)
    model = get_peft_model(model_factory(), config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B̄ has gradient (B̄ = 0 blocks the rest); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "malora_" in name
            per_row = param.grad.flatten(1).abs().sum(1) if param.grad.dim() == 3 else param.grad.abs().sum(-1)
            assert (per_row > 0).all(), f"{name}: an expert, subspace or router row got no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 4  # 2 layers x q,k,v x 4 tensors


def test_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), MALoRAConfig(r=4, subspace_rank=8, top_k=2))
    with pytest.raises(ValueError, match="MALoRALinear cannot be merged.*routers"):
        model.merge_and_unload()


# --- parameter counts (meta device) ----------------------------------------------------------------------------


def trainable_on_meta(config, peft_config) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in get_peft_model(model, peft_config).parameters() if p.requires_grad)


LLAMA7B = LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # defaults E=8, r_t=8, d_s=16: S_A 16*4096 + P 8*8*16 + B̄ 8*4096*8 + router 8*4096 = 361,472 per module
        ({}, 34_701_312),
        # E=8, r_t=16, d_s=32: 131,072 + 4,096 + 524,288 + 32,768 = 692,224 per module
        ({"r": 16, "subspace_rank": 32}, 66_453_504),
    ],
)
def test_parameter_count_on_llama7b_qkv(settings, expected):
    assert trainable_on_meta(LLAMA7B, MALoRAConfig(**settings)) == expected


def test_default_has_30_to_48_percent_fewer_parameters_than_molora_8x_r8():
    """§2.7 claims 30-48% fewer parameters than MoLoRA; the defaults against MoLoRA 8×r8 on LLaMA-7B q, k, v."""
    molora = trainable_on_meta(LLAMA7B, MoLoRAConfig(r=8, num_experts=8))
    malora = trainable_on_meta(LLAMA7B, MALoRAConfig())
    assert molora == 53_477_376
    assert 0.30 <= 1 - malora / molora <= 0.48


# --- PEFT round trip, config --------------------------------------------------------------------------------


def test_save_and_load_reproduce_outputs_exactly(model_factory, token_batch, tmp_path):
    config = MALoRAConfig(r=4, num_experts=4, subspace_rank=8, top_k=2, init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model_factory(), config).eval()
    expected = model(input_ids=token_batch).logits
    assert not torch.equal(expected, model_factory()(input_ids=token_batch).logits)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], MALoRAConfig)
    assert loaded.peft_config["default"].subspace_rank == 8 and loaded.peft_config["default"].top_k == 2
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts": 0}, r"MALoRAConfig\.num_experts"),
        ({"subspace_rank": 0}, r"MALoRAConfig\.subspace_rank"),
        ({"subspace_rank": 2.5}, r"MALoRAConfig\.subspace_rank"),
        ({"top_k": 0}, r"MALoRAConfig\.top_k"),
        ({"top_k": 9}, r"MALoRAConfig\.top_k must be <= num_experts=8"),
        ({"load_balance_loss_weight": -1e-3}, r"MALoRAConfig\.load_balance_loss_weight"),
        ({"load_balance_loss_weight": float("nan")}, r"MALoRAConfig\.load_balance_loss_weight"),
        ({"lora_dropout": 1.0}, r"MALoRAConfig\.lora_dropout"),
        ({"r": 0}, r"MALoRAConfig\.r"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MALoRAConfig(**overrides)


def test_subspace_rank_above_d_in_is_rejected_naming_the_module(model_factory):
    with pytest.raises(ValueError, match=r"MALoRAConfig\.subspace_rank=33 exceeds d_in=32 of module .*q_proj"):
        get_peft_model(model_factory(), MALoRAConfig(r=4, subspace_rank=33))
