"""MoA against its spec (moa.md): one decoder layer against a per-token reference, the prompt expert against an
independent computation, sparse vs soft, init, the spec's parameter counts, the frozen threshold, hooks, checkpoints,
autocast, architectures and config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AUTOCAST_DEVICE, generator
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from moelora import METHODS, MoAConfig
from moelora.methods import method_name_of
from moelora.methods.moa import MoABlock, MoALinear, Routing

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # biases on q, k, v
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),  # q_norm / k_norm
}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


def tiny(arch: str = "llama", seed: int = 0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**TINY, **extra)).eval()


def moa(arch: str = "llama", seed: int = 1, **settings):
    """A tiny model with MoA; the adapter is drawn from its own seed."""
    model = tiny(arch)
    torch.manual_seed(seed)
    return get_peft_model(model, MoAConfig(**settings))


def tokens(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=generator(1))


def layers(model) -> list:
    return list(model.base_model.model.model.layers)


# --- the reference: one decoder layer in float64, token by token -------------------------------------------------


def base(module):
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def linear(module, x):
    layer = base(module)
    y = x @ layer.weight.double().T
    return y + layer.bias.double() if layer.bias is not None else y


def rms(x, norm):
    norm = base(norm)
    return norm.weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def rotate(x, cos, sin):
    """RoPE by its definition: pairs (i, i + d/2) rotated by the position's angles."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def router_reference(block, v, config, adapter="default"):
    """w [T, N] for router inputs v [T, d]: γ, or γ·1[γ >= τ] in sparse MoA; one token at a time."""
    p = {
        name: getattr(block, name)[adapter].double()
        for name in block.adapter_layer_names
        if adapter in getattr(block, name)
    }
    rows = []
    for vt in v.double():
        if config.swi_x:
            hidden = F.silu(p["moa_router_w1"] @ vt + p["moa_router_b1"]) * (
                p["moa_router_w3"] @ vt + p["moa_router_b3"]
            )
        else:
            hidden = vt
        logits = p["moa_router_weight"] @ hidden + p["moa_router_bias"]
        if config.gate_activation == "sigmoid":
            gates = torch.sigmoid(logits)
        else:
            gates = len(logits) * torch.softmax(logits, dim=0)
        if config.sparse:
            if config.const_threshold:
                tau = config.max_threshold
            else:
                tau = config.max_threshold * torch.sigmoid(
                    p["moa_threshold_weight"][0] @ vt + p["moa_threshold_bias"][0]
                )
            gates = gates * (gates >= tau)
        rows.append(gates)
    return torch.stack(rows)


def prompt_reference(attention, block, q, cos, sin, weight, adapter="default"):
    """The prompt expert's [B, S, H d_h] addition to o_proj's input, one (token, head) at a time: q the q_proj output
    [B, S, H d_h] before q_norm and RoPE, weight [B, S] its γ_prompt."""
    prompt, gate = block.moa_prompt[adapter].double(), block.moa_prompt_gate[adapter].double()
    head_dim, heads = attention.head_dim, attention.config.num_attention_heads
    groups = heads // attention.config.num_key_value_heads
    keys, values = linear(attention.k_proj, prompt), linear(attention.v_proj, prompt)  # frozen, no LoRA, no RoPE
    out = torch.zeros(q.shape, dtype=torch.float64)
    cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
    for b in range(q.shape[0]):
        for s in range(q.shape[1]):
            for h in range(heads):
                q_h = q[b, s, h * head_dim : (h + 1) * head_dim].double()
                if hasattr(attention, "q_norm"):
                    q_h = rms(q_h, attention.q_norm)
                q_h = rotate(q_h, cos[b, s].double(), sin[b, s].double())
                kv = slice((h // groups) * head_dim, (h // groups + 1) * head_dim)
                k_h = keys[:, kv]
                if hasattr(attention, "k_norm"):
                    k_h = rms(k_h, attention.k_norm)
                probs = torch.softmax(k_h @ q_h / math.sqrt(head_dim), dim=0)  # over the L prompt tokens
                out[b, s, h * head_dim : (h + 1) * head_dim] = weight[b, s] * gate[h] * (probs @ values[:, kv])
    return out


def decoder_layer_reference(layer, u, cos, sin, config):
    """The decoder layer's output with MoA for its input u [B, S, d] (moa.md §2), in float64: the router and every
    expert one token at a time, the causal attention one (sequence, head) at a time."""
    u = u.double()
    batch, seq, _ = u.shape
    attention, mlp, block = layer.self_attn, layer.mlp, layer.input_layernorm
    slots = list(block.expert_slots["default"])
    x_a = rms(u, block)
    w = router_reference(block, (x_a if config.router_input == "normed" else u).reshape(batch * seq, -1), config)
    w = w.reshape(batch, seq, -1)

    def weight(expert):
        return w[..., slots.index(expert)]

    def project(module, x):
        y = linear(module, x)
        if isinstance(module, MoALinear):
            A, B = module.moa_lora_A["default"].double(), module.moa_lora_B["default"].double()
            for b in range(batch):
                for s in range(seq):
                    y[b, s] += weight(module.expert_name)[b, s] * config.scaling * (B @ (A @ x[b, s]))
        return y

    head_dim, heads = attention.head_dim, attention.config.num_attention_heads
    groups = heads // attention.config.num_key_value_heads
    q_out = project(attention.q_proj, x_a)
    q = q_out.view(batch, seq, heads, head_dim)
    k = project(attention.k_proj, x_a).view(batch, seq, -1, head_dim)
    v = project(attention.v_proj, x_a).view(batch, seq, -1, head_dim)
    if hasattr(attention, "q_norm"):
        q, k = rms(q, attention.q_norm), rms(k, attention.k_norm)
    q, k = rotate(q, cos[:, :, None], sin[:, :, None]), rotate(k, cos[:, :, None], sin[:, :, None])
    a = torch.zeros(batch, seq, heads, head_dim, dtype=torch.float64)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for b in range(batch):
        for h in range(heads):
            scores = (q[b, :, h] @ k[b, :, h // groups].T / math.sqrt(head_dim)).masked_fill(~causal, -math.inf)
            a[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, :, h // groups]
    a = a.reshape(batch, seq, heads * head_dim)
    if "prompt" in slots:
        a = a + prompt_reference(attention, block, q_out, cos, sin, weight("prompt"))
    hidden = u + project(attention.o_proj, a)

    x_f = rms(hidden, layer.post_attention_layernorm)
    out = project(mlp.down_proj, F.silu(project(mlp.gate_proj, x_f)) * project(mlp.up_proj, x_f))
    if "parallel_adapter" in slots:
        D, b_D = block.moa_adapter_down["default"].double(), block.moa_adapter_down_bias["default"].double()
        U, b_U = block.moa_adapter_up["default"].double(), block.moa_adapter_up_bias["default"].double()
        for b in range(batch):
            for s in range(seq):
                out[b, s] += weight("parallel_adapter")[b, s] * (U @ F.silu(D @ x_f[b, s] + b_D) + b_U)
    return hidden + out


def capture_layer_call(layer):
    """Records the decoder layer's input, output and position embeddings of the next forward."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        seen["cos"], seen["sin"] = kwargs["position_embeddings"]
        seen["output"] = output[0] if isinstance(output, tuple) else output

    return seen, layer.register_forward_hook(hook, with_kwargs=True)


REFERENCE_CASES = {
    "llama-soft": ("llama", dict()),
    "llama-soft-all-targets-swiglu-raw": ("llama", dict(target_modules=ALL_TARGETS, swi_x=4, router_input="raw")),
    "llama-sparse-with-prompt": ("llama", dict(sparse=True, max_threshold=0.9, prompt_length=3, swi_x=2)),
    "qwen2-sparse-const-softmax": ("qwen2", dict(sparse=True, const_threshold=True, gate_activation="softmax")),
    "qwen3-soft-swiglu": ("qwen3", dict(swi_x=4)),
    "qwen3-sparse": ("qwen3", dict(sparse=True, max_threshold=0.9)),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_decoder_layer_equals_the_per_token_reference(case):
    arch, settings = REFERENCE_CASES[case]
    model = moa(arch, init_weights=False, **settings)
    config = model.peft_config["default"]
    layer = layers(model)[1]
    seen, handle = capture_layer_call(layer)
    with torch.no_grad():
        model(tokens())
    handle.remove()
    routing = layer.input_layernorm.context.routing("default")
    if config.sparse:  # the case exercises the gather/scatter: some tokens pass, some do not
        assert routing.selected.any() and not routing.selected.all()
    expected = decoder_layer_reference(layer, seen["input"], seen["cos"], seen["sin"], config)
    torch.testing.assert_close(seen["output"].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["llama-soft", "llama-sparse-with-prompt", "qwen3-sparse"])
def test_decoder_layer_gradients_equal_the_reference_gradients(case):
    """Backward through one decoder layer against autograd through the per-token reference: the gradient of every
    trained tensor of the layer (each gate applied in its expert's narrow space, the reference's on its output)."""
    arch, settings = REFERENCE_CASES[case]
    model = moa(arch, init_weights=False, **settings)
    config = model.peft_config["default"]
    layer = layers(model)[1]
    seen, handle = capture_layer_call(layer)
    model(tokens())
    handle.remove()
    upstream = torch.randn(seen["output"].shape, generator=generator(5))
    trained = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    got = torch.autograd.grad((seen["output"] * upstream).sum(), list(trained.values()), allow_unused=True)
    u = seen["input"].detach()
    expected = decoder_layer_reference(layer, u, seen["cos"].detach(), seen["sin"].detach(), config)
    reference = torch.autograd.grad((expected * upstream.double()).sum(), list(trained.values()), allow_unused=True)
    assert sum(g is not None for g in got) > 4
    for name, a, b in zip(trained, got, reference, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_prompt_expert_equals_an_independent_computation(arch):
    """The o_proj input with and without the prompt expert (GQA: 4 query heads share 2 key/value heads)."""
    model = moa(arch, init_weights=False, prompt_length=4, parallel_adapter_size=0)
    layer = layers(model)[0]
    attention, block = layer.self_attn, layer.input_layernorm
    seen = {}
    handles = [
        attention.o_proj.register_forward_pre_hook(lambda m, args: seen.update(before=args[0]), prepend=True),
        attention.o_proj.register_forward_pre_hook(lambda m, args: seen.update(after=args[0])),
        attention.q_proj.register_forward_hook(lambda m, args, out: seen.update(q=out)),
        attention.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(rope=kwargs["position_embeddings"]), with_kwargs=True
        ),
    ]
    with torch.no_grad():
        model(tokens())
    for handle in handles:
        handle.remove()
    routing = block.context.routing("default")
    gamma = routing.weights[:, routing.slots["prompt"]].reshape(2, 5)
    expected = prompt_reference(attention, block, seen["q"], *seen["rope"], gamma)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close((seen["after"] - seen["before"]).double(), expected, rtol=1e-5, atol=1e-6)


def test_sparse_with_zero_threshold_equals_soft_without_prompt():
    settings = dict(init_weights=False, swi_x=4, target_modules=ALL_TARGETS)
    soft = moa(prompt_length=0, **settings)
    sparse = moa(sparse=True, max_threshold=0.9, **settings)
    soft_params = dict(soft.named_parameters())
    with torch.no_grad():
        for name, param in sparse.named_parameters():
            if "moa_threshold" not in name:
                param.copy_(soft_params[name])
        expected = soft(tokens()).logits
        thresholded = sparse(tokens()).logits
        for layer in layers(sparse):  # τ = max_threshold * sigmoid(-inf) = 0: every expert takes every token
            layer.input_layernorm.moa_threshold_bias["default"].fill_(-math.inf)
        torch.testing.assert_close(sparse(tokens()).logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(thresholded, expected)


def test_routing_apply_runs_the_expert_on_selected_rows_only():
    x = torch.arange(12.0).reshape(4, 3)
    weights = torch.tensor([[0.9, 0.2], [0.1, 0.7], [0.8, 0.6], [0.3, 0.4]])
    selected = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    up, bias = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), torch.tensor([0.25, -1.0])
    seen = []

    def down(rows):
        seen.append(rows)
        return rows[:, :2] * 2

    def expected(t, w):  # w · s · (U down(x_t) + b), s = 1.5
        return w * 1.5 * (up @ (x[t, :2] * 2) + bias)

    out = Routing(weights * selected, selected, {"a": 0, "b": 1}).apply("a", x, down, up, bias, scaling=1.5)
    assert torch.equal(seen[0], x[[0, 2]])
    zero = torch.zeros(2)
    torch.testing.assert_close(out, torch.stack([expected(0, 0.9), zero, expected(2, 0.8), zero]))
    dense = Routing(weights, None, {"a": 0, "b": 1}).apply("b", x, down, up, bias, scaling=1.5)
    assert torch.equal(seen[1], x)
    torch.testing.assert_close(dense, torch.stack([expected(t, weights[t, 1]) for t in range(4)]))


# --- init ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("sparse", [False, True])
def test_update_is_exactly_zero_with_zero_init_pa(arch, sparse):
    expected = tiny(arch)(tokens()).logits
    model = moa(arch, sparse=sparse, swi_x=4, parallel_adapter_zero_init=True)
    torch.testing.assert_close(model(tokens()).logits, expected, rtol=0, atol=0)


def test_official_init_is_near_zero_not_zero():
    """PA D and U ~ xavier_uniform(gain 1e-4), biases 0: the update is tiny but not zero (moa.md §2, §11)."""
    expected = tiny()(tokens()).logits
    model = moa()
    bound = 1e-4 * math.sqrt(6 / (32 + 16))
    for layer in layers(model):
        block = layer.input_layernorm
        for name in ("moa_adapter_down", "moa_adapter_up"):
            weight = getattr(block, name)["default"]
            assert 0 < weight.abs().max() <= bound
        assert not block.moa_adapter_down_bias["default"].any() and not block.moa_adapter_up_bias["default"].any()
    difference = (model(tokens()).logits - expected).abs().max()
    assert 0 < difference < 1e-6


def test_init_distributions():
    model = moa(sparse=True, prompt_length=10, swi_x=0)
    d = 32
    for layer in layers(model):
        block = layer.input_layernorm
        for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
            A = module.moa_lora_A["default"]
            assert A.abs().max() <= 1 / math.sqrt(module.in_features) and A.std() > 0
            assert not module.moa_lora_B["default"].any()
        for name in ("moa_router_weight", "moa_router_bias", "moa_threshold_weight", "moa_threshold_bias"):
            value = getattr(block, name)["default"]  # nn.Linear's init, the bias included (not zero)
            assert value.abs().max() <= 1 / math.sqrt(d) and value.abs().min() > 0
        prompt = block.moa_prompt["default"]
        assert prompt.shape == (10, d) and 0.8 < prompt.std() < 1.2
        assert block.moa_prompt_gate["default"].shape == (4,) and not block.moa_prompt_gate["default"].any()
    swiglu = layers(moa(swi_x=4))[0].input_layernorm
    assert swiglu.moa_router_w1["default"].shape == (7 * 4, d) and swiglu.moa_router_weight["default"].shape == (7, 28)
    for name in ("moa_router_b1", "moa_router_b3", "moa_router_bias"):
        assert not getattr(swiglu, name)["default"].any()


# --- parameter counts of moa.md §4 (real backbone shapes, meta device) ---------------------------------------------

BACKBONES = {
    "llama31_8b": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
    ),
    "qwen3_8b": (Qwen3Config, Qwen3ForCausalLM, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36)),
}


def counts_on_meta(backbone: str, config: MoAConfig) -> tuple[int, int]:
    """(trainable, all adapter parameters) on the backbone's shapes: 32 heads, 8 key/value heads of 128."""
    config_cls, model_cls, sizes = BACKBONES[backbone]
    with torch.device("meta"):
        model = model_cls(
            config_cls(vocab_size=1024, num_attention_heads=32, num_key_value_heads=8, head_dim=128, **sizes)
        )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapter = sum(tensor.numel() for tensor in get_peft_model_state_dict(peft_model).values())
    return trainable, adapter


# Per layer, Llama-3.1-8B: LoRA r8 on q, k, v, o, down 360,448; PA 2*16*4096 + 16 + 4096 = 135,184; prompt
# 10*4096 + 32 gates; router N*4096 + N (linear) or 2*(4N*4096 + 4N) + 4N*N + N (SwiGLU); threshold 4096 + 1.
# The spec's sparse columns count the threshold net: all adapter parameters. It is frozen state by default
# (the official τ gets no gradient), so the trainable count is lower by 32 (36) * 4,097 unless it is adaptive.
SPEC_TABLE = [
    ("llama31_8b", dict(swi_x=4), 24_520_288, 24_520_288, 24.52),
    ("llama31_8b", dict(swi_x=0), 18_089_696, 18_089_696, 18.09),
    ("llama31_8b", dict(sparse=True, swi_x=4), 22_158_016, 22_289_120, 22.29),
    ("llama31_8b", dict(sparse=True, swi_x=0), 16_646_848, 16_777_952, 16.78),
    ("llama31_8b", dict(sparse=True, swi_x=4, adaptive_threshold_grad=True), 22_289_120, 22_289_120, 22.29),
    ("llama31_8b", dict(swi_x=4, prompt_length=0), 22_158_016, 22_158_016, 22.16),  # the HF soft column
    ("qwen3_8b", dict(swi_x=4), 26_995_500, 26_995_500, 27.00),
    ("qwen3_8b", dict(swi_x=0), 19_761_084, 19_761_084, 19.76),
    ("qwen3_8b", dict(sparse=True, swi_x=4), 24_337_944, 24_485_436, 24.49),
    ("qwen3_8b", dict(sparse=True, swi_x=0), 18_137_880, 18_285_372, 18.29),
    ("qwen3_8b", dict(swi_x=4, prompt_length=0), 24_337_944, 24_337_944, 24.34),
]


@pytest.mark.parametrize(("backbone", "settings", "trainable", "adapter", "in_millions"), SPEC_TABLE)
def test_spec_parameter_table(backbone, settings, trainable, adapter, in_millions):
    assert round(adapter / 1e6, 2) == in_millions
    assert counts_on_meta(backbone, MoAConfig(**settings)) == (trainable, adapter)


# --- training behaviour ---------------------------------------------------------------------------------------------

GRADIENT_CASES = {
    "soft-swiglu-prompt-all-targets": dict(swi_x=4, target_modules=ALL_TARGETS),
    "soft-softmax-raw": dict(gate_activation="softmax", router_input="raw"),
    "sparse-with-prompt": dict(sparse=True, prompt_length=2),
    "sparse-adaptive": dict(sparse=True, adaptive_threshold_grad=True, swi_x=4),
    "qwen3-soft": dict(arch="qwen3"),
}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradients_reach_every_trainable_tensor_and_nothing_else(case):
    model = moa(init_weights=False, **GRADIENT_CASES[case]).train()
    model(tokens(), labels=tokens()).loss.backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("moa_prompt_gate" in n for n in trainable) == (model.peft_config["default"].prompt_length > 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert param.grad is None, f"the frozen {name} got a gradient"


def test_threshold_is_frozen_saved_state_by_default():
    model = moa(sparse=True, init_weights=False).train()
    thresholds = {n: p for n, p in model.named_parameters() if "moa_threshold" in n}
    assert len(thresholds) == 2 * 2 and not any(p.requires_grad for p in thresholds.values())
    before = {n: p.detach().clone() for n, p in thresholds.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(tokens(), labels=tokens()).loss.backward()
    optimizer.step()
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in thresholds.items())
    model.base_model.set_adapter("default")  # paths that mark adapter weights trainable keep it frozen
    model.base_model.enable_adapter_layers()
    assert not any(p.requires_grad for p in thresholds.values())
    saved = get_peft_model_state_dict(model)
    assert sum("moa_threshold" in key for key in saved) == 2 * 2


def test_adaptive_threshold_learns_without_changing_the_forward():
    frozen = moa(sparse=True, init_weights=False, max_threshold=0.9).train()
    adaptive = moa(sparse=True, init_weights=False, max_threshold=0.9, adaptive_threshold_grad=True).train()
    adaptive.load_state_dict(frozen.state_dict())
    loss = adaptive(tokens(), labels=tokens()).loss
    assert torch.equal(loss, frozen(tokens(), labels=tokens()).loss)  # the straight-through term is 0 in value
    loss.backward()
    block = layers(adaptive)[0].input_layernorm
    weight = block.moa_threshold_weight["default"]
    assert weight.requires_grad and weight.grad.abs().sum() > 0
    before = weight.detach().clone()
    torch.optim.SGD([p for p in adaptive.parameters() if p.requires_grad], lr=1.0).step()
    assert not torch.equal(weight, before)


def test_gradient_checkpointing_gives_the_same_gradients():
    """The decoder layer's forward is recomputed in backward; the router, hooks and prompt expert run again."""
    grads = []
    for checkpointing in (False, True):
        model = moa(init_weights=False, swi_x=2, prompt_length=3).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(tokens(), labels=tokens()).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_routing_statistics_are_gate_shares():
    model = moa(sparse=True, max_threshold=0.9, init_weights=False)
    model.base_model.record_routing()
    model(tokens())
    stats = model.base_model.routing_statistics()
    blocks = [name for name in stats if name.endswith("input_layernorm")]
    assert len(blocks) == 2 and len(stats) == 2
    entry = stats[blocks[0]]["default/router"]
    assert entry["tokens"] == 10 and len(entry["mean_prob"]) == 6  # q, k, v, o, down, PA
    assert 0 <= entry["entropy"] <= math.log(6)


# --- checkpoints, precision, switching, unloading ------------------------------------------------------------------


def test_save_and_load_round_trip_restores_the_frozen_threshold(tmp_path):
    model = moa(sparse=True, prompt_length=3, swi_x=4, init_weights=False).eval()
    expected = model(tokens()).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(), tmp_path, is_trainable=True).eval()
    config = reloaded.peft_config["default"]
    assert (
        type(config) is MoAConfig
        and config.sparse
        and config.prompt_length == 3
        and method_name_of(config) == "moa_sparse"
    )
    torch.testing.assert_close(reloaded(tokens()).logits, expected, rtol=0, atol=0)
    thresholds = [p for n, p in reloaded.named_parameters() if "moa_threshold" in n]
    assert thresholds and not any(p.requires_grad for p in thresholds)
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "moa_router" in n)
    # PEFT's state-dict-driven injection creates the blocks too (values equal; rounding may differ with alignment)
    low_memory = PeftModel.from_pretrained(tiny(), tmp_path, low_cpu_mem_usage=True).eval()
    torch.testing.assert_close(low_memory(tokens()).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_bf16_autocast_keeps_fp32_routing_and_weights(sparse):
    model = moa(sparse=sparse, prompt_length=3, init_weights=False).train()
    expected = model(tokens(), labels=tokens())
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = model(tokens(), labels=tokens())
    out.loss.backward()
    routing = layers(model)[0].input_layernorm.context.routing("default")
    assert routing.weights.dtype == torch.float32
    assert torch.isfinite(out.loss) and abs(out.loss.item() - expected.loss.item()) < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_bf16_base_model_with_fp32_adapter():
    model = tiny().to(torch.bfloat16)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, MoAConfig(init_weights=False, prompt_length=3)).train()
    loss = peft_model(tokens(), labels=tokens()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_generation_with_and_without_the_cache_agree():
    """Decoding steps route their own tokens; the prompt expert reads each step's queries and positions."""
    model = moa(init_weights=False, prompt_length=3).eval()
    prompt = tokens(1, 4)
    cached = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_disable_adapter_gives_the_base_output():
    expected = tiny()(tokens()).logits
    model = moa(init_weights=False, prompt_length=3)
    with model.disable_adapter():
        torch.testing.assert_close(model(tokens()).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(model(tokens()).logits, expected)


def test_second_adapter_switches_and_deletes():
    model = moa(init_weights=False, prompt_length=0).eval()
    first = model(tokens()).logits
    torch.manual_seed(5)
    model.add_adapter("other", MoAConfig(init_weights=False, sparse=True, prompt_length=2, target_modules=ALL_TARGETS))
    model.set_adapter("other")
    other = model(tokens()).logits
    assert not torch.allclose(other, first)
    model.set_adapter("default")
    torch.testing.assert_close(model(tokens()).logits, first, rtol=0, atol=0)
    model.delete_adapter("other")
    torch.testing.assert_close(model(tokens()).logits, first, rtol=0, atol=0)
    assert all("other" not in layer.input_layernorm.expert_slots for layer in layers(model))


def test_unload_removes_every_layer_and_hook():
    def hook_counts(model):
        return {
            name: len(m._forward_hooks) + len(m._forward_pre_hooks)
            for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks
        }

    expected = tiny()(tokens()).logits
    hooks_before = hook_counts(tiny())
    model = moa(init_weights=False, target_modules=ALL_TARGETS)
    assert hook_counts(model.base_model.model) != hooks_before
    plain = model.unload()
    assert hook_counts(plain) == hooks_before
    assert not any(isinstance(m, (MoALinear, MoABlock)) for m in plain.modules())
    torch.testing.assert_close(plain(tokens()).logits, expected, rtol=0, atol=0)


def test_merge_is_refused():
    with pytest.raises(ValueError, match="cannot be merged"):
        moa(init_weights=False).merge_and_unload()


def test_a_projection_called_alone_is_refused():
    model = moa()
    with pytest.raises(RuntimeError, match="without its decoder layer's routing"):
        layers(model)[0].self_attn.q_proj(torch.randn(3, 32))


# --- architectures and config checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "layer_class"),
    [
        (lambda: MistralForCausalLM(MistralConfig(**TINY)), "MistralDecoderLayer"),
        (
            lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
            "GPT2Block",
        ),
    ],
)
def test_unsupported_architecture_names_its_decoder_layer(model, layer_class):
    match = rf"{layer_class}.*LlamaDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer"
    with pytest.raises(ValueError, match=match):
        get_peft_model(model(), MoAConfig())


def test_target_outside_the_experts_is_refused():
    with pytest.raises(ValueError, match=r"MoAConfig\.target_modules matches 'lm_head'"):
        get_peft_model(tiny(), MoAConfig(target_modules=["q_proj", "lm_head"]))


def test_methods_presets_and_defaults():
    soft, sparse = METHODS["moa_soft"], METHODS["moa_sparse"]
    assert soft.config_cls is sparse.config_cls is MoAConfig
    assert (soft.preset, sparse.preset) == ({"sparse": False}, {"sparse": True})
    config = MoAConfig()
    assert (config.r, config.lora_alpha, config.scaling, config.lora_dropout) == (8, 8, 1.0, 0.0)
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    assert (config.parallel_adapter_size, config.prompt_length, config.swi_x) == (16, 10, 0)
    assert (config.router_input, config.gate_activation, config.max_threshold) == ("normed", "sigmoid", 0.5)
    assert not (config.const_threshold or config.adaptive_threshold_grad or config.parallel_adapter_zero_init)
    assert MoAConfig(sparse=True).prompt_length == 0 and config.peft_type == "MOA"
    assert method_name_of(config) == "moa_soft" and method_name_of(MoAConfig(sparse=True)) == "moa_sparse"
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(MoAConfig))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sparse": True, "max_threshold": 0.0}, "max_threshold"),
        ({"sparse": True, "max_threshold": 1.0}, "max_threshold"),
        ({"sparse": True, "max_threshold": -0.2}, "max_threshold"),
        ({"max_threshold": True}, "max_threshold"),
        ({"swi_x": -1}, "swi_x"),
        ({"swi_x": 2.5}, "swi_x"),
        ({"parallel_adapter_size": -1}, "parallel_adapter_size"),
        ({"prompt_length": -3}, "prompt_length"),
        ({"router_input": "residual"}, "router_input"),
        ({"gate_activation": "relu"}, "gate_activation"),
        ({"lora_dropout": 0.05}, "lora_dropout"),
        ({"r": 0}, "r"),
        ({"sparse": "yes"}, "sparse"),
        ({"const_threshold": True}, "const_threshold"),
        ({"adaptive_threshold_grad": True}, "adaptive_threshold_grad"),
        ({"sparse": True, "const_threshold": True, "adaptive_threshold_grad": True}, "adaptive_threshold_grad"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MoAConfig\.{field}\b"):
        MoAConfig(**overrides)
