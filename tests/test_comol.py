"""CoMoL against its spec (comol.md): loop reference, dropout placement, exact vs fast path, routers, init,
gradients, the spec's parameter counts, the layer-shared variant, checkpoints, autocast and config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AUTOCAST_DEVICE, generator
from peft import PeftModel, get_peft_model
from reference import orthogonality_by_hand
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from moelora import CheckpointMismatchError, CoMoLConfig, LoraConfig
from moelora.core import dropout as dropout_module
from moelora.methods import comol as comol_module
from moelora.methods.comol import CoMoLLinear

# --- the reference: the official forward written per token and per expert, in float64 ------------------------


def comol_reference(x, A, B, cores, router, scaling, core_router=True, top_k=None, masks=None):
    """Δy for x [..., d_in], one token and one expert at a time (comol.md §2).

    A [r, d_in], B [d_out, r], cores [E, r, r], router [E, r] or [E, d_in]. `masks` optionally holds the
    multiplicative dropout masks (already scaled by 1 / (1 - p)) for "input" [T, d_in], "core" [T, r, r] and
    "output" [T, r], T being the flattened token count.
    """
    masks = masks or {}
    tokens = x.reshape(-1, x.shape[-1]).double()
    A, B, cores, router = A.double(), B.double(), cores.double(), router.double()
    deltas = []
    for t, x_t in enumerate(tokens):
        x_in = x_t * masks["input"][t].double() if "input" in masks else x_t
        h = A @ x_in
        logits = router @ (h if core_router else x_t)
        g = [math.exp(v) for v in logits.tolist()]
        g = [v / sum(g) for v in g]
        if top_k is not None:
            kept = sorted(range(len(g)), key=lambda i: -g[i])[:top_k]
            total = sum(g[i] for i in kept)
            g = [g[i] / total if i in kept else 0.0 for i in range(len(g))]
        core = torch.zeros_like(cores[0])
        for i in range(cores.shape[0]):
            core = core + g[i] * cores[i]
        if "core" in masks:
            core = core * masks["core"][t].double()
        z = h @ core  # h is a row vector, right-multiplied by the merged core
        if "output" in masks:
            z = z * masks["output"][t].double()
        deltas.append(scaling * (B @ z))
    return torch.stack(deltas).reshape(*x.shape[:-1], B.shape[0])


class FakeDropout:
    """Stands in for F.dropout: draws masks from its own generator and keeps them, to feed the reference."""

    def __init__(self, keep_core=False):
        self.generator = generator(11)
        self.calls: list[tuple[tuple[int, ...], torch.Tensor]] = []
        self.keep_core = keep_core  # a core dropout ([T, r, r] inputs) that keeps every entry, scaled as dropout is

    def __call__(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        if self.keep_core and input.dim() == 3:
            mask = torch.ones_like(input) / (1 - p)
        else:
            mask = (torch.rand(input.shape, generator=self.generator) >= p).to(input.dtype) / (1 - p)
        self.calls.append((tuple(input.shape), mask))
        return input * mask


def use_fake_dropout(monkeypatch, fake) -> None:
    """Route every dropout of the layer through `fake`, which sees each mask's shape: F.dropout (drop3, and drop2
    where the core is materialised), the dropped positions the CPU draws for drop2, and drop1's, which
    core/dropout.py draws as one expert's mask [1, T, d_in] (shown to the fake as [T, d_in]; its sparse form is
    forced, whose positions are read off the mask, on every device)."""
    monkeypatch.setattr(F, "dropout", fake)

    def dropped_positions(shape, p, device):
        keep = fake(torch.ones(shape[1:] if shape[0] == 1 else shape, device=device), p)
        return (keep.reshape(-1) == 0).nonzero().squeeze(1).to(device, torch.float64)

    monkeypatch.setattr(comol_module, "draw_dropped_positions", dropped_positions)
    monkeypatch.setattr(dropout_module, "draw_dropped_positions", dropped_positions)
    monkeypatch.setattr(dropout_module, "_is_sparse", lambda form, x: True)


def make_layer(d_in=16, d_out=24, **config) -> CoMoLLinear:
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, num_experts=3, lora_dropout=0.0, init_weights=False)
    settings.update(config)
    layer = CoMoLLinear(nn.Linear(d_in, d_out), "default", CoMoLConfig(**settings))
    with torch.no_grad():  # O(1) adapter weights so that the update is far above the tolerances
        layer.comol_B["default"].normal_()
        layer.comol_router["default"].normal_()
    return layer


def params(layer: CoMoLLinear):
    return tuple(getattr(layer, name)["default"].detach() for name in CoMoLLinear.adapter_layer_names)


def expected_output(layer, x, scaling=2.0, **reference):
    A, B, cores, router = params(layer)
    return layer.base_layer(x).double() + comol_reference(x, A, B, cores, router, scaling, **reference)


def assert_update_matches(layer, x, got, **reference):
    expected = expected_output(layer, x, **reference)
    assert (expected - layer.base_layer(x).double()).abs().max() > 1e-2, "the update must be non-trivial"
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# --- forward against the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("core_path", ["exact", "fast", "auto"])
@pytest.mark.parametrize("core_router", [True, False])
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_paths_equal_the_reference_in_eval_mode(core_path, core_router, shape):
    layer = make_layer(lora_dropout=0.3, core_path=core_path, core_router=core_router).eval()
    x = torch.randn(*shape)
    got = layer(x)
    assert got.shape == (*shape[:-1], 24)
    assert_update_matches(layer, x, got, core_router=core_router)


@pytest.mark.parametrize("core_path", ["exact", "fast"])
def test_paths_equal_the_reference_in_train_mode_without_dropout(core_path):
    layer = make_layer(lora_dropout=0.0, core_path=core_path).train()
    x = torch.randn(3, 6, 16)
    assert_update_matches(layer, x, layer(x))


def test_exact_path_drops_input_merged_core_and_core_output(monkeypatch):
    layer = make_layer(lora_dropout=0.5, core_path="exact").train()
    x = torch.randn(2, 3, 16)
    fake = FakeDropout()
    use_fake_dropout(monkeypatch, fake)
    got = layer(x)
    assert [shape for shape, _ in fake.calls] == [(6, 16), (6, 4, 4), (6, 4)], "drop1 on x, drop2 on C(x), drop3"
    (_, input_mask), (_, core_mask), (_, output_mask) = fake.calls
    assert_update_matches(layer, x, got, masks={"input": input_mask, "core": core_mask, "output": output_mask})


@pytest.mark.parametrize("core_router", [True, False])
def test_the_three_dropouts_match_a_differentiable_reference_in_every_gradient(monkeypatch, core_router):
    """Training forward and backward (drop1 without a dropped copy of x, the CPU's drop2 without the core) against
    the official computation written with materialised cores in float64, on the masks drawn: the output and the
    gradients of x and of every adapter tensor, the router's path through h included."""
    layer = make_layer(lora_dropout=0.3, core_path="exact", core_router=core_router).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    fake = FakeDropout()
    use_fake_dropout(monkeypatch, fake)
    got = layer(x)
    (_, input_mask), (_, core_mask), (_, output_mask) = fake.calls
    upstream = torch.randn_like(got)
    (got * upstream).sum().backward()

    A, B, cores, router = (t.double().requires_grad_() for t in params(layer))
    x_ref = x.detach().double().requires_grad_()
    tokens = x_ref.reshape(10, 16)
    h = (tokens * input_mask.double()) @ A.T
    g = torch.softmax((h if core_router else tokens) @ router.T, dim=-1)
    merged = torch.einsum("te,eab->tab", g, cores) * core_mask.double()
    z = torch.bmm(h.unsqueeze(1), merged).squeeze(1) * output_mask.double()
    expected = layer.base_layer(x_ref.float()).double() + (2.0 * z @ B.T).view(2, 5, 24)
    (expected * upstream.double()).sum().backward()

    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-5, rtol=1e-5)
    for name, reference in zip(CoMoLLinear.adapter_layer_names, (A, B, cores, router), strict=True):
        torch.testing.assert_close(getattr(layer, name)["default"].grad.double(), reference.grad, atol=1e-5, rtol=1e-5)


def test_fast_path_never_materialises_the_core_and_omits_its_dropout(monkeypatch):
    layer = make_layer(lora_dropout=0.5, core_path="fast").train()
    x = torch.randn(6, 16)
    fake = FakeDropout()
    use_fake_dropout(monkeypatch, fake)
    got = layer(x)
    assert [shape for shape, _ in fake.calls] == [(6, 16), (6, 4)]
    (_, input_mask), (_, output_mask) = fake.calls
    assert_update_matches(layer, x, got, masks={"input": input_mask, "output": output_mask})


def test_the_cpu_core_dropout_equals_the_materialised_core_masked_in_values_and_gradients(monkeypatch):
    """core_product_with_dropout on a CPU (no [T, r, r] core) against C(x) materialised and masked with the entries
    it dropped: z and the gradients of the gates, the low-rank input and the cores (on the CPU whatever the test
    device: the form a CPU runs)."""
    drawn = []
    original = comol_module.draw_dropped_positions
    monkeypatch.setattr(comol_module, "draw_dropped_positions", lambda *a: drawn.append(original(*a)) or drawn[-1])
    g = torch.softmax(torch.randn(9, 3, device="cpu"), -1).requires_grad_()
    h, cores = (
        torch.randn(9, 5, device="cpu", requires_grad=True),
        torch.randn(3, 5, 5, device="cpu", requires_grad=True),
    )
    upstream = torch.randn(9, 5, device="cpu")
    z = comol_module.core_product_with_dropout(g, h, cores, 0.3)
    (z * upstream).sum().backward()
    (positions,) = drawn
    assert 0 < len(positions) < 9 * 25

    keep = torch.ones(9 * 25, device="cpu")
    keep[positions.long()] = 0.0
    rg, rh, rc = (t.detach().double().requires_grad_() for t in (g, h, cores))
    merged = (rg @ rc.reshape(3, 25)).view(9, 5, 5) * keep.double().view(9, 5, 5) / 0.7
    expected = torch.bmm(rh.unsqueeze(1), merged).squeeze(1)
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(z.double(), expected, atol=1e-5, rtol=1e-5)
    for got, reference in ((g, rg), (h, rh), (cores, rc)):
        torch.testing.assert_close(got.grad.double(), reference.grad, atol=1e-5, rtol=1e-5)


def test_exact_and_fast_agree_when_the_core_dropout_keeps_everything(monkeypatch):
    """The exact path (on p > 0, with a core dropout that keeps every entry, so only its 1 / (1 - p) scale acts)
    against the fast one, which omits drop2 and its scale."""
    x = torch.randn(5, 16)
    updates = {}
    for path in ("exact", "fast"):
        layer = make_layer(lora_dropout=0.5, core_path=path).train()
        fake = FakeDropout(keep_core=True)
        use_fake_dropout(monkeypatch, fake)
        updates[path] = layer(x) - layer.base_layer(x)
        assert ((5, 4, 4) in [shape for shape, _ in fake.calls]) == (path == "exact")
    torch.testing.assert_close(updates["exact"], updates["fast"] / (1 - 0.5), atol=1e-5, rtol=1e-5)


def test_exact_and_fast_are_identical_with_zero_core_dropout():
    x = torch.randn(4, 5, 16)
    outputs = {}
    for path in ("exact", "fast"):
        layer = make_layer(lora_dropout=0.4, core_dropout=0.0, core_path=path).train()
        torch.manual_seed(7)
        outputs[path] = layer(x)
    assert torch.equal(outputs["exact"], outputs["fast"])


@pytest.mark.parametrize(("r", "materialises"), [(4, True), (32, True), (33, False)])
def test_auto_path_is_exact_up_to_rank_32(monkeypatch, r, materialises):
    layer = make_layer(d_in=40, d_out=40, r=r, lora_dropout=0.2, core_path="auto").train()
    fake = FakeDropout()
    use_fake_dropout(monkeypatch, fake)
    layer(torch.randn(3, 40))
    assert ((3, r, r) in [shape for shape, _ in fake.calls]) == materialises


def test_core_dropout_defaults_to_lora_dropout_and_can_differ(monkeypatch):
    layer = make_layer(lora_dropout=0.5, core_dropout=0.25, core_path="exact").train()
    probabilities = []
    original = F.dropout
    use_fake_dropout(
        monkeypatch, lambda i, p=0.5, training=True, inplace=False: probabilities.append(p) or original(i, p, training)
    )
    layer(torch.randn(3, 16))
    assert probabilities == [0.5, 0.25, 0.25]
    probabilities.clear()
    make_layer(lora_dropout=0.5, core_path="exact").train()(torch.randn(3, 16))
    assert probabilities == [0.5, 0.5, 0.5]


# --- routers ----------------------------------------------------------------------------------------------------


def recorded_gates(layer, monkeypatch):
    seen = []
    monkeypatch.setattr(layer.routing, "record", lambda key, probs: seen.append((key, probs)))
    return seen


def test_router_without_cr_sees_raw_x_without_dropout(monkeypatch):
    layer = make_layer(core_router=False, lora_dropout=0.9).train()
    assert layer.comol_router["default"].shape == (3, 16)
    x = torch.randn(5, 16)
    seen = recorded_gates(layer, monkeypatch)
    layer(x)
    ((key, gates),) = seen
    assert key == "default/router"
    expected = torch.softmax(x.double() @ layer.comol_router["default"].detach().double().T, -1)
    torch.testing.assert_close(gates.double(), expected, atol=1e-6, rtol=1e-6)


def test_core_router_sees_the_dropped_low_rank_input(monkeypatch):
    layer = make_layer(core_router=True, lora_dropout=0.5).train()
    assert layer.comol_router["default"].shape == (3, 4)
    x = torch.randn(5, 16)
    fake = FakeDropout()
    use_fake_dropout(monkeypatch, fake)
    seen = recorded_gates(layer, monkeypatch)
    layer(x)
    input_mask = fake.calls[0][1]
    A, _, _, router = params(layer)
    expected = torch.softmax((x * input_mask).double() @ A.double().T @ router.double().T, -1)
    torch.testing.assert_close(seen[0][1].double(), expected, atol=1e-6, rtol=1e-6)


def test_top_k_keeps_k_gates_renormalised(monkeypatch):
    layer = make_layer(num_experts=4, top_k=2).eval()
    x = torch.randn(6, 16)
    seen = recorded_gates(layer, monkeypatch)
    got = layer(x)
    gates = seen[0][1]
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(6))
    assert_update_matches(layer, x, got, top_k=2)


def test_top_k_equal_to_num_experts_is_dense():
    x = torch.randn(6, 16)
    torch.testing.assert_close(make_layer(num_experts=4, top_k=4)(x), make_layer(num_experts=4)(x))


def test_single_core_is_lora_with_the_core_folded_into_A(model_factory, token_batch):
    """E = 1 is `corelora` / MoSLoRA: Δy = s B C^T A x, i.e. LoRA with A' = C^T A (comol.md §3)."""
    targets = ["q_proj", "v_proj", "down_proj"]
    common = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_weights=False)
    comol = get_peft_model(model_factory(), CoMoLConfig(num_experts=1, **common)).eval()
    lora = get_peft_model(model_factory(), LoraConfig(**common)).eval()
    comol_layers = [m for m in comol.modules() if isinstance(m, CoMoLLinear)]
    lora_layers = [m for m in lora.modules() if type(m).__name__ == "LoraLinear"]
    with torch.no_grad():
        for c, lo in zip(comol_layers, lora_layers, strict=True):
            c.comol_B["default"].normal_(std=0.3)
            lo.lora_A["default"].copy_(c.comol_cores["default"][0].T @ c.comol_A["default"])
            lo.lora_B["default"].copy_(c.comol_B["default"])
        got, expected = comol(input_ids=token_batch).logits, lora(input_ids=token_batch).logits
        with comol.disable_adapter():
            base = comol(input_ids=token_batch).logits
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_routing_statistics(model_factory, token_batch):
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=3, target_modules=["q_proj", "down_proj"])
    model = get_peft_model(model_factory(), config)
    model.base_model.record_routing(True)
    model(input_ids=token_batch)
    stats = model.base_model.routing_statistics()
    assert len(stats) == 4
    for per_router in stats.values():
        entry = per_router["default/router"]
        assert len(entry["mean_prob"]) == 3 and math.isclose(sum(entry["mean_prob"]), 1.0, rel_tol=1e-6)
        assert 0 < entry["entropy"] <= math.log(3) + 1e-9
        assert entry["tokens"] == token_batch.numel()


# --- init, gradients, freezing ------------------------------------------------------------------------------------


def test_update_is_zero_at_init(model_factory, token_batch):
    base_logits = model_factory()(input_ids=token_batch).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    model = get_peft_model(model_factory(), CoMoLConfig(r=4, lora_alpha=4, target_modules=targets)).eval()
    assert torch.equal(model(input_ids=token_batch).logits, base_logits)


@pytest.mark.parametrize("core_router", [True, False])
def test_init_distributions(core_router):
    torch.manual_seed(0)
    config = CoMoLConfig(r=16, lora_alpha=16, num_experts=8, core_router=core_router)
    layer = CoMoLLinear(nn.Linear(256, 64), "default", config)
    A, B, cores, router = params(layer)
    assert A.shape == (16, 256) and B.shape == (64, 16) and cores.shape == (8, 16, 16)
    assert not B.any()
    router_bound = 1 / 4 if core_router else 1 / 16  # 1/sqrt(r) on the low-rank h, 1/sqrt(d_in) on x
    for tensor, bound in ((A, 1 / 16), (cores, 1 / 4), (router, router_bound)):
        assert tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.9 * bound
        assert abs(float(tensor.mean())) < 0.1 * bound
    assert not torch.equal(cores[0], cores[1])
    assert all(p.dtype == torch.float32 for p in (A, B, cores, router))


def test_only_B_learns_at_step_zero_then_every_tensor_does(model_factory, token_batch):
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=3, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model_factory(), config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=token_batch, labels=token_batch).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert (param.grad.abs().sum() > 0) == ("comol_B" in name), name
    optimizer.step()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    trainable = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable += 1
            assert "comol_" in name
            grad = param.grad
            per_row = grad.flatten(1).abs().sum(1)  # per expert for the cores, per row elsewhere
            assert (per_row > 0).all(), f"{name}: a core expert, router row or factor row got no gradient"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert trainable == 2 * 3 * 4  # 2 layers x 3 modules x (A, B, cores, router)


# --- parameter counts of comol.md §5 (real backbone shapes, meta device) ------------------------------------------

BACKBONES = {
    "qwen3_8b": (Qwen3Config, Qwen3ForCausalLM, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36)),
    "llama31_8b": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
    ),
    "qwen3_14b": (Qwen3Config, Qwen3ForCausalLM, dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def trainable_on_meta(backbone: str, peft_config) -> int:
    config_cls, model_cls, sizes = BACKBONES[backbone]
    heads = sizes["hidden_size"] // 128
    config = config_cls(vocab_size=1024, num_attention_heads=heads, num_key_value_heads=8, head_dim=128, **sizes)
    with torch.device("meta"):
        model = model_cls(config)
    peft_model = get_peft_model(model, peft_config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # shared tensors count once


def comol(r=16, num_experts=8, **overrides) -> CoMoLConfig:
    settings = dict(r=r, lora_alpha=r, num_experts=num_experts, target_modules=TARGETS)
    settings.update(overrides)
    return CoMoLConfig(**settings)


# (backbone, config, exact count by r(d_in + d_out) + E r^2 + (r E or d_in E) per module, spec table in M)
SPEC_TABLE = [
    ("qwen3_8b", lambda: LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS), 24_772_608, 24.77),
    ("qwen3_8b", lambda: comol(), 25_164_288, 25.16),
    ("qwen3_8b", lambda: comol(num_experts=4), 24_968_448, 24.97),
    ("qwen3_8b", lambda: comol(core_router=False), 33_398_784, 33.40),
    ("qwen3_8b", lambda: comol(layer_shared=True, target_modules=[*TARGETS, "up_proj"]), 1_420_288, 1.42),
    ("llama31_8b", lambda: LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS), 23_068_672, 23.07),
    ("llama31_8b", lambda: comol(), 23_416_832, 23.42),
    ("llama31_8b", lambda: comol(num_experts=4), 23_242_752, 23.24),
    ("llama31_8b", lambda: comol(core_router=False), 31_260_672, 31.26),
    ("llama31_8b", lambda: comol(layer_shared=True, target_modules=[*TARGETS, "up_proj"]), 1_433_600, 1.43),
    ("qwen3_14b", lambda: LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS), 35_389_440, 35.39),
    ("qwen3_14b", lambda: comol(), 35_824_640, 35.82),
    ("qwen3_14b", lambda: comol(num_experts=4), 35_607_040, 35.61),
    ("qwen3_14b", lambda: comol(core_router=False), 47_923_200, 47.92),
    ("qwen3_14b", lambda: comol(layer_shared=True, target_modules=[*TARGETS, "up_proj"]), 1_767_424, 1.77),
]


@pytest.mark.parametrize(("backbone", "make_config", "exact", "in_millions"), SPEC_TABLE)
def test_spec_parameter_table(backbone, make_config, exact, in_millions):
    assert round(exact / 1e6, 2) == in_millions
    assert trainable_on_meta(backbone, make_config()) == exact


# The authors' rank sweep (comol_rank.ipynb): Qwen3-8B, E = 4; LoRA / CoMoL / CoMoL w/o CR in M.
RANK_SWEEP = [
    (8, (12_386_304, 12.39), (12_438_144, 12.44), (16_561_152, 16.56)),
    (16, (24_772_608, 24.77), (24_968_448, 24.97), (29_085_696, 29.09)),
    (32, (49_545_216, 49.55), (50_305_536, 50.31), (54_411_264, 54.41)),
    (64, (99_090_432, 99.09), (102_085_632, 102.09), (106_168_320, 106.17)),
]


@pytest.mark.parametrize(("r", "lora", "with_cr", "without_cr"), RANK_SWEEP)
def test_authors_rank_sweep_counts(r, lora, with_cr, without_cr):
    configs = (
        LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS),
        comol(r=r, num_experts=4),
        comol(r=r, num_experts=4, core_router=False),
    )
    for config, (exact, in_millions) in zip(configs, (lora, with_cr, without_cr), strict=True):
        assert round(exact / 1e6, 2) == in_millions
        assert trainable_on_meta("qwen3_8b", config) == exact


# --- the layer-shared variant ("mocorelorash") -------------------------------------------------------------------


def shared_config(**overrides) -> CoMoLConfig:
    settings = dict(r=4, lora_alpha=8, num_experts=3, layer_shared=True, init_weights=False)
    settings.update(target_modules=["q_proj", "v_proj", "down_proj"], **overrides)
    return CoMoLConfig(**settings)


def adapted(model) -> dict[str, CoMoLLinear]:
    return {name.split("model.layers.")[-1]: m for name, m in model.named_modules() if isinstance(m, CoMoLLinear)}


def assert_tied(model, adapter_name="default"):
    layers = adapted(model)
    for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        first, second = layers[f"0.{kind}"], layers[f"1.{kind}"]
        assert first.comol_A[adapter_name] is second.comol_A[adapter_name]
        assert first.comol_B[adapter_name] is second.comol_B[adapter_name]
        assert first.comol_cores[adapter_name] is not second.comol_cores[adapter_name]
        assert first.comol_router[adapter_name] is not second.comol_router[adapter_name]
    assert layers["0.self_attn.q_proj"].comol_A[adapter_name] is not layers["0.self_attn.v_proj"].comol_A[adapter_name]


def test_layer_shared_ties_A_and_B_per_projection_type(model_factory, token_batch):
    model = get_peft_model(model_factory(), shared_config()).train()
    assert_tied(model)
    # shared: q 4*(32+32), v 4*(32+16), down 4*(48+32); per layer and module: 3 cores 4x4 + router 3x4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 768 + 2 * 3 * 60
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
    assert_tied(model)


def test_layer_shared_gradient_sums_both_layers(model_factory, token_batch):
    """The shared A gets the sum of what two untied copies with the same values would get."""
    config = shared_config(lora_dropout=0.0)
    shared = get_peft_model(model_factory(), config)
    untied = get_peft_model(model_factory(), shared_config(lora_dropout=0.0, layer_shared=False))
    with torch.no_grad():
        for name, layer in adapted(untied).items():
            for tensor in CoMoLLinear.adapter_layer_names:
                getattr(layer, tensor)["default"].copy_(getattr(adapted(shared)[name], tensor)["default"])
    for model in (shared, untied):
        model(input_ids=token_batch, labels=token_batch).loss.backward()
    shared_layers, untied_layers = adapted(shared), adapted(untied)
    expected = untied_layers["0.self_attn.q_proj"].comol_A["default"].grad
    expected = expected + untied_layers["1.self_attn.q_proj"].comol_A["default"].grad
    torch.testing.assert_close(shared_layers["0.self_attn.q_proj"].comol_A["default"].grad, expected)


def test_layer_shared_has_no_core_dropout_by_default(monkeypatch):
    layer = make_layer(lora_dropout=0.5, layer_shared=True).train()
    fake = FakeDropout()
    use_fake_dropout(monkeypatch, fake)
    layer(torch.randn(4, 16))
    assert [shape for shape, _ in fake.calls] == [(4, 16)]


def test_layer_shared_round_trip_re_ties(model_factory, token_batch, tmp_path):
    model = get_peft_model(model_factory(), shared_config()).eval()
    expected = model(input_ids=token_batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)
    assert_tied(loaded)


def test_layer_shared_checkpoint_with_differing_copies_is_refused(model_factory, tmp_path):
    get_peft_model(model_factory(), shared_config()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.comol_A"] += 1.0
    save_file(tensors, path)
    with pytest.raises(CheckpointMismatchError, match=r"differing comol_A copies for 'v_proj'"):
        PeftModel.from_pretrained(model_factory(), tmp_path)


def test_layer_shared_refuses_low_cpu_mem_usage_loading(model_factory, tmp_path):
    get_peft_model(model_factory(), shared_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        PeftModel.from_pretrained(model_factory(), tmp_path, low_cpu_mem_usage=True)


def test_layer_shared_refuses_one_name_with_two_shapes():
    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.proj = nn.Linear(width, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(8), Block(12)])

    with pytest.raises(ValueError, match=r"layer_shared.*both 'proj'"):
        get_peft_model(Net(), CoMoLConfig(r=2, lora_alpha=2, layer_shared=True, target_modules=["proj"]))


# --- checkpoints --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("core_router", [True, False])
def test_save_and_load_reproduce_outputs_exactly(model_factory, token_batch, tmp_path, core_router):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    config = CoMoLConfig(
        r=4, lora_alpha=8, num_experts=3, core_router=core_router, target_modules=targets, init_weights=False
    )
    model = get_peft_model(model_factory(), config).eval()
    expected = model(input_ids=token_batch).logits
    with model.disable_adapter():
        assert not torch.equal(model(input_ids=token_batch).logits, expected)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 2 * 5 * 4
    assert "base_model.model.model.layers.0.mlp.down_proj.comol_cores" in keys
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path).eval()
    loaded_config = loaded.peft_config["default"]
    assert isinstance(loaded_config, CoMoLConfig)
    assert (loaded_config.num_experts, loaded_config.core_router) == (3, core_router)
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


def test_comol_refuses_to_merge(model_factory):
    model = get_peft_model(model_factory(), CoMoLConfig(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="cannot be merged.*router"):
        model.merge_and_unload()


# --- dtypes -------------------------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu(model_factory, token_batch, monkeypatch):
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=3, init_weights=False, lora_dropout=0.0)
    model = get_peft_model(model_factory(), config)
    reference = model(input_ids=token_batch).logits
    gate_dtypes = []
    for layer in (m for m in model.modules() if isinstance(m, CoMoLLinear)):
        monkeypatch.setattr(layer.routing, "record", lambda key, probs: gate_dtypes.append(probs.dtype))
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=token_batch, labels=token_batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert gate_dtypes and set(gate_dtypes) == {torch.float32}, "router softmax must stay fp32 under autocast"
    assert (out.logits.float() - reference).abs().max() < 0.1
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


def test_bf16_base_model_keeps_fp32_adapter_weights(model_factory, token_batch):
    model = get_peft_model(model_factory().to(torch.bfloat16), CoMoLConfig(r=4, lora_alpha=8))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model(input_ids=token_batch).logits.dtype == torch.bfloat16


# --- the optional core orthogonality loss ---------------------------------------------------------------------------


def test_core_orthogonality_loss_is_off_by_default(model_factory, token_batch):
    model = get_peft_model(model_factory(), CoMoLConfig(r=4, lora_alpha=8))
    model(input_ids=token_batch, labels=token_batch)
    assert model.base_model.auxiliary_losses() == {}


def test_core_orthogonality_loss_is_summed_over_modules_and_added(model_factory, token_batch):
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=3, core_orthogonal_loss_weight=0.5, lora_dropout=0.0)
    model = get_peft_model(model_factory(), config)
    with_aux = model(input_ids=token_batch, labels=token_batch).loss
    expected = sum(
        0.5 * orthogonality_by_hand(m.comol_cores["default"].detach())
        for m in model.modules()
        if isinstance(m, CoMoLLinear)
    )
    assert expected > 0
    assert math.isclose(model.base_model.last_auxiliary_losses["core_orthogonality"], expected, rel_tol=1e-5)
    model.base_model.add_auxiliary_losses_to_loss = False
    plain = model(input_ids=token_batch, labels=token_batch).loss
    assert math.isclose(float((with_aux - plain).detach()), expected, rel_tol=1e-4)


# --- config checks --------------------------------------------------------------------------------------------------


def test_defaults_follow_the_official_recipe():
    config = CoMoLConfig()
    assert (config.r, config.lora_alpha, config.num_experts, config.lora_dropout) == (16, 16, 8, 0.1)
    assert config.core_router and config.top_k is None and config.core_orthogonal_loss_weight == 0
    assert config.peft_type == "COMOL"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2.5}, "num_experts"),
        ({"r": 0}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"core_dropout": 1.0}, "core_dropout"),
        ({"core_dropout": -0.5}, "core_dropout"),
        ({"core_path": "materialised"}, "core_path"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 9}, "top_k"),
        ({"core_orthogonal_loss_weight": -1e-3}, "core_orthogonal_loss_weight"),
        ({"core_router": "yes"}, "core_router"),
        ({"layer_shared": 1}, "layer_shared"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"CoMoLConfig\.{field}\b"):
        CoMoLConfig(**overrides)


def test_a_single_core_merges_exactly(model_factory, token_batch):
    """E = 1 is CoRe / MoSLoRA: the gate is 1 for every token, so the update is input-independent and merges."""
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=1, init_weights=False, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model_factory(), config).eval()
    expected = model(token_batch).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(token_batch).logits, expected, rtol=1e-5, atol=1e-5)
