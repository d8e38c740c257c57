"""MoLoRA (dense) and top-k MoE-LoRA against their spec (baselines.md §2.1, §2.3): loop form, dropout, top-k
renormalisation, the load-balancing loss, counts, PEFT round trip."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AUTOCAST_DEVICE
from peft import PeftModel, get_peft_model
from reference import check_masks_against_loop
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import MoLoRAConfig
from moelora.methods.molora import MoLoRALinear


def top_k_by_hand(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def molora_loop(x, A, B, router, scaling, top_k=None, dropped_inputs=None):
    """Per-token, per-expert MoLoRA forward in float64 with the routing done in plain Python.

    x: [..., d_in]; A: [E, r, d_in]; B: [E, d_out, r]; router: [E, d_in].
    dropped_inputs: optional list of E tensors like x, the input each expert sees after its own dropout.
    """
    experts = A.shape[0]
    flat = x.double().reshape(-1, x.shape[-1])
    dropped = [flat] * experts if dropped_inputs is None else [d.double().reshape(flat.shape) for d in dropped_inputs]
    probs = torch.softmax(flat @ router.double().T, dim=-1).tolist()
    rows = []
    for t, p in enumerate(probs):
        chosen = range(experts) if top_k is None else top_k_by_hand(p, top_k)
        total = sum(p[i] for i in chosen)  # 1 for the dense mixture
        row = torch.zeros(B.shape[1], dtype=torch.float64)
        for i in chosen:
            row += (p[i] / total) * scaling * (B[i].double() @ (A[i].double() @ dropped[i][t]))
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


def make_layer(d_in=16, d_out=24, **config) -> MoLoRALinear:
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, num_experts=5, init_weights=False, lora_dropout=0.0)
    settings.update(config)
    return MoLoRALinear(nn.Linear(d_in, d_out), "default", MoLoRAConfig(**settings))


def params(layer: MoLoRALinear):
    return layer.molora_A["default"], layer.molora_B["default"], layer.molora_router["default"]


# --- fused form against the loop form -----------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 4, 16)])
def test_fused_equals_loop_form_in_eval_mode(shape, top_k):
    layer = make_layer(lora_dropout=0.3, top_k=top_k).eval()
    x = torch.randn(*shape)
    expected = layer.base_layer(x).double() + molora_loop(x, *params(layer), scaling=2.0, top_k=top_k)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_fused_equals_loop_form_in_train_mode_without_dropout(top_k):
    layer = make_layer(top_k=top_k).train()
    x = torch.randn(3, 6, 16)
    expected = layer.base_layer(x).double() + molora_loop(x, *params(layer), scaling=2.0, top_k=top_k)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_default_dropout_draws_an_independent_mask_per_expert(form, monkeypatch):
    layer = make_layer(lora_dropout=0.5, top_k=3).train()
    check_masks_against_loop(
        layer,
        torch.randn(4, 16),
        lambda x, *weights, dropped_inputs: molora_loop(x, *weights, 2.0, top_k=3, dropped_inputs=dropped_inputs),
        params(layer),
        0.5,
        monkeypatch,
        routing_in_python=True,
        form=form,
    )


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_shared_dropout_mask_option_uses_one_mask(form, monkeypatch):
    layer = make_layer(lora_dropout=0.5, shared_dropout_mask=True, top_k=3).train()
    check_masks_against_loop(
        layer,
        torch.randn(4, 16),
        lambda x, *weights, dropped_inputs: molora_loop(x, *weights, 2.0, top_k=3, dropped_inputs=dropped_inputs),
        params(layer),
        0.5,
        monkeypatch,
        routing_in_python=True,
        experts_sharing_one_mask=5,
        form=form,
    )


def test_router_sees_the_input_without_dropout():
    layer = make_layer(lora_dropout=0.9).train()
    x = torch.randn(6, 16)
    layer.routing.enabled = True
    layer(x)
    mean_prob = torch.tensor(layer.routing.stats["default/router"].as_dict()["mean_prob"], dtype=torch.float64)
    expected = torch.softmax(x.double() @ layer.molora_router["default"].double().T, -1).mean(0)
    torch.testing.assert_close(mean_prob, expected, atol=1e-6, rtol=1e-6)


# --- top-k routing -------------------------------------------------------------------------------------------


def test_top_k_equal_to_num_experts_is_the_dense_mixture():
    dense, every = make_layer(top_k=None).eval(), make_layer(top_k=5).eval()
    for a, b in zip(params(dense), params(every), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(3, 7, 16)
    assert (dense(x) - dense.base_layer(x)).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(every(x), dense(x), atol=1e-6, rtol=1e-6)


def test_top_k_is_a_proper_restriction():
    """k < E differs from the dense mixture (else the top-k tests could pass with top_k ignored)."""
    x = torch.randn(3, 7, 16)
    assert (make_layer(top_k=2).eval()(x) - make_layer(top_k=None).eval()(x)).abs().max() > 1e-4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_weights_are_the_renormalised_top_k_probabilities(k):
    """Give every expert the same A and make B_i write only to output i, so Δy_i / (s · u·Ax) = w_i."""
    experts, r, d_in = 4, 2, 8
    layer = MoLoRALinear(
        nn.Linear(d_in, experts),
        "default",
        MoLoRAConfig(r=r, lora_alpha=2, num_experts=experts, top_k=k, init_weights=False),
    ).eval()
    torch.manual_seed(4)
    shared_A, u = torch.randn(r, d_in), torch.tensor([1.0, -0.5])
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.molora_A["default"].copy_(shared_A.expand(experts, r, d_in))
        layer.molora_B["default"].copy_(torch.eye(experts).unsqueeze(-1) * u)  # B_i = e_i u^T
        layer.molora_router["default"].mul_(4.0)
        x = torch.randn(32, d_in)
        weights = layer(x).double() / (2 / r * (x.double() @ shared_A.double().T @ u.double())).unsqueeze(-1)
    probs = torch.softmax(x.double() @ layer.molora_router["default"].double().T, -1)
    for w, p in zip(weights, probs, strict=True):
        chosen = top_k_by_hand(p.tolist(), k)
        expected = torch.zeros(experts, dtype=torch.float64)
        expected[chosen] = p[chosen] / p[chosen].sum()
        torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-4)
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
        assert int((w.abs() > 1e-6).sum()) == k


# --- load-balancing loss -------------------------------------------------------------------------------------


def test_load_balance_loss_equals_the_hand_computation():
    layer = make_layer(top_k=2, load_balance_loss_weight=0.3).train()
    x = torch.randn(4, 5, 16)
    layer(x)
    got = layer.auxiliary_losses("default")["load_balance"]
    expected = load_balance_by_hand(x, layer.molora_router["default"], top_k=2, weight=0.3)
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    got.backward()
    assert layer.molora_router["default"].grad.abs().sum(-1).gt(0).all(), "the loss reaches every router row"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balance_loss_is_lambda_k_for_uniform_and_lambda_E_for_collapsed_routing(k):
    """Uniform routing, P_i = 1/E: λ·E·Σ f_i/E = λ·Σ f_i = λ·k whatever f is. Routing collapsed onto the same k
    experts for every token (f_i = 1 and P_i = 1/k on them, 0 elsewhere): λ·E·k·(1/k) = λ·E."""
    experts, weight = 4, 0.5
    layer = make_layer(num_experts=experts, top_k=k, load_balance_loss_weight=weight).train()
    x = torch.rand(6, 16) + 0.5
    with torch.no_grad():
        layer.molora_router["default"].zero_()
    layer(x)
    uniform = float(layer.auxiliary_losses("default")["load_balance"])
    assert math.isclose(uniform, weight * k, rel_tol=1e-6)
    with torch.no_grad():
        layer.molora_router["default"][:k] = 10.0  # the first k experts dominate every (positive) token equally
    layer(x)
    collapsed = float(layer.auxiliary_losses("default")["load_balance"])
    assert math.isclose(collapsed, weight * experts, rel_tol=1e-6)
    assert collapsed > uniform


def test_load_balance_loss_is_only_kept_from_a_training_forward():
    layer = make_layer(top_k=2).train()
    x = torch.randn(5, 16)
    layer(x)
    assert set(layer.auxiliary_losses("default")) == {"load_balance"}
    layer.eval()
    layer(x)
    assert layer.auxiliary_losses("default") == {}, "an eval forward must drop the last training value"
    layer.train()
    layer(x)
    layer.enable_adapters(False)
    layer(x)
    assert layer.auxiliary_losses("default") == {}, "a forward with the adapter disabled must drop it too"


@pytest.mark.parametrize("overrides", [{"top_k": None}, {"top_k": 2, "load_balance_loss_weight": 0.0}])
def test_no_load_balance_loss_for_the_dense_mixture_or_a_zero_weight(overrides):
    layer = make_layer(**{"load_balance_loss_weight": 0.5, **overrides}).train()
    layer(torch.randn(5, 16))
    assert layer.auxiliary_losses("default") == {}


def test_load_balance_loss_reaches_the_model_loss_summed_over_modules(model_factory, token_batch):
    config = MoLoRAConfig(r=4, num_experts=4, top_k=2, load_balance_loss_weight=0.5, init_weights=False)
    config.lora_dropout = 0.0
    model = get_peft_model(model_factory(), config).train()
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0])) for m in layers]
    with_aux = model(input_ids=token_batch, labels=token_batch).loss
    for hook in hooks:
        hook.remove()
    expected = sum(load_balance_by_hand(inputs[id(m)], m.molora_router["default"], 2, 0.5) for m in layers)
    assert len(layers) == 6 and expected > 0
    tuner = model.base_model
    assert math.isclose(tuner.last_auxiliary_losses["load_balance"], expected, rel_tol=1e-5)
    tuner.add_auxiliary_losses_to_loss = False
    plain = model(input_ids=token_batch, labels=token_batch).loss
    assert math.isclose(float(with_aux - plain), expected, rel_tol=1e-4)
    tuner.add_auxiliary_losses_to_loss = True
    model.eval()
    eval_loss = model(input_ids=token_batch, labels=token_batch).loss
    torch.testing.assert_close(eval_loss, plain, atol=1e-6, rtol=1e-6, msg="no load-balance term from eval")


def test_load_balance_loss_can_leave_padding_out(model_factory, token_batch):
    """With load_balance_mask_padding the statistics cover only the tokens the attention mask keeps."""
    mask = torch.ones_like(token_batch)
    mask[0, :4] = 0  # left padding in the first row
    config = MoLoRAConfig(r=4, num_experts=4, top_k=2, load_balance_loss_weight=0.5, load_balance_mask_padding=True)
    model = get_peft_model(model_factory(), config).train()
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0])) for m in layers]
    model(input_ids=token_batch, attention_mask=mask, labels=token_batch)
    for hook in hooks:
        hook.remove()
    keep = mask.reshape(-1).bool()
    kept_only = sum(
        load_balance_by_hand(
            inputs[id(m)].reshape(-1, inputs[id(m)].shape[-1])[keep], m.molora_router["default"], 2, 0.5
        )
        for m in layers
    )
    everything = sum(load_balance_by_hand(inputs[id(m)], m.molora_router["default"], 2, 0.5) for m in layers)
    assert math.isclose(model.base_model.last_auxiliary_losses["load_balance"], kept_only, rel_tol=1e-5)
    assert not math.isclose(kept_only, everything, rel_tol=1e-4)


# --- gradients, merging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 2])
def test_gradients_reach_every_expert_and_the_router_and_not_the_base(model_factory, token_batch, top_k):
    config = MoLoRAConfig(r=4, num_experts=4, top_k=top_k, load_balance_loss_weight=1e-2)
    model = get_peft_model(model_factory(), config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B has gradient (B = 0 blocks the rest); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "molora_" in name
            per_row = param.grad.flatten(1).abs().sum(1) if param.grad.dim() == 3 else param.grad.abs().sum(-1)
            assert (per_row > 0).all(), f"{name}: an expert or router row got no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 3  # 2 layers x q,k,v x 3 tensors


def test_gradient_checkpointing_gives_the_same_gradients_with_the_balance_loss(model_factory, token_batch):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        config = MoLoRAConfig(r=4, num_experts=4, top_k=2, load_balance_loss_weight=0.1, init_weights=False)
        config.lora_dropout = 0.0
        model = get_peft_model(model_factory(), config)
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


def test_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), MoLoRAConfig(r=4, top_k=2))
    with pytest.raises(ValueError, match="MoLoRALinear cannot be merged.*routers"):
        model.merge_and_unload()


# --- parameter counts (meta device) ----------------------------------------------------------------------------


def trainable_on_meta(config, peft_config) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in get_peft_model(model, peft_config).parameters() if p.requires_grad)


def test_parameter_count_8x_r8_on_llama7b_qkv():
    """performance.md §3.2: dense MoLoRA {8, r8} on q, k, v of LLaMA-7B = 53.48M."""
    llama7b = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    per_module = 8 * 8 * (4096 + 4096) + 4096 * 8  # E experts of A and B, router (no bias)
    assert per_module * 96 == 53_477_376
    assert trainable_on_meta(llama7b, MoLoRAConfig(r=8, num_experts=8)) == 53_477_376


def test_comol_table_parameter_count_on_llama31_8b():
    """comol.md §5: MoLoRA 8×r8 on q, k, v, o, down of Llama-3.1-8B = 100.14M (top-k adds no parameters)."""
    llama31 = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    count = trainable_on_meta(llama31, MoLoRAConfig(r=8, num_experts=8, top_k=2, target_modules=targets))
    assert count == 100_139_008
    assert round(count / 1e6, 2) == 100.14


# --- PEFT round trip, dtypes, config --------------------------------------------------------------------------


def test_save_and_load_reproduce_outputs_exactly(model_factory, token_batch, tmp_path):
    config = MoLoRAConfig(r=4, num_experts=4, top_k=2, init_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model_factory(), config).eval()
    expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], MoLoRAConfig)
    assert loaded.peft_config["default"].top_k == 2
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


@pytest.mark.parametrize("top_k", [None, 2])
def test_bf16_autocast_on_cpu(model_factory, token_batch, top_k):
    config = MoLoRAConfig(r=4, num_experts=4, top_k=top_k, init_weights=False, load_balance_loss_weight=0.1)
    config.lora_dropout = 0.0
    model = get_peft_model(model_factory(), config)
    reference = model(input_ids=token_batch).logits
    model.train()
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=token_batch, labels=token_batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (out.logits.float() - reference).abs().max() < 0.1
    assert (top_k is not None) == ("load_balance" in model.base_model.last_auxiliary_losses)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts": 0}, r"MoLoRAConfig\.num_experts"),
        ({"top_k": 0}, r"MoLoRAConfig\.top_k"),
        ({"top_k": 9}, r"MoLoRAConfig\.top_k must be <= num_experts=8"),
        ({"top_k": 1.5}, r"MoLoRAConfig\.top_k"),
        ({"load_balance_loss_weight": -1e-3}, r"MoLoRAConfig\.load_balance_loss_weight"),
        ({"load_balance_loss_weight": float("nan")}, r"MoLoRAConfig\.load_balance_loss_weight"),
        ({"lora_dropout": 1.0}, r"MoLoRAConfig\.lora_dropout"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MoLoRAConfig(**overrides)
