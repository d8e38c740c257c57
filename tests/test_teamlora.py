"""TeamLoRA against its spec (teamlora.md): init, fused vs per-expert loop, interaction, balance loss, counts, PEFT."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from conftest import AUTOCAST_DEVICE
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moelora import METHODS, LoraConfig, TeamLoRAConfig
from moelora.methods.teamlora import TeamLoRALinear

# --- per-expert loop reference, written from teamlora.md §1-§2 -------------------------------------------------


def teamlora_loop(x, A, B, router, M, alpha, num_experts, dropped_a=None, clamp=False):
    """Δy and the expert weights w, one expert at a time in float64.

    x: [..., d_in]; A: [r, d_in]; B: [d_out, r] = [B_1 | ... | B_K]; router: [K, d_in]; M: [K, K].
    dropped_a: optional A x after dropout (unscaled), as the layer saw it.
    """
    x, A, B, router, M = (t.detach().double() for t in (x, A, B, router, M))
    r, K = A.shape[0], num_experts
    rb = r // K
    s = alpha / rb
    phi = torch.softmax(x @ router.T, dim=-1)
    mixed = torch.zeros_like(phi)
    for j in range(K):  # (phi (I + M))_j = phi_j + sum_i phi_i M_ij
        mixed[..., j] = phi[..., j] + sum(phi[..., i] * M[i, j] for i in range(K))
    if clamp:
        mixed = mixed.clamp_min(0.0)
    w = K * mixed / mixed.sum(-1, keepdim=True)
    a = s * (x @ A.T if dropped_a is None else dropped_a.double())
    delta = torch.zeros(*x.shape[:-1], B.shape[0], dtype=torch.float64)
    for k in range(K):
        chunk = a[..., k * rb : (k + 1) * rb]
        delta = delta + w[..., k : k + 1] * (chunk @ B[:, k * rb : (k + 1) * rb].T)
    return delta, w


def balance_by_hand(w, num_experts, kind="official", keep=None):
    """mean_k (u_k - target)^2 with u_k the (masked) mean over tokens of w_k, as Python sums."""
    rows = w.reshape(-1, num_experts).tolist()
    keep = [1.0] * len(rows) if keep is None else [float(v) for v in keep.reshape(-1)]
    usage = [sum(row[k] * m for row, m in zip(rows, keep, strict=True)) / sum(keep) for k in range(num_experts)]
    target = 1.0 / num_experts if kind == "official" else sum(usage) / num_experts
    return sum((u - target) ** 2 for u in usage) / num_experts


def make_layer(d_in=16, d_out=24, **config) -> TeamLoRALinear:
    torch.manual_seed(0)
    settings = dict(r=8, lora_alpha=4, num_experts=4, init_weights=False, interaction_init_range=0.3)
    settings.update(config)
    return TeamLoRALinear(nn.Linear(d_in, d_out), "default", TeamLoRAConfig(**settings))


def params(layer: TeamLoRALinear):
    return tuple(getattr(layer, name)["default"] for name in TeamLoRALinear.adapter_layer_names)


def reference(layer, x, **kwargs):
    config = layer.adapter_config["default"]
    delta, w = teamlora_loop(
        x, *params(layer), config.lora_alpha, config.num_experts, clamp=config.clamp_interaction, **kwargs
    )
    return layer.base_layer(x).double() + delta, w


def tiny_config(**overrides) -> TeamLoRAConfig:
    settings = dict(r=4, lora_alpha=4, num_experts=2, init_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
    settings.update(overrides)
    return TeamLoRAConfig(**settings)


# --- init ---------------------------------------------------------------------------------------------------


def test_update_is_zero_at_init(model_factory, token_batch):
    base_logits = model_factory()(input_ids=token_batch).logits
    model = get_peft_model(model_factory(), TeamLoRAConfig(r=8, lora_alpha=8, num_experts=4))
    layers = [m for m in model.modules() if isinstance(m, TeamLoRALinear)]
    assert len(layers) == 6
    for layer in layers:
        A, B, router, M = params(layer)
        assert not B.any()
        assert A.abs().max() <= 1 / math.sqrt(layer.in_features) and A.std() > 0
        assert router.abs().max() <= 1 / math.sqrt(layer.in_features)
        assert not M.diagonal().any() and 0 < M.abs().max() <= 0.1
    assert torch.equal(model(input_ids=token_batch).logits, base_logits)
    M = params(make_layer(interaction_init_range=0.3))[3]
    assert not M.diagonal().any() and 0.1 < M.abs().max() <= 0.3


def test_defaults_follow_the_source_fast_path():
    config = TeamLoRAConfig()
    assert (config.r, config.num_experts, config.expert_rank) == (32, 4, 8)
    assert config.scaling == config.lora_alpha / 8 == 2.0  # alpha / r_b, not alpha / r
    assert config.peft_type == "TEAMLORA" and config.balance_loss_type == "official"


# --- fused form against the per-expert loop ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_fused_equals_loop_form_in_eval_mode(shape):
    layer = make_layer(lora_dropout=0.3).eval()
    x = torch.randn(*shape)
    expected, _ = reference(layer, x)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("r", "k"), [(8, 4), (12, 3), (6, 1), (16, 8)])
def test_fused_equals_loop_form_in_train_mode_without_dropout(r, k):
    layer = make_layer(r=r, num_experts=k, lora_dropout=0.0).train()
    x = torch.randn(3, 6, 16)
    expected, _ = reference(layer, x)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_dropout_is_on_the_A_output_chunks(monkeypatch):
    """Record what dropout saw and returned: A x of shape [tokens, r], not x; the loop form on it matches."""
    layer = make_layer(lora_dropout=0.5).train()
    x = torch.randn(5, 16)
    seen = []
    original = torch.nn.functional.dropout

    def recording_dropout(input, p=0.5, training=True, inplace=False):
        out = original(input, p, training, inplace)
        seen.append((input, out))
        return out

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    got = layer(x)
    ((before, after),) = seen
    A = params(layer)[0]
    torch.testing.assert_close(before, x @ A.T)
    assert (after == 0).any() and (after != 0).any()
    torch.testing.assert_close(after[after != 0], before[after != 0] * 2.0)
    expected, _ = reference(layer, x, dropped_a=after)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# --- interaction matrix ---------------------------------------------------------------------------------------


def hand_layer(M, clamp=False) -> TeamLoRALinear:
    """K = 2, r_b = 1, s = 1, A = B = I, zero router (phi = [1/2, 1/2]) and zero base: Δy = [w_1, w_2] for x = 1."""
    layer = TeamLoRALinear(
        nn.Linear(2, 2, bias=False),
        "default",
        TeamLoRAConfig(r=2, lora_alpha=1, num_experts=2, clamp_interaction=clamp, lora_dropout=0.0),
    )
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        A, B, router, interaction = params(layer)
        A.copy_(torch.eye(2))
        B.copy_(torch.eye(2))
        router.zero_()
        interaction.copy_(torch.tensor(M))
    return layer.eval()


@pytest.mark.parametrize(
    ("M", "clamp", "expected"),
    [
        ([[0.0, 0.0], [0.0, 0.0]], False, [1.0, 1.0]),  # phi (I + 0) = phi, times K = 2
        ([[0.0, 0.5], [0.0, 0.0]], False, [0.8, 1.2]),  # [1/2, 1/2 + 1/4] / (5/4) * 2
        ([[0.0, -1.5], [0.0, 0.0]], False, [4.0, -2.0]),  # [1/2, -1/4] / (1/4) * 2: plain division, sign kept
        ([[0.0, -1.5], [0.0, 0.0]], True, [2.0, 0.0]),  # clamp_interaction: [1/2, 0] / (1/2) * 2
        ([[1.0, 0.0], [0.0, 0.0]], False, [4 / 3, 2 / 3]),  # the diagonal is free after init: [1, 1/2] / (3/2) * 2
    ],
)
def test_interaction_matrix_by_hand(M, clamp, expected):
    out = hand_layer(M, clamp)(torch.ones(1, 2))
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_off_diagonal_interaction_changes_the_mixture_as_the_formula_says():
    layer = make_layer(lora_dropout=0.0).eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        params(layer)[3].zero_()
    without = layer(x)
    with torch.no_grad():
        params(layer)[3].copy_(
            torch.tensor([[0, 0.4, -0.2, 0.1], [0.3, 0, 0, -0.3], [0, 0.2, 0, 0], [-0.1, 0, 0.5, 0]])
        )
    with_interaction = layer(x)
    assert (with_interaction - without).abs().max() > 1e-3
    expected, w = reference(layer, x)
    torch.testing.assert_close(with_interaction.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.full((6,), 4.0, dtype=torch.float64))


# --- balance loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["official", "variance"])
def test_layer_balance_loss_equals_hand_computation(kind):
    layer = make_layer(balance_loss_weight=0.3, balance_loss_type=kind, lora_dropout=0.2).train()
    x = torch.randn(2, 7, 16)
    layer(x)
    _, w = reference(layer, x)
    got = layer.auxiliary_losses("default")["balance"]
    assert math.isclose(float(got.detach()), 0.3 * balance_by_hand(w, 4, kind), rel_tol=1e-5)


def test_official_and_variance_forms_differ_by_a_constant_and_share_the_gradient():
    x = torch.randn(9, 16)
    grads, values = {}, {}
    for kind in ("official", "variance"):
        layer = make_layer(balance_loss_weight=1.0, balance_loss_type=kind).train()
        layer(x)
        loss = layer.auxiliary_losses("default")["balance"]
        loss.backward()
        values[kind] = float(loss)
        grads[kind] = [p.grad.clone() for p in params(layer)[2:]]  # router and interaction
    assert math.isclose(values["official"] - values["variance"], (1 - 1 / 4) ** 2, rel_tol=1e-5)
    for official, variance in zip(grads["official"], grads["variance"], strict=True):
        assert official.abs().max() > 0
        torch.testing.assert_close(official, variance, atol=1e-6, rtol=1e-4)


def test_eval_forward_leaves_no_stale_balance_value():
    layer = make_layer(balance_loss_weight=0.5).train()
    layer(torch.randn(4, 16))
    assert "balance" in layer.auxiliary_losses("default")
    layer.eval()
    assert layer.auxiliary_losses("default") == {}, "no training-only value in eval mode"
    layer(torch.randn(4, 16))
    assert layer.auxiliary_losses("default") == {}
    assert layer.kept_for_auxiliary_loss("default") is None
    layer.train()
    assert layer.auxiliary_losses("default") == {}, "a train() switch must not revive the old value"


def test_model_with_a_pending_balance_value_can_be_copied_and_pickled(model_factory, token_batch):
    model = get_peft_model(model_factory(), tiny_config(balance_loss_weight=0.25)).train()
    model(input_ids=token_batch, labels=token_batch)
    assert "balance" in model.base_model.auxiliary_losses()
    clone = copy.deepcopy(model)
    assert clone.base_model.auxiliary_losses() == {}
    pickle.loads(pickle.dumps(model))
    assert "balance" in model.base_model.auxiliary_losses(), "the original keeps its value"


def capture_inputs(model):
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, TeamLoRALinear):
            module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, (m, args[0])))
    return inputs


def expected_model_balance(inputs, weight, kind="official", keep=None):
    total = 0.0
    for layer, x in inputs.values():
        _, w = reference(layer, x)
        total += weight * balance_by_hand(w, layer.adapter_config["default"].num_experts, kind, keep)
    return total


def test_balance_loss_reaches_the_model_loss_with_its_weight(model_factory, token_batch):
    model = get_peft_model(model_factory(), tiny_config(balance_loss_weight=0.25)).train()
    inputs = capture_inputs(model)
    with_aux = model(input_ids=token_batch, labels=token_batch).loss
    expected = expected_model_balance(inputs, 0.25)
    assert expected > 1e-3
    assert math.isclose(model.base_model.last_auxiliary_losses["balance"], expected, rel_tol=1e-5)
    model.base_model.add_auxiliary_losses_to_loss = False
    plain = model(input_ids=token_batch, labels=token_batch).loss
    assert math.isclose(float(with_aux - plain), expected, rel_tol=1e-4)


def test_zero_weight_turns_the_balance_loss_off(model_factory, token_batch):
    model = get_peft_model(model_factory(), tiny_config(balance_loss_weight=0.0)).train()
    with_hook = model(input_ids=token_batch, labels=token_batch).loss
    assert model.base_model.auxiliary_losses() == {}
    model.base_model.add_auxiliary_losses_to_loss = False
    assert torch.equal(model(input_ids=token_batch, labels=token_batch).loss, with_hook)


def test_eval_mode_model_loss_has_no_balance_term(model_factory, token_batch):
    model = get_peft_model(model_factory(), tiny_config(balance_loss_weight=0.25)).train()
    model(input_ids=token_batch, labels=token_batch)
    model.eval()
    with_hook = model(input_ids=token_batch, labels=token_batch).loss
    assert model.base_model.auxiliary_losses() == {}
    model.base_model.add_auxiliary_losses_to_loss = False
    assert torch.equal(model(input_ids=token_batch, labels=token_batch).loss, with_hook)


def test_padding_mask_option(model_factory, token_batch):
    mask = torch.ones_like(token_batch)
    mask[0, :4] = 0  # left padding in the first row
    values = {}
    for masked in (False, True):
        model = get_peft_model(
            model_factory(), tiny_config(balance_loss_weight=1.0, balance_loss_mask_padding=masked)
        ).train()
        inputs = capture_inputs(model)
        model(input_ids=token_batch, attention_mask=mask, labels=token_batch)
        values[masked] = model.base_model.last_auxiliary_losses["balance"]
        expected = expected_model_balance(inputs, 1.0, keep=mask if masked else None)
        assert math.isclose(values[masked], expected, rel_tol=1e-5)
    assert abs(values[True] - values[False]) > 1e-6


# --- gradients, freezing ----------------------------------------------------------------------------------------


def test_gradients_reach_every_adapter_tensor_and_not_the_base(model_factory, token_batch):
    config = TeamLoRAConfig(r=8, lora_alpha=8, num_experts=4, balance_loss_weight=0.1)
    model = get_peft_model(model_factory(), config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # at step 0 only B has gradient (B = 0 blocks A and the gates); after one step all do
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} received a gradient"
            continue
        assert "teamlora_" in name
        kind = name.rsplit(".", 2)[-2]
        seen.add(kind)
        grad = param.grad
        if kind == "teamlora_B":  # every expert block B_k
            per_part = grad.view(grad.shape[0], 4, 2).abs().sum((0, 2))
        elif kind == "teamlora_interaction":  # every entry, the diagonal included
            per_part = grad.abs().flatten()
        else:  # every row of A and of the router
            per_part = grad.abs().sum(-1)
        assert (per_part > 0).all(), f"{name}: a part got no gradient"
    assert seen == set(TeamLoRALinear.adapter_layer_names)
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 4  # 2 layers x q,k,v x 4 tensors


def test_gradient_checkpointing_gives_the_same_gradients(model_factory, token_batch):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(model_factory(), tiny_config(balance_loss_weight=0.5))
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


# --- parameter count (LLaMA-7B shapes, meta device) -------------------------------------------------------------


@pytest.mark.parametrize(("r", "k"), [(32, 4), (64, 8)])
def test_llama7b_parameter_count(r, k):
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    peft_model = get_peft_model(model, TeamLoRAConfig(r=r, lora_alpha=2 * r // k, num_experts=k))
    d = 4096
    a, b_experts, router, interaction = r * d, k * (d * (r // k)), k * d, k * k
    by_hand = 32 * 3 * (a + b_experts + router + interaction)  # q, k, v in 32 layers
    assert by_hand == {32: 26_740_224, 64: 53_483_520}[r]
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == by_hand


# --- equivalence with LoRA when K = 1 ---------------------------------------------------------------------------


def test_single_expert_teamlora_equals_lora(model_factory, token_batch):
    common = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_weights=False)
    team = get_peft_model(model_factory(), TeamLoRAConfig(num_experts=1, **common))
    lora = get_peft_model(model_factory(), LoraConfig(**common))
    with torch.no_grad():
        for team_layer, lora_layer in zip(
            [m for m in team.modules() if isinstance(m, TeamLoRALinear)],
            [m for m in lora.modules() if type(m).__name__ == "LoraLinear"],
            strict=True,
        ):
            team_layer.teamlora_A["default"].copy_(lora_layer.lora_A["default"])
            team_layer.teamlora_B["default"].copy_(lora_layer.lora_B["default"])
        team_logits, lora_logits = team(input_ids=token_batch).logits, lora(input_ids=token_batch).logits
        with team.disable_adapter():
            base = team(input_ids=token_batch).logits
    assert (team_logits - base).abs().max() > 1e-3
    torch.testing.assert_close(team_logits, lora_logits, atol=1e-6, rtol=1e-5)


# --- PEFT: registration, save/load --------------------------------------------------------------------------


def test_registered_as_a_method():
    assert METHODS["teamlora"].config_cls is TeamLoRAConfig
    assert METHODS["teamlora"].tuner_cls.prefix == "teamlora_"
    assert all(name.startswith("teamlora_") for name in TeamLoRALinear.adapter_layer_names)


def test_save_and_reload_reproduces_outputs_exactly(tmp_path, model_factory, token_batch):
    config = tiny_config(num_experts=2, r=4, balance_loss_weight=0.05, clamp_interaction=True)
    model = get_peft_model(model_factory(), config).eval()
    expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TEAMLORA" and saved["num_experts"] == 2 and saved["clamp_interaction"] is True
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(keys) == 2 * 3 * 4 and all(k.rsplit(".", 1)[-1].startswith("teamlora_") for k in keys)
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), TeamLoRAConfig)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path / "adapter").eval()
    assert isinstance(loaded.peft_config["default"], TeamLoRAConfig)
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


def test_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), tiny_config())
    with pytest.raises(ValueError, match="cannot be merged.*routers"):
        model.merge_and_unload()


def test_routing_statistics_record_the_router_softmax(model_factory, token_batch):
    model = get_peft_model(model_factory(), tiny_config(num_experts=4, r=8)).eval()
    model.base_model.record_routing(True)
    model(input_ids=token_batch)
    stats = model.base_model.routing_statistics()
    assert len(stats) == 6
    for per_router in stats.values():
        entry = per_router["default/router"]
        assert len(entry["mean_prob"]) == 4 and math.isclose(sum(entry["mean_prob"]), 1.0, rel_tol=1e-6)
        assert entry["tokens"] == token_batch.numel()


# --- dtypes ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu(model_factory, token_batch):
    model = get_peft_model(model_factory(), tiny_config(balance_loss_weight=0.1)).train()
    reference_logits = model(input_ids=token_batch).logits
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=token_batch, labels=token_batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.base_model.last_auxiliary_losses["balance"] > 0
    assert (out.logits.float() - reference_logits).abs().max() < 0.1
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name


def test_router_softmax_runs_in_fp32_under_autocast(monkeypatch):
    layer = make_layer()
    dtypes = []
    original = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda t, dim: dtypes.append(t.dtype) or original(t, dim=dim))
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = layer(torch.randn(3, 16))
    assert dtypes == [torch.float32]
    assert out.dtype == torch.bfloat16


def test_bf16_base_model_keeps_fp32_adapter_weights(model_factory, token_batch):
    model = get_peft_model(model_factory().to(torch.bfloat16), tiny_config())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model(input_ids=token_batch).logits.dtype == torch.bfloat16


# --- bad config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r": 10, "num_experts": 4}, r"TeamLoRAConfig\.r=10 must be divisible by TeamLoRAConfig\.num_experts=4"),
        ({"num_experts": 0}, r"TeamLoRAConfig\.num_experts must be an integer >= 1"),
        ({"num_experts": 2.0}, "num_experts"),
        ({"r": 0}, r"TeamLoRAConfig\.r must"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ({"balance_loss_weight": float("nan")}, "balance_loss_weight"),
        ({"balance_loss_type": "cv2"}, "balance_loss_type"),
        ({"interaction_init_range": -1.0}, "interaction_init_range"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        TeamLoRAConfig(**overrides)


def test_rank_above_module_dimensions_is_rejected(model_factory):
    with pytest.raises(ValueError, match=r"TeamLoRAConfig\.r=20 exceeds min\(d_in=32, d_out=16\)"):
        get_peft_model(model_factory(), TeamLoRAConfig(r=20, num_experts=4))
