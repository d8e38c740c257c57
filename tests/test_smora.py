"""SMoRA against its spec (baselines.md §2.8, §2.11): rank routing against a per-token loop, the dense limit,
the loss-free bias update and its state handling (saved, restored, never trained), counts, config checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import generator
from peft import PeftModel, get_peft_model
from reference import recording_keep_masks
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import SMoRAConfig
from moelora.methods.smora import SMoRALinear


def top_k_by_hand(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def smora_loop(x, A, B, router, bias, scaling, top_k, gate="softmax", dropped=None):
    """Per-token SMoRA forward in float64, selection and gates in plain Python.

    x: [..., d_in]; A: [R, d_in]; B: [d_out, R]; router: [R, d_in]; bias: [R]; dropped: x after dropout (A's input).
    """
    flat = x.detach().double().reshape(-1, x.shape[-1])
    a_inputs = flat if dropped is None else dropped.detach().double().reshape(flat.shape)
    A, B, router = A.detach(), B.detach(), router.detach()
    rows = []
    for token, a_input in zip(flat, a_inputs, strict=True):
        logits = (router.double() @ token).tolist()
        chosen = top_k_by_hand([logits[i] + float(bias[i]) for i in range(len(logits))], top_k)
        if gate == "softmax":
            top = max(logits[i] for i in chosen)
            weights = {i: math.exp(logits[i] - top) for i in chosen}
            total = sum(weights.values())
            gates = {i: w / total for i, w in weights.items()}
        else:
            gates = {i: 1 / (1 + math.exp(-logits[i])) for i in chosen}
        row = torch.zeros(B.shape[0], dtype=torch.float64)
        for i in chosen:
            row += gates[i] * scaling * B[:, i].double() * float(A[i].double() @ a_input)
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], B.shape[0])


def make_layer(d_in=16, d_out=24, **config) -> SMoRALinear:
    torch.manual_seed(0)
    settings = dict(r=8, lora_alpha=16, top_k=3, init_weights=False, lora_dropout=0.0)
    settings.update(config)
    return SMoRALinear(nn.Linear(d_in, d_out), "default", SMoRAConfig(**settings))


def params(layer: SMoRALinear):
    name = "default"
    return layer.smora_A[name], layer.smora_B[name], layer.smora_router[name], layer.smora_bias[name]


def delta(layer: SMoRALinear, x: torch.Tensor) -> torch.Tensor:
    return layer(x) - layer.base_layer(x)


# --- fused form against the per-token loop ------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 4, 16)])
def test_fused_equals_loop_form_in_eval_mode(shape, gate):
    layer = make_layer(lora_dropout=0.3, gate_activation=gate).eval()
    with torch.no_grad():
        layer.smora_bias["default"].copy_(torch.randn(8) * 0.5)
    x = torch.randn(*shape)
    expected = layer.base_layer(x).double() + smora_loop(x, *params(layer), scaling=2.0, top_k=3, gate=gate)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_fused_equals_loop_form_in_train_mode_without_dropout():
    layer = make_layer(bias_update_rate=0.0).train()
    x = torch.randn(3, 6, 16)
    expected = layer.base_layer(x).double() + smora_loop(x, *params(layer), scaling=2.0, top_k=3)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_train_mode_dropout_is_one_mask_on_the_input_of_A(monkeypatch):
    layer = make_layer(lora_dropout=0.5, bias_update_rate=0.0).train()
    masks = recording_keep_masks(monkeypatch)
    x = torch.randn(6, 16)
    got = layer(x)
    ((keep,),) = masks  # one mask [1, T, d_in]
    assert keep.shape == x.shape and (keep == 0).any()
    dropped = x * keep / 0.5
    loop = smora_loop(x, *params(layer), scaling=2.0, top_k=3, dropped=dropped)
    torch.testing.assert_close(got.double(), layer.base_layer(x).double() + loop, atol=1e-5, rtol=1e-5)


def test_scaling_rank_top_k_scales_by_alpha_over_k():
    x = torch.randn(5, 16)
    by_r, by_k = make_layer().eval(), make_layer(scaling_rank="top_k").eval()
    assert by_k.adapter_config["default"].scaling == 16 / 3
    torch.testing.assert_close(delta(by_k, x), delta(by_r, x) * (8 / 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_exactly_k_ranks_are_active_per_token(k):
    """B = I (d_out = R) and a zero base layer expose every rank's gated output g_i (A x)_i."""
    layer = make_layer(d_out=8, top_k=k).eval()
    with torch.no_grad():
        layer.smora_B["default"].copy_(torch.eye(8))
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    out = layer(torch.randn(40, 16))
    assert ((out.abs() > 0).sum(-1) == k).all()


def test_top_k_equal_to_r_with_softmax_is_the_dense_gated_lora():
    layer = make_layer(top_k=8).eval()
    with torch.no_grad():
        layer.smora_bias["default"].copy_(torch.randn(8))  # no effect when every rank is selected
    A, B, router, _ = params(layer)
    x = torch.randn(3, 7, 16).double()
    gates = torch.softmax(x @ router.double().T, dim=-1)
    expected = 2.0 * ((gates * (x @ A.double().T)) @ B.double().T)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(delta(layer, x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_bias_changes_the_selection_but_not_the_gate_values():
    """Large, unequal biases on ranks {0, 1} force them into every top-2; their gates stay the softmax of the raw
    logits (unequal so that a softmax over the biased logits would differ)."""
    layer = make_layer(d_out=8, top_k=2).eval()
    with torch.no_grad():
        layer.smora_B["default"].copy_(torch.eye(8))
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    A, _, router, bias = params(layer)
    x = torch.randn(30, 16)
    unbiased = layer(x)
    with torch.no_grad():
        bias[:2] = torch.tensor([100.0, 97.0])
    biased = layer(x)
    assert not torch.equal((unbiased != 0), (biased != 0)), "the bias must change the selection"
    assert ((biased != 0).sum(-1) == 2).all() and (biased[:, 2:] == 0).all()
    logits = x.double() @ router.double().T
    gates = torch.softmax(logits[:, :2], dim=-1)  # no bias in the gate values
    expected = 2.0 * gates * (x.double() @ A.double().T)[:, :2]
    torch.testing.assert_close(biased[:, :2].double(), expected, atol=1e-5, rtol=1e-5)


def test_router_sees_the_input_without_dropout():
    """The recorded selection (1_S / k per token) equals the top-k computed by hand on x without dropout."""
    layer = make_layer(lora_dropout=0.9, bias_update_rate=0.0).train()
    x = torch.randn(20, 16)
    layer.routing.enabled = True
    layer(x)
    mean = torch.tensor(layer.routing.stats["default/router"].as_dict()["mean_prob"], dtype=torch.float64)
    counts = torch.zeros(8, dtype=torch.float64)
    for row in (x.double() @ layer.smora_router["default"].detach().double().T).tolist():
        counts[top_k_by_hand(row, 3)] += 1
    torch.testing.assert_close(mean, counts / (20 * 3), atol=1e-6, rtol=1e-6)


# --- loss-free bias update -----------------------------------------------------------------------------------


def bias_update_by_hand(x, router, bias, top_k, rate, keep=None) -> torch.Tensor:
    flat = x.double().reshape(-1, x.shape[-1])
    logits = flat @ router.double().T
    r = logits.shape[1]
    counts, tokens = [0] * r, 0
    for t, row in enumerate(logits.tolist()):
        if keep is not None and not keep[t]:
            continue
        tokens += 1
        for i in top_k_by_hand([row[i] + float(bias[i]) for i in range(r)], top_k):
            counts[i] += 1
    mean_load = top_k / r
    return torch.tensor(
        [float(bias[i]) + rate * math.copysign(1, mean_load - counts[i] / tokens) * (counts[i] / tokens != mean_load)
         for i in range(r)],
        dtype=torch.float64,
    )  # fmt: skip


def test_bias_update_matches_the_hand_computation_in_training_mode():
    layer = make_layer(bias_update_rate=0.05).train()
    _, _, router, bias = params(layer)
    with torch.no_grad():
        bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(4, 5, 16)
    expected = bias_update_by_hand(x, router, bias.detach().clone(), 3, 0.05)
    layer(x)
    assert not torch.equal(expected, bias.detach().double())
    torch.testing.assert_close(bias.detach().double(), expected, atol=1e-7, rtol=0)
    assert bias.grad is None and not bias.requires_grad


def test_bias_update_moves_load_from_overloaded_to_underloaded_ranks():
    layer = make_layer(bias_update_rate=0.01, top_k=2).train()
    with torch.no_grad():
        layer.smora_router["default"].zero_()
        layer.smora_router["default"][:2] = 1.0  # ranks 0 and 1 win for every positive token
    layer(torch.rand(10, 16) + 0.1)
    expected = torch.full((8,), 0.01)
    expected[:2] = -0.01
    torch.testing.assert_close(layer.smora_bias["default"].detach(), expected)


@pytest.mark.parametrize("case", ["eval", "zero_rate", "disabled"])
def test_no_bias_update_in_eval_mode_with_zero_rate_or_with_the_adapter_disabled(case):
    layer = make_layer(bias_update_rate=0.0 if case == "zero_rate" else 0.05)
    layer.train(case != "eval")
    if case == "disabled":
        layer.enable_adapters(False)
    before = layer.smora_bias["default"].detach().clone()
    layer(torch.randn(6, 16))
    assert torch.equal(layer.smora_bias["default"], before)


def test_bias_update_can_leave_padding_out(model_factory, token_batch):
    mask = torch.ones_like(token_batch)
    mask[0, :5] = 0
    config = SMoRAConfig(r=8, top_k=2, bias_update_rate=0.01, bias_update_mask_padding=True, target_modules=["q_proj"])
    model = get_peft_model(model_factory(), config).train()
    layers = [m for m in model.modules() if isinstance(m, SMoRALinear)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0])) for m in layers]
    before = {id(m): m.smora_bias["default"].detach().clone() for m in layers}
    model(input_ids=token_batch, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    keep = mask.reshape(-1).bool().tolist()
    differs = False
    for m in layers:
        router, b0 = m.smora_router["default"], before[id(m)]
        kept = bias_update_by_hand(inputs[id(m)], router, b0, 2, 0.01, keep=keep)
        everything = bias_update_by_hand(inputs[id(m)], router, b0, 2, 0.01)
        torch.testing.assert_close(m.smora_bias["default"].detach().double(), kept, atol=1e-7, rtol=0)
        differs |= not torch.equal(kept, everything)
    assert differs, "the padding must matter for at least one layer, else the test proves nothing"


def test_gradient_checkpointing_updates_once_and_gives_the_same_gradients(model_factory, token_batch):
    def run(checkpointing: bool):
        config = SMoRAConfig(r=8, top_k=2, bias_update_rate=0.5, init_weights=False, target_modules=["q_proj"])
        model = get_peft_model(model_factory(), config)
        for m in model.modules():
            if isinstance(m, SMoRALinear):
                m.smora_bias["default"].data.normal_(generator=generator(3))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        biases = {n: p.detach().clone() for n, p in model.named_parameters() if "smora_bias" in n}
        return grads, biases

    (plain, plain_bias), (ckpt, ckpt_bias) = run(False), run(True)
    assert plain.keys() == ckpt.keys() and plain_bias.keys() == ckpt_bias.keys()
    for name in plain_bias:
        torch.testing.assert_close(ckpt_bias[name], plain_bias[name], rtol=0, atol=0, msg=name)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# --- the bias is saved state, never a trained weight ---------------------------------------------------------


def bias_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "smora_bias" in n}


def test_bias_is_frozen_and_not_counted_as_trainable(model_factory):
    config = SMoRAConfig(r=8, top_k=2, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model_factory(), config)
    biases = bias_params(model)
    assert len(biases) == 4 and not any(p.requires_grad for p in biases.values())
    trainable, _ = model.get_nb_trainable_parameters()
    q, v = 8 * (32 + 32 + 32), 8 * (32 + 16 + 32)  # R x (A's d_in + B's d_out + router's d_in); v_proj is 32 -> 16
    assert trainable == 2 * (q + v)
    model.base_model.set_adapter("default")  # PEFT re-marks adapter weights trainable here
    model.set_requires_grad("default")
    assert not any(p.requires_grad for p in bias_params(model).values())
    assert all(p.requires_grad for n, p in model.named_parameters() if "smora_" in n and "smora_bias" not in n)


def test_bias_is_saved_and_restored_exactly_and_stays_frozen(model_factory, token_batch, tmp_path):
    config = SMoRAConfig(r=8, top_k=2, init_weights=False, bias_update_rate=0.1, target_modules=["q_proj"])
    model = get_peft_model(model_factory(), config).train()
    for _ in range(3):
        model(input_ids=token_batch)
    saved = {n: p.detach().clone() for n, p in bias_params(model).items()}
    assert all(p.abs().sum() > 0 for p in saved.values()), "training forwards must have moved the bias"
    model.eval()
    expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path)
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(model_factory(), tmp_path, is_trainable=trainable).eval()
        restored = bias_params(loaded)
        assert restored.keys() == saved.keys()
        for name, value in restored.items():
            assert torch.equal(value, saved[name]), name
            assert not value.requires_grad, name
        assert torch.equal(loaded(input_ids=token_batch).logits, expected)
        if trainable:
            assert any(p.requires_grad for n, p in loaded.named_parameters() if "smora_A" in n)


def test_gradients_reach_A_B_and_router_and_never_the_bias_or_base(model_factory, token_batch):
    config = SMoRAConfig(r=8, top_k=2, bias_update_rate=0.01)
    model = get_peft_model(model_factory(), config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B has gradient (B = 0 blocks the rest); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    seen = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "smora_" in name and "smora_bias" not in name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            seen.add(name.split("smora_")[1].split(".")[0])
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert seen == {"A", "B", "router"}
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 3  # 2 layers x q,k,v x 3 tensors


def test_update_is_zero_at_init():
    layer = make_layer(init_weights=True).train()
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), SMoRAConfig(r=8, top_k=2))
    with pytest.raises(ValueError, match="SMoRALinear cannot be merged"):
        model.merge_and_unload()


# --- parameter count (meta device) ---------------------------------------------------------------------------


def test_parameter_count_r64_on_llama7b_qkv():
    """A [64, 4096], B [4096, 64] and the router [64, 4096] per module; the routing bias is state, not counted."""
    llama7b = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(llama7b), SMoRAConfig(r=64, top_k=8))
    per_module = 64 * 4096 * 3
    assert per_module * 96 == 75_497_472
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 75_497_472
    assert sum(p.numel() for n, p in model.named_parameters() if "smora_bias" in n) == 64 * 96


# --- config ---------------------------------------------------------------------------------------------------


def test_defaults():
    config = SMoRAConfig()
    assert (config.r, config.top_k, config.bias_update_rate, config.peft_type) == (64, 8, 1e-3, "SMORA")
    assert config.scaling == config.lora_alpha / 64


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"top_k": 0}, r"SMoRAConfig\.top_k"),
        ({"top_k": 65}, r"SMoRAConfig\.top_k must be <= r=64"),
        ({"r": 4, "top_k": 5}, r"SMoRAConfig\.top_k must be <= r=4"),
        ({"top_k": 1.5}, r"SMoRAConfig\.top_k"),
        ({"bias_update_rate": -1e-3}, r"SMoRAConfig\.bias_update_rate"),
        ({"bias_update_rate": float("nan")}, r"SMoRAConfig\.bias_update_rate"),
        ({"gate_activation": "relu"}, r"SMoRAConfig\.gate_activation"),
        ({"scaling_rank": "k"}, r"SMoRAConfig\.scaling_rank"),
        ({"lora_dropout": 1.0}, r"SMoRAConfig\.lora_dropout"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        SMoRAConfig(**overrides)
