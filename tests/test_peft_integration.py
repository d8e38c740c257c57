"""moelora tuners inside PEFT: registration, save/load, strict checkpoints, targets, bad configs, merging."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from reference import recording_keep_masks
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moelora import CheckpointMismatchError, D2MoRAConfig, LoraConfig
from moelora.methods.d2mora import D2MoRALinear
from moelora.methods.lora import LoraLinear


def d2mora(**overrides) -> D2MoRAConfig:
    settings = dict(r=4, lora_alpha=8, num_down_experts=2, num_up_experts=3, init_weights=False, task_type="CAUSAL_LM")
    settings.update(overrides)
    return D2MoRAConfig(**settings)


@pytest.fixture
def saved_adapter(tmp_path, model_factory, token_batch):
    model = get_peft_model(model_factory(), d2mora()).eval()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model(input_ids=token_batch).logits


def test_save_writes_peft_files(saved_adapter):
    folder, _ = saved_adapter
    assert (folder / "adapter_model.safetensors").is_file()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "D2MORA"
    assert config["num_down_experts"] == 2 and config["num_up_experts"] == 3
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.d2mora_A" in keys
    assert len(keys) == 2 * 3 * 4
    assert isinstance(PeftConfig.from_pretrained(folder), D2MoRAConfig)


def test_round_trip_reproduces_outputs_bit_for_bit(saved_adapter, model_factory, token_batch):
    folder, expected = saved_adapter
    loaded = PeftModel.from_pretrained(model_factory(), folder).eval()
    assert isinstance(loaded.peft_config["default"], D2MoRAConfig)
    assert torch.equal(loaded(input_ids=token_batch).logits, expected)


def test_auto_peft_model_loads_from_a_local_base(tmp_path, model_factory, token_batch):
    base_dir = tmp_path / "base"
    model_factory().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), d2mora()).eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(loaded(input_ids=token_batch).logits, model(input_ids=token_batch).logits)


def test_is_trainable_reload_resumes_training(saved_adapter, model_factory):
    folder, _ = saved_adapter
    loaded = PeftModel.from_pretrained(model_factory(), folder, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("d2mora_" in n for n in trainable)


def _edit_checkpoint(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_key_is_an_error_naming_it(saved_adapter, model_factory):
    folder, _ = saved_adapter
    key = "base_model.model.model.layers.1.self_attn.v_proj.d2mora_B"
    _edit_checkpoint(folder, lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*layers\.1\.self_attn\.v_proj\.d2mora_B"):
        PeftModel.from_pretrained(model_factory(), folder)


def test_extra_key_is_an_error_naming_it(saved_adapter, model_factory):
    folder, _ = saved_adapter
    _edit_checkpoint(
        folder, lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.d2mora_A": torch.ones(1)})
    )
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key.*mlp\.up_proj\.d2mora_A"):
        PeftModel.from_pretrained(model_factory(), folder)


def test_shape_mismatch_is_an_error_naming_the_key(saved_adapter, model_factory):
    folder, _ = saved_adapter
    key = "base_model.model.model.layers.0.self_attn.k_proj.d2mora_A"
    _edit_checkpoint(folder, lambda t: t.update({key: torch.zeros(5, 4, 32)}))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch for .*k_proj\.d2mora_A"):
        PeftModel.from_pretrained(model_factory(), folder)


def test_config_of_another_shape_is_rejected(saved_adapter, model_factory):
    folder, _ = saved_adapter
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["num_up_experts"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        PeftModel.from_pretrained(model_factory(), folder)


def test_corrupt_weights_file_raises(saved_adapter, model_factory):
    folder, _ = saved_adapter
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match=r"(?i)safetensors|header|deserializ"):
        PeftModel.from_pretrained(model_factory(), folder)


# --- PEFT conveniences ----------------------------------------------------------------------------------------


def test_disable_adapter_gives_the_base_model(model_factory, token_batch):
    base = model_factory()(input_ids=token_batch).logits
    model = get_peft_model(model_factory(), d2mora()).eval()
    assert not torch.equal(model(input_ids=token_batch).logits, base)
    with model.disable_adapter():
        assert torch.equal(model(input_ids=token_batch).logits, base)
    assert not torch.equal(model(input_ids=token_batch).logits, base)


def test_print_trainable_parameters(model_factory, capsys):
    model = get_peft_model(model_factory(), d2mora())
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    # q: 32->32, k, v: 32->16 (2 kv heads of 8); per module M*r*d_in + N*d_out*r + d_in*M + r*N
    per_layer = sum(2 * 4 * 32 + 3 * d_out * 4 + 32 * 2 + 4 * 3 for d_out in (32, 16, 16))
    assert trainable == 2 * per_layer


def test_default_targets_are_q_k_v(model_factory):
    model = get_peft_model(model_factory(), D2MoRAConfig(r=4, lora_alpha=8))
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, D2MoRALinear)})
    assert adapted == ["k_proj", "q_proj", "v_proj"]


def test_regex_targets(model_factory):
    model = get_peft_model(
        model_factory(), D2MoRAConfig(r=4, lora_alpha=8, target_modules=r".*\.1\.mlp\.(up|down)_proj")
    )
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, D2MoRALinear))
    assert adapted == ["base_model.model.model.layers.1.mlp.down_proj", "base_model.model.model.layers.1.mlp.up_proj"]


def test_lora_merges_exactly(model_factory, token_batch):
    model = get_peft_model(model_factory(), LoraConfig(r=4, lora_alpha=8, init_weights=False)).eval()
    unmerged = model(input_ids=token_batch).logits
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=token_batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_in_training_is_peft_lora_on_the_mask_it_drew(monkeypatch):
    """moelora's LoRA with dropout: PEFT LoRA's formula on x times the mask core/dropout.py drew (no dropped copy
    of x is kept), in the output and in the gradients of x, A and B."""
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(12, 7), "default", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3))
    torch.nn.init.normal_(layer.lora_B["default"])
    masks = recording_keep_masks(monkeypatch)
    x = torch.randn(9, 12, requires_grad=True)
    got = layer.train()(x)
    keep = masks[0][0]
    A, B = (layer.lora_A["default"].detach().clone().requires_grad_(), layer.lora_B["default"].detach().clone())
    B.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = layer.base_layer(x_ref) + (x_ref * keep / 0.7) @ A.T @ B.T * 2.0
    upstream = torch.randn_like(got)
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad)


def test_two_adapters_switch(model_factory, token_batch):
    model = get_peft_model(model_factory(), d2mora()).eval()
    first = model(input_ids=token_batch).logits
    torch.manual_seed(9)
    model.add_adapter("second", d2mora())
    model.set_adapter("second")
    second = model(input_ids=token_batch).logits
    assert not torch.equal(first, second)
    model.set_adapter("default")
    assert torch.equal(model(input_ids=token_batch).logits, first)


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_down_experts": 0}, "num_down_experts"),
        ({"num_up_experts": 0}, "num_up_experts"),
        ({"r": 0}, r"\.r "),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"orthogonal_loss_weight": -1.0}, "orthogonal_loss_weight"),
        ({"lora_alpha": 0}, "lora_alpha"),
    ],
)
def test_invalid_config_fields_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        d2mora(**overrides)


def test_rank_above_module_dimensions_is_rejected(model_factory):
    with pytest.raises(ValueError, match=r"D2MoRAConfig\.r=17 exceeds min\(d_in=32, d_out=16\).*k_proj"):
        get_peft_model(model_factory(), d2mora(r=17))


def test_unknown_target_lists_the_linear_layers(model_factory):
    with pytest.raises(ValueError, match=r"matches no module.*down_proj.*q_proj"):
        get_peft_model(model_factory(), d2mora(target_modules=["query"]))


def test_non_linear_target_is_rejected(model_factory):
    with pytest.raises(ValueError, match=r"input_layernorm.*LlamaRMSNorm.*only nn.Linear"):
        get_peft_model(model_factory(), d2mora(target_modules=["input_layernorm"]))


def test_failed_injection_leaves_the_model_untouched(model_factory):
    model = model_factory()
    with pytest.raises(ValueError):
        get_peft_model(model, d2mora(target_modules=["q_proj", "input_layernorm"]))
    assert not any(isinstance(m, D2MoRALinear) for m in model.modules())
