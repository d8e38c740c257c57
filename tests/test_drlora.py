"""DR-LoRA on tiny random MoE models of every supported architecture (built from configs, no downloads): the
expert forward against a per-expert reference, zero init, masks and gradients, statistics, growth and its
invariants, optimizer remedies, save/load, the training pipeline (growth, reports, resume) and DDP."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import AUTOCAST_DEVICE, generator
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PhimoeConfig,
    PhimoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    TrainerControl,
    TrainerState,
)

from moelora import METHODS, DRLoRAConfig
from moelora.data import bundled_train_sources
from moelora.methods.drlora import DRLoRACallback, DRLoRAExperts, DRLoRALayer, DRLoRARouter, GrowthSchedule
from moelora.methods.drlora import growth as growth_rule

_COMMON = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts_per_tok=2,
)  # fmt: skip
#: Tiny configs: 4 routed experts, top-2, hidden 32, expert intermediate 24 (Qwen2-MoE keeps its shared expert).
ARCHITECTURES = {
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(**_COMMON, intermediate_size=24, num_local_experts=4)),
    "olmoe": (OlmoeForCausalLM, lambda: OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=4)),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        lambda: Qwen2MoeConfig(
            **_COMMON, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=4
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8),
    ),
    "phimoe": (PhimoeForCausalLM, lambda: PhimoeConfig(**_COMMON, intermediate_size=24, num_local_experts=4)),
}
EXPERTS, HIDDEN, INTERMEDIATE = 4, 32, 24


def tiny_moe(arch: str = "olmoe", seed: int = 0, **overrides):
    model_cls, make_config = ARCHITECTURES[arch]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def drlora(model, **settings):
    settings = {"r": 4, "lora_alpha": 8, **settings}
    return get_peft_model(model, DRLoRAConfig(**settings))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and torch's CPU grouped GEMM (the experts' default implementation)
    spent ~70 ms per call synchronising 2 threads on this shared 2-core machine, against 0.1 ms with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch():
    return torch.randint(3, 96, (2, 9), generator=generator(1))


def moe_layers(model):
    return model.base_model.moe_layers()


def trained_loop(
    model, batches, steps, *, planned=None, lr=1e-2, weight_decay=0.0, output_dir="unused", before_step=None
):
    """A minimal Trainer: the callback's hooks around a plain AdamW loop of `steps` out of `planned` steps."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    callback, state, control = (
        DRLoRACallback(model.base_model),
        TrainerState(max_steps=planned or steps),
        TrainerControl(),
    )
    args = SimpleNamespace(output_dir=str(output_dir))
    callback.on_train_begin(args, state, control, optimizer=optimizer)
    for index in range(steps):
        callback.on_step_begin(args, state, control)
        tokens = batches[index % len(batches)]
        model(input_ids=tokens, labels=tokens).loss.backward()
        if before_step is not None:
            before_step(state.global_step + 1, optimizer)
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.step()
        callback.on_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control)
    return callback, optimizer


def random_batches(count=4, seed=0):
    stream = generator(seed)
    return [torch.randint(3, 96, (2, 9), generator=stream) for _ in range(count)]


# --- config and targets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule", "cosine"), ("saliency", "both"), ("rank_unit", "layer"), ("scaling_rank", "r"),
        ("award", "random"), ("frequency_weight", "logits"), ("importance_aggregation", "max"),
        ("a_init", "zeros"), ("new_slice_update", "reset"), ("expert_matrices", ["gate", "gate"]),
        ("expert_matrices", ["q_proj"]), ("r_init", 5), ("r_max", 3), ("warmup_ratio", 1.5),
        ("growth_end_ratio", -0.1), ("num_growth_events", 0), ("rank_increment", 0), ("frequency_beta", 1.0),
        ("importance_beta", -0.1), ("penalty_gamma", -1.0), ("new_slice_ramp_steps", 0),
    ],
)  # fmt: skip
def test_invalid_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"DRLoRAConfig.{field}"):
        DRLoRAConfig(r=4, **{field: value})


def test_defaults_and_every_field_explains_itself():
    import dataclasses

    config = DRLoRAConfig()
    assert (config.r, config.r_init, config.r_max, config.scaling) == (8, 4, 32, 2.0)
    uniform = DRLoRAConfig(r=8, schedule="uniform")
    assert (uniform.r_init, uniform.r_max, uniform.grows) == (8, 8, False)
    own = [f for f in dataclasses.fields(DRLoRAConfig) if f.name in DRLoRAConfig.__dataclass_fields__]
    assert all(f.metadata.get("help") for f in own if f.name not in ("task_type", "peft_type") and f.init)
    assert METHODS["drlora"].config_cls is DRLoRAConfig and METHODS["drlora"].moe_only


def test_dense_models_and_unknown_expert_layouts_are_refused(model_factory):
    with pytest.raises(ValueError, match=r"routed experts of an MoE model.*MixtralExperts"):
        drlora(model_factory())

    class FancyExperts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 4))

    model = tiny_moe("mixtral")
    model.model.layers[0].mlp.experts = FancyExperts()
    with pytest.raises(ValueError, match=r"does not know the expert layout of FancyExperts .*layers\.0\.mlp\.experts"):
        drlora(model)


# --- the expert forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_config_adapts_every_moe_block_and_starts_at_zero(arch, batch):
    base = tiny_moe(arch)
    expected = base(batch).logits
    model = get_peft_model(tiny_moe(arch), DRLoRAConfig(r=4))
    layers = moe_layers(model)
    assert [layer.name for layer in layers] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(isinstance(layer.router, DRLoRARouter) for layer in layers)
    assert torch.equal(model(batch).logits, expected), "the update must be exactly zero at init"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("drlora_" in name for name in trainable)
    assert not any(("mask" in n or "frequency" in n or "importance" in n or "activation" in n) for n in trainable)


def reference_experts(layer: DRLoRAExperts, hidden, indices, weights, adapter="default"):
    """Dense effective weights per expert and an explicit loop over tokens and their selected experts."""
    experts, config = layer.get_base_layer(), layer.adapter_config[adapter]
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    effective = {"gate": gate_up[:, :INTERMEDIATE], "up": gate_up[:, INTERMEDIATE:], "down": down}
    mask = layer.drlora_mask[adapter]
    for index, matrix in enumerate(config.expert_matrices):
        A = getattr(layer, f"drlora_A_{matrix}")[adapter].detach()
        B = getattr(layer, f"drlora_B_{matrix}")[adapter].detach()
        rows = mask if config.rank_unit == "expert" else mask[index * EXPERTS : (index + 1) * EXPERTS]
        effective[matrix] = effective[matrix] + torch.stack(
            [config.scaling * B[e] @ torch.diag(rows[e]) @ A[e] for e in range(EXPERTS)]
        )
    out = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for j in range(indices.shape[1]):
            e, x = int(indices[token, j]), hidden[token]
            inner = F.silu(effective["gate"][e] @ x) * (effective["up"][e] @ x)
            out[token] += weights[token, j] * (effective["down"][e] @ inner)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_adapted_experts_match_a_per_expert_reference(arch):
    model = drlora(tiny_moe(arch), init_weights=False, r_init=1)
    layer = moe_layers(model)[0]
    with torch.no_grad():  # different active ranks per expert
        layer.experts.drlora_mask["default"].copy_((torch.arange(16) < torch.tensor([[1], [3], [7], [16]])).float())
    hidden = torch.randn(11, HIDDEN, generator=generator(2))
    _, weights, indices = layer.router(hidden)
    got = layer.experts(hidden, indices, weights)
    torch.testing.assert_close(got, reference_experts(layer.experts, hidden, indices, weights), rtol=1e-5, atol=1e-5)


def test_matrix_subset_and_matrix_rank_units_match_the_reference():
    for settings in ({"expert_matrices": ["up", "down"]}, {"rank_unit": "matrix", "expert_matrices": ["gate", "down"]}):
        model = drlora(tiny_moe("qwen3_moe"), init_weights=False, **settings)
        layer = moe_layers(model)[1]
        units = layer.experts.num_units(layer.experts.adapter_config["default"])
        with torch.no_grad():
            layer.experts.drlora_mask["default"].copy_((torch.arange(16) < torch.arange(1, units + 1)[:, None]).float())
        hidden = torch.randn(7, HIDDEN, generator=generator(3))
        _, weights, indices = layer.router(hidden)
        expected = reference_experts(layer.experts, hidden, indices, weights)
        torch.testing.assert_close(layer.experts(hidden, indices, weights), expected, rtol=1e-5, atol=1e-5)


def test_masked_slices_get_exactly_zero_gradient(batch):
    model = drlora(tiny_moe("mixtral"), init_weights=False).train()
    model.base_model.set_router_trainable(True)
    model(batch, labels=batch).loss.backward()
    for layer in moe_layers(model):
        mask = layer.experts.drlora_mask["default"]  # first r_init = 2 of 16 components active
        for matrix in ("gate", "up", "down"):
            A, B = layer.experts.lora_weights("default", matrix)
            assert A.grad[mask == 0].abs().max() == 0 and B.grad.transpose(1, 2)[mask == 0].abs().max() == 0
            assert A.grad[mask == 1].abs().sum() > 0 and B.grad.transpose(1, 2)[mask == 1].abs().sum() > 0


def test_gradients_reach_every_trainable_tensor_and_never_the_base(batch):
    model = drlora(tiny_moe("olmoe"), init_weights=False).train()
    model.base_model.set_router_trainable(True)
    model(batch, labels=batch).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_frozen_router_gets_zero_gradient_then_none(batch):
    model = drlora(tiny_moe("olmoe"), init_weights=False).train()
    model(batch, labels=batch).loss.backward()  # routers are frozen until told otherwise
    deltas = [layer.router.drlora_router_delta["default"] for layer in moe_layers(model)]
    assert all(delta.grad is not None and delta.grad.abs().max() == 0 for delta in deltas)
    model.base_model.drop_frozen_router_gradients()
    assert all(delta.grad is None for delta in deltas)
    always_frozen = drlora(tiny_moe("olmoe"), unfreeze_router=False)
    assert not any("router_delta" in name for name, _ in always_frozen.named_parameters())


def test_bf16_autocast_keeps_fp32_adapter_weights(batch):
    model = drlora(tiny_moe("qwen2_moe"), init_weights=False).train()
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        loss = model(batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_merge_unload_and_disable(batch):
    model = drlora(tiny_moe("mixtral"), init_weights=False)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.drlora_router_delta["default"].normal_(std=0.1)
    expected = model(batch).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(batch).logits, tiny_moe("mixtral")(batch).logits, rtol=0, atol=0)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(batch).logits, expected, rtol=1e-5, atol=1e-5)
    plain = model.unload()
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    assert not any(isinstance(module, DRLoRALayer) for module in plain.modules())
    torch.testing.assert_close(plain(batch).logits, tiny_moe("mixtral")(batch).logits, rtol=0, atol=0)


# --- statistics ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_statistics_hook_leaves_routing_outputs_unchanged(arch):
    base = tiny_moe(arch).train()
    model = drlora(tiny_moe(arch)).train()
    model.base_model.set_router_trainable(True)
    hidden = torch.randn(2, 5, HIDDEN, generator=generator(4))
    for index, layer in enumerate(moe_layers(model)):
        base_block = base.model.layers[index].mlp
        base_router = base_block.router if arch == "phimoe" else base_block.gate
        torch.manual_seed(5)  # PhiMoE's sparsemixer samples in training mode
        expected = base_router(hidden.reshape(-1, HIDDEN).clone())
        torch.manual_seed(5)
        got = layer.router(hidden.reshape(-1, HIDDEN).clone())
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert layer.router.tokens == 10 and layer.router.mass is not None
        torch.manual_seed(6)
        block_expected = base_block(hidden.clone())
        torch.manual_seed(6)
        assert torch.equal(model.base_model.model.model.layers[index].mlp(hidden.clone()), block_expected)


def test_routing_frequency_is_the_top_k_mass_ema_without_padding():
    model = drlora(tiny_moe("olmoe"), frequency_beta=0.5).train()
    tokens = torch.randint(3, 96, (2, 6), generator=generator(7))
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    captured = []
    router = moe_layers(model)[0].router
    handle = router.base_layer.register_forward_hook(lambda module, args, out: captured.append(out))
    for _ in range(2):  # two micro-batches in one optimizer step
        model(input_ids=tokens, attention_mask=attention)
    handle.remove()
    model.base_model.update_statistics("default", importance=False)
    keep = attention.reshape(-1).double()
    mass = torch.zeros(EXPERTS, dtype=torch.float64)
    for logits, _, indices in captured:
        probs = torch.softmax(logits.double(), -1)
        selected = torch.zeros_like(probs).scatter(-1, indices, 1.0)
        mass += (probs * selected * keep[:, None]).sum(0)
    expected = 0.5 * mass / (2 * keep.sum())
    torch.testing.assert_close(router.drlora_frequency["default"].double(), expected, rtol=1e-6, atol=1e-7)
    assert router.mass is None  # consumed by the step


def test_gradient_checkpointing_recomputation_is_not_counted_twice(batch):
    model = drlora(tiny_moe("mixtral")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(batch, labels=batch).loss.backward()
    assert all(layer.router.tokens == batch.numel() for layer in moe_layers(model))


def test_rank_importance_is_the_gradient_weight_product(batch):
    model = drlora(tiny_moe("mixtral"), init_weights=False, importance_beta=0.85).train()
    model(batch, labels=batch).loss.backward()
    model.base_model.update_statistics("default")
    for layer in moe_layers(model):
        expected = torch.zeros(EXPERTS, 16)
        for matrix in ("gate", "up", "down"):
            A, B = layer.experts.lora_weights("default", matrix)
            for e in range(EXPERTS):
                for k in range(16):
                    expected[e, k] += (A[e, k] * A.grad[e, k]).abs().sum() + (B[e, :, k] * B.grad[e, :, k]).abs().sum()
        torch.testing.assert_close(layer.experts.drlora_importance["default"], 0.15 * expected, rtol=1e-5, atol=1e-9)


# --- growth -----------------------------------------------------------------------------------------------------


def test_growth_rule_budget_greedy_one_pass_and_ablations():
    schedule = GrowthSchedule.for_run(DRLoRAConfig(r=4), total_steps=100)
    assert schedule.warmup_steps == 10 and schedule.events == (19, 27, 35, 43, 51, 59, 67, 75)
    ranks, signal = torch.tensor([2, 2, 2, 2]), torch.tensor([2.0, 1.0, 1.0, 0.0])
    greedy = growth_rule.award(ranks, signal, 5, r_max=16, r_init=2, gamma=1.0, increment=1, procedure="greedy")
    assert greedy.tolist() == [5, 3, 3, 2]  # 2 / (R / 2) falls to 1 at R = 4 (a tie: lower index wins)
    no_penalty = growth_rule.award(ranks, signal, 5, r_max=16, r_init=2, gamma=0.0, increment=1, procedure="greedy")
    assert no_penalty.tolist() == [7, 2, 2, 2]
    capped = growth_rule.award(ranks, signal, 5, r_max=4, r_init=2, gamma=0.0, increment=2, procedure="greedy")
    assert capped.tolist() == [4, 4, 3, 2]
    one_pass = growth_rule.award(ranks, signal, 6, r_max=16, r_init=2, gamma=1.0, increment=2, procedure="one_pass")
    assert one_pass.tolist() == [4, 4, 4, 2]
    assert growth_rule.quota(10, 3) == 4 and growth_rule.quota(1, 3) == 1 and growth_rule.quota(0, 2) == 0
    frequency, importance = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    assert growth_rule.saliency_signal(frequency, importance, "frequency").argmax() == 1
    assert growth_rule.saliency_signal(frequency, importance, "importance").argmax() == 0
    torch.testing.assert_close(growth_rule.saliency_signal(frequency, importance, "full"), torch.tensor([0.75, 0.75]))
    assert growth_rule.saliency_signal(torch.zeros(3), torch.ones(3), "full").tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "settings", [{}, {"saliency": "frequency"}, {"rank_unit": "matrix", "award": "one_pass", "rank_increment": 2}]
)
def test_budget_is_never_exceeded_and_met_at_the_end(settings):
    model = drlora(tiny_moe("olmoe"), warmup_ratio=0.2, growth_end_ratio=0.8, num_growth_events=3, **settings)
    sums_per_event = []
    trained_loop(
        model, random_batches(), steps=10,
        before_step=lambda step, _: sums_per_event.append(model.base_model.rank_report()["rank_sums"]),
    )  # fmt: skip
    report = model.base_model.rank_report()
    units = EXPERTS * (3 if settings.get("rank_unit") == "matrix" else 1)
    assert report["budget_per_layer"] == [units * 4] * 2
    assert all(total <= units * 4 for sums in sums_per_event for total in sums)
    assert report["budget_met"] and report["rank_sums"] == [units * 4] * 2
    assert [entry["step"] for entry in report["history"]] == [4, 6, 8]
    assert all(2 <= rank <= 16 for row in report["ranks"] for rank in row)


def test_uniform_baseline_keeps_rank_r_target():
    model = drlora(tiny_moe("olmoe"), schedule="uniform")
    trained_loop(model, random_batches(), steps=4)
    report = model.base_model.rank_report()
    assert report["ranks"] == [[4] * EXPERTS] * 2 and report["budget_met"] and report["history"] == []
    assert moe_layers(model)[0].experts.drlora_A_gate["default"].shape == (EXPERTS, 4, HIDDEN)


def test_output_is_bit_identical_across_a_growth_event(batch):
    model = drlora(tiny_moe("qwen3_moe"), num_growth_events=1, growth_end_ratio=1.0)
    trained_loop(model, random_batches(), steps=3, planned=10)  # the event would be at step 10: grow by hand
    model.eval()
    before = model(batch).logits
    ranks_before = model.base_model.rank_report()["rank_sums"]
    model.base_model.grow("default", step=3, remaining_events=1)
    assert model.base_model.rank_report()["rank_sums"] != ranks_before
    assert torch.equal(model(batch).logits, before)
    active = drlora(tiny_moe("qwen3_moe"), scaling_rank="active", num_growth_events=1, growth_end_ratio=1.0)
    trained_loop(active, random_batches(), steps=3, planned=10)
    active.eval()
    before = active(batch).logits
    active.base_model.grow("default", step=3, remaining_events=1)
    assert not torch.equal(active(batch).logits, before), "alpha / R rescales trained directions at growth"


def test_router_is_frozen_during_the_warmup_then_trains():
    model = drlora(tiny_moe("olmoe"), warmup_ratio=0.5)
    deltas = [layer.router.drlora_router_delta["default"] for layer in moe_layers(model)]
    seen = []
    trained_loop(model, random_batches(), steps=4, before_step=lambda step, _: seen.append(deltas[0].abs().max()))
    assert seen[:3] == [0, 0, 0] and all(delta.abs().max() > 0 for delta in deltas)


# --- optimizer remedies -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("remedy", "first_step"), [("bias_correction", 1.0), ("lr_ramp", 0.316), ("none", 3.162)])
def test_new_slices_do_not_get_an_oversized_first_step(remedy, first_step):
    """After a growth event at a late step (Adam's bias correction ~1), the new B columns' first update is a
    sign step of size lr with per-slice bias correction, (1 - β1)/sqrt(1 - β2) ≈ 3.16 lr without a remedy, and
    1/10 of that with a 10-step learning-rate ramp."""
    lr = 1e-3
    model = drlora(tiny_moe("olmoe"), num_growth_events=1, warmup_ratio=0.0, growth_end_ratio=0.5,
                   new_slice_update=remedy, new_slice_ramp_steps=10)  # fmt: skip
    snapshots = {}

    def age_optimizer(step, optimizer):
        if step == 3:  # the first step of the slices activated after step 2: pretend 10^4 steps were taken
            for group in optimizer.param_groups:
                for param in group["params"]:
                    optimizer.state[param]["step"] = torch.tensor(9999.0)
            snapshots.update({id(p): p.detach().clone() for p in optimizer.param_groups[0]["params"]})

    trained_loop(model, random_batches(), steps=3, lr=lr, before_step=age_optimizer)
    sizes = []
    for layer in moe_layers(model):
        since = layer.experts.drlora_activation_step["default"]
        B = layer.experts.drlora_B_down["default"]
        moved = (B - snapshots[id(B)]).transpose(1, 2)[since == 2]
        sizes.append(moved.abs().max() / lr)
    assert sizes and all(abs(size - first_step) < 0.02 * first_step for size in sizes)


def test_inactive_slices_are_untouched_by_weight_decay():
    model = drlora(tiny_moe("mixtral"), num_growth_events=1, growth_end_ratio=1.0)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if "drlora_A" in name}
    trained_loop(model, random_batches(), steps=3, weight_decay=0.5)
    for layer in moe_layers(model):
        mask = layer.experts.drlora_mask["default"]
        for matrix in ("gate", "up", "down"):
            A = layer.experts.lora_weights("default", matrix)[0]
            before = next(v for n, v in initial.items() if n.endswith(f"{layer.name}.drlora_A_{matrix}.default"))
            assert torch.equal(A[mask == 0], before[mask == 0])
            assert not torch.equal(A[mask == 1], before[mask == 1])


def test_bias_correction_needs_adam_betas():
    model = drlora(tiny_moe("olmoe"))
    callback = DRLoRACallback(model.base_model)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="new_slice_update='bias_correction'"):
        callback.on_train_begin(SimpleNamespace(), TrainerState(max_steps=4), TrainerControl(), optimizer=sgd)


# --- save / load --------------------------------------------------------------------------------------------------


def test_save_and_load_keep_ranks_statistics_and_outputs(batch, tmp_path):
    model = drlora(tiny_moe("phimoe"), warmup_ratio=0.25, num_growth_events=2)
    trained_loop(model, random_batches(), steps=4)
    model.eval()
    report = model.base_model.rank_report()
    assert report["rank_sums"] != [8, 8]
    expected = model(batch).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(key.endswith("drlora_mask") for key in saved) and any(key.endswith("router_delta") for key in saved)
    reloaded = PeftModel.from_pretrained(tiny_moe("phimoe"), tmp_path).eval()
    assert reloaded.base_model.rank_report() == report
    assert torch.equal(reloaded(batch).logits, expected)


# --- the training pipeline ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A tiny random OLMoE with 6 experts and its tokenizer saved as a local model folder."""
    from conftest import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-olmoe")
    model = tiny_moe(
        "olmoe", vocab_size=len(tokenizer), max_position_embeddings=256, num_experts=6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_run_config(path, model_dir, output_dir, **training):
    config = {
        "model": str(model_dir),
        "method": "drlora",
        "adapter": {"r": 4, "lora_alpha": 8, "warmup_ratio": 0.25, "num_growth_events": 3},
        "data": {
            "train_files": [f"{t}={p}" for t, p in bundled_train_sources(include_approx=False).items()],
            "max_records_per_task": 8, "val_size": 0, "cutoff_len": 128,
        },
        "training": {"output_dir": str(output_dir), "max_steps": 8, "warmup_steps": 0, "global_batch_size": 4,
                     "micro_batch_size": 4, "save_steps": 4, "logging_steps": 1, "learning_rate": 1e-2,
                     "report_to": [], **training},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))


def test_train_command_grows_ranks_and_writes_the_rank_map(tmp_path, tiny_moe_dir):
    from moelora.cli import main

    config, run = tmp_path / "run.yaml", tmp_path / "run"
    write_run_config(config, tiny_moe_dir, run)
    assert main(["train", str(config)]) == 0
    report = json.loads((run / "drlora_rank_map.json").read_text())
    assert report["budget_met"] and report["rank_sums"] == [24, 24]  # N * r_target with N = 6, r_target = 4
    history = [sum(entry["ranks"][0]) for entry in report["history"]]
    assert [entry["step"] for entry in report["history"]] == [4, 5, 6] and history == [16, 20, 24]
    assert (run / "drlora_rank_map.png").read_bytes()[:4] == b"\x89PNG"
    logged = [json.loads(line) for line in (run / "drlora_routing.jsonl").read_text().splitlines()]
    assert len(logged) == 8 and len(logged[-1]["frequency"]["model.layers.0.mlp.experts"]) == 6
    state = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())
    assert all(0 < entry["drlora_frequency_entropy"] <= 1 for entry in state["log_history"] if "loss" in entry)
    reloaded = PeftModel.from_pretrained(OlmoeForCausalLM.from_pretrained(tiny_moe_dir), run)
    assert reloaded.base_model.rank_report()["ranks"] == report["ranks"]


def test_checkpoint_resumes_with_the_same_rank_map_and_masks(tmp_path, tiny_moe_dir):
    from moelora.cli import main

    config, full = tmp_path / "full.yaml", tmp_path / "full"
    write_run_config(config, tiny_moe_dir, full)
    assert main(["train", str(config)]) == 0
    resumed = tmp_path / "resumed"
    final = {"checkpoint-8", "adapter_model.safetensors", "drlora_rank_map.json", "train_metrics.json"}  # as of step 4
    shutil.copytree(full, resumed, ignore=lambda folder, names: final & set(names) if Path(folder) == full else [])
    middle = load_file(resumed / "checkpoint-4" / "adapter_model.safetensors")
    assert sum(v.sum() for k, v in middle.items() if k.endswith("drlora_mask")) == 2 * 16
    write_run_config(config, tiny_moe_dir, resumed)
    assert main(["train", str(config), "--resume"]) == 0
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    for key in a:
        if key.endswith(("drlora_mask", "drlora_activation_step")):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    first, second = (json.loads((d / "drlora_rank_map.json").read_text()) for d in (full, resumed))
    assert first["ranks"] == second["ranks"] and first["history"] == second["history"]


def test_two_ddp_processes_make_identical_growth_decisions(tmp_path, tiny_moe_dir):
    config = tmp_path / "run.yaml"
    write_run_config(config, tiny_moe_dir, tmp_path / "run", max_steps=6, micro_batch_size=2, save_steps=100)
    driver = Path(__file__).with_name("drlora_ddp_driver.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
               str(driver), str(tiny_moe_dir), str(config), str(tmp_path)]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1))
    local = [key for key in rank0 if key.startswith("local_counts")]
    assert local and any(not torch.equal(rank0[k], rank1[k]) for k in local), "the processes must see different data"
    state = [key for key in rank0 if "drlora_" in key]
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in state)
    masks = [rank0[k] for k in state if k.endswith("drlora_mask.default")]
    assert len(masks) == 2 and all(mask.sum() == 6 * 4 for mask in masks), "the budget is met on both processes"
    assert any(len(set(mask.sum(-1).tolist())) > 1 for mask in masks), "growth made the ranks uneven"
