"""`moelora import-d2mora`: a fake official D2MoRA checkpoint (the official key names and config fields, written
with torch.save) of a tiny random Llama imports into a moelora adapter whose outputs equal the official forward
computed here from the raw tensors; corrupt or mismatched checkpoints are refused with errors naming the cause."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import generator, tiny_llama
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from moelora import CheckpointMismatchError
from moelora.cli import main
from moelora.official import OfficialCheckpointError, import_d2mora

M, N, R, ALPHA = 3, 4, 4, 8
TARGETS = ("q_proj", "k_proj", "v_proj")


def official_state_dict(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random non-zero adapter tensors in the official layout: per-expert nn.Linear weights under PeftModel's
    `base_model.model.` prefix (B non-zero, so the update is visible)."""
    stream = generator(seed)
    state = {}
    for name, module in model.named_modules():
        if not name.endswith(TARGETS):
            continue
        d_in, d_out, prefix = module.in_features, module.out_features, f"base_model.model.{name}."
        for i in range(M):
            state[f"{prefix}lora_A.{i}.weight"] = torch.randn(R, d_in, generator=stream) / d_in**0.5
        for j in range(N):
            state[f"{prefix}lora_B.{j}.weight"] = torch.randn(d_out, R, generator=stream) * 0.5
        state[f"{prefix}lora_route1.weight"] = torch.randn(M, d_in, generator=stream)
        state[f"{prefix}lora_route2.weight"] = torch.randn(N, R, generator=stream)
    return state


def official_config(**changes) -> dict:
    """Every field the official D2MoRAConfig writes (asdict, sorted), as in the released checkpoints."""
    config = {
        "base_model_name_or_path": "yahma/llama-7b-hf",
        "bias": "none",
        "enable_lora": None,
        "expert_down": M,
        "expert_up": N,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": None,
        "peft_type": "D2MoRA",
        "r": R,
        "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM",
    }
    config.update(changes)
    return config


def write_official(folder, state, config=None, name="adapter_model.bin"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or official_config(), indent=2, sort_keys=True))
    if name.endswith(".safetensors"):
        save_file(state, folder / name)
    else:
        torch.save(state, folder / name)
    return folder


def official_delta(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The official D2MoRALinear update in eval mode, one expert at a time as its forward loops (d2mora.md §2),
    in float64 from the raw per-expert tensors."""
    weight = {name: state[f"{prefix}{name}.weight"].double() for name in ("lora_route1", "lora_route2")}
    x = x.double()
    p = torch.softmax(x @ weight["lora_route1"].T, dim=-1)
    mid = torch.zeros(*x.shape[:-1], R, dtype=torch.float64)
    for i in range(M):
        mid = mid + (x @ state[f"{prefix}lora_A.{i}.weight"].double().T) * p[..., i : i + 1]
    q = torch.softmax(mid @ weight["lora_route2"].T, dim=-1)
    delta = torch.zeros(*x.shape[:-1], state[f"{prefix}lora_B.0.weight"].shape[0], dtype=torch.float64)
    for j in range(N):
        delta = delta + mid @ state[f"{prefix}lora_B.{j}.weight"].double().T * q[..., j : j + 1] * (ALPHA / R)
    return delta


def official_logits(state, tokens) -> torch.Tensor:
    """Logits of the base model with the official update added to every adapted module by forward hooks."""
    model = tiny_llama()
    for name, module in model.named_modules():
        if name.endswith(TARGETS):
            prefix = f"base_model.model.{name}."
            module.register_forward_hook(
                lambda _, args, out, prefix=prefix: out + official_delta(args[0], state, prefix).to(out.dtype)
            )
    with torch.no_grad():
        return model(tokens).logits


def folder_snapshot(folder) -> dict:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir()}


@pytest.mark.parametrize(
    ("weights_name", "dtype"), [("adapter_model.bin", torch.float32), ("model.safetensors", torch.float16)]
)
def test_imported_adapter_reproduces_the_official_forward(tmp_path, token_batch, weights_name, dtype):
    state = {key: value.to(dtype) for key, value in official_state_dict(tiny_llama()).items()}
    source = write_official(tmp_path / "official", state, name=weights_name)
    before = folder_snapshot(source)

    imported = import_d2mora(source, tmp_path / "moelora")

    assert folder_snapshot(source) == before, "the source folder is only read"
    assert (imported.modules, imported.num_down_experts, imported.num_up_experts, imported.r) == (6, M, N, R)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "moelora").eval()
    assert model.peft_config["default"].base_model_name_or_path == "yahma/llama-7b-hf"
    with torch.no_grad():
        got = model(token_batch).logits
    expected = official_logits(state, token_batch)
    assert not torch.allclose(expected, tiny_llama()(token_batch).logits, atol=1e-3), "the update must be visible"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_config_fields_map_as_documented(tmp_path):
    source = write_official(
        tmp_path / "official", official_state_dict(tiny_llama()), official_config(peft_type="D2MORA")
    )
    import_d2mora(source, tmp_path / "out", base_model="/models/llama-7b")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "D2MORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (R, ALPHA, 0.05)
    assert (config["num_down_experts"], config["num_up_experts"]) == (M, N)
    assert config["target_modules"] == ".*(?:q_proj|k_proj|v_proj)"
    assert config["orthogonal_loss_weight"] == 1e-4 and config["shared_dropout_mask"] is False
    assert config["base_model_name_or_path"] == "/models/llama-7b"
    provenance = json.loads((tmp_path / "out" / "import_d2mora.json").read_text())
    assert provenance["weights_file"] == "adapter_model.bin" and provenance["official_tensors"] == 6 * (M + N + 2)


def _drop(state, key):
    del state[key]


Q0 = "base_model.model.model.layers.0.self_attn.q_proj."
V1 = "base_model.model.model.layers.1.self_attn.v_proj."


@pytest.mark.parametrize(
    ("corrupt", "config_changes", "message"),
    [
        (lambda s: _drop(s, f"{V1}lora_B.2.weight"), {}, f"missing key(s) ['{V1}lora_B.2.weight']"),
        (lambda s: s.update({f"{Q0}lora_C.weight": torch.zeros(2)}), {}, f"unused key '{Q0}lora_C.weight'"),
        (lambda s: s.update({"base_model.model.lm_head.weight": torch.zeros(2)}), {}, "unused key"),
        (lambda s: s.update({f"{Q0}lora_A.3.weight": torch.zeros(R, 32)}), {}, f"'{Q0}lora_A.3.weight'"),
        (lambda s: s.update({f"{Q0}lora_route2.weight": torch.zeros(N, R + 1)}), {}, "lora_route2.weight has shape"),
        (lambda s: s.update({f"{Q0}lora_A.1.weight": torch.full((R, 32), float("nan"))}), {}, "non-finite"),
        (None, {"expert_up": N + 1}, "lora_B.4.weight"),
        (None, {"r": R * 2}, "has shape (4, 32), expected (8, 32)"),
        (None, {"peft_type": "LORA"}, "peft_type 'LORA' is not an official D2MoRA checkpoint"),
        (None, {"topk_expert": 2}, "unknown field(s) ['topk_expert']"),
        (None, {"fan_in_fan_out": True}, "fan_in_fan_out=True"),
        (None, {"enable_lora": [True, False, True]}, "enable_lora"),
        (None, {"lora_alpha": None}, "lora_alpha must be a number"),
        (None, {"target_modules": ["q_proj", "k_proj"]}, "does not"),
    ],
)
def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path, corrupt, config_changes, message):
    state = official_state_dict(tiny_llama())
    if corrupt is not None:
        corrupt(state)
    source = write_official(tmp_path / "official", state, official_config(**config_changes))
    with pytest.raises(OfficialCheckpointError) as error:
        import_d2mora(source, tmp_path / "out")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["official"]


def test_a_pickle_holding_more_than_tensors_is_refused_unopened(tmp_path):
    state = {**official_state_dict(tiny_llama()), "trainer": nn.Linear(2, 2)}  # pickles a class reference
    source = write_official(tmp_path / "official", state)
    with pytest.raises(OfficialCheckpointError, match=r"weights_only=True.*torch\.nn"):
        import_d2mora(source, tmp_path / "out")


def test_a_module_missing_from_the_checkpoint_fails_at_load_time(tmp_path):
    """The import cannot know which modules the base model has; moelora's strict loader can."""
    state = {k: v for k, v in official_state_dict(tiny_llama()).items() if ".layers.1." not in k}
    import_d2mora(write_official(tmp_path / "official", state), tmp_path / "out")
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\).*layers\.1\.self_attn"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")


def test_command_line_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    source = write_official(tmp_path / "official", official_state_dict(tiny_llama()))
    out = tmp_path / "out"
    assert main(["import-d2mora", str(source), "--out", str(out)]) == 0
    assert "6 modules" in capsys.readouterr().out
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main(["import-d2mora", str(source), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-d2mora", str(source), "--out", str(out), "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == first
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main(["import-d2mora", str(source), "--out", str(tmp_path / "notes"), "--overwrite"]) == 1
    assert "refusing to replace" in capsys.readouterr().err and (tmp_path / "notes" / "keep.txt").exists()
    assert main(["import-d2mora", str(source), "--out", str(source / "inside")]) == 1
    assert "never written" in capsys.readouterr().err


def test_several_weights_files_need_a_choice(tmp_path):
    state = official_state_dict(tiny_llama())
    source = write_official(tmp_path / "official", state)
    save_file(state, source / "model.safetensors")
    torch.save({}, source / "optimizer.pt")  # Trainer state beside the weights is never a candidate
    with pytest.raises(OfficialCheckpointError, match="several weights files"):
        import_d2mora(source, tmp_path / "out")
    assert import_d2mora(source, tmp_path / "out", weights=source / "model.safetensors").modules == 6


def test_commands_that_expect_a_moelora_adapter_point_an_official_folder_to_the_import(tmp_path, capsys):
    source = write_official(
        tmp_path / "official", official_state_dict(tiny_llama()), official_config(peft_type="D2MORA")
    )
    for command in (["eval", "--adapter", str(source), "--model", "unused"], ["report", str(source)]):
        assert main(command) == 1
        assert f"convert it first: moelora import-d2mora {source}" in capsys.readouterr().err
