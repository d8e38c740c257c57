"""The training pipeline on a tiny random Llama and the bundled sample: outputs, guards, resume, NaN, seeds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from moelora import METHODS
from moelora.config import load_config
from moelora.data import bundled_train_sources
from moelora.training import RUN_CONFIG_NAME, NonFiniteLossError, train


def make_config(output_dir, **training):
    train_files = [f"{task}={path}" for task, path in bundled_train_sources(include_approx=False).items()]
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        warmup_steps=1,
        global_batch_size=8,
        micro_batch_size=4,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=["tensorboard"],
    )
    settings.update(training)
    overrides = [
        f"training.{key}={value!r}" if isinstance(value, str) else f"training.{key}={value}"
        for key, value in settings.items()
    ]
    return load_config(
        None,
        [
            "method=d2mora",
            "adapter={r: 4, lora_alpha: 8, num_down_experts: 2, num_up_experts: 3}",
            f"data.train_files={train_files}",
            "data.max_records_per_task=8",
            "data.val_size=8",
            "data.cutoff_len=128",
            *overrides,
        ],
    )


def load(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_train_writes_a_loadable_adapter_and_logs(tmp_path, tiny_model_dir):
    result = train(make_config(tmp_path / "run"), *load(tiny_model_dir))
    out = result.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "moelora_run.yaml").is_file()
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["tokens_seen"] > 0 and metrics["train_tokens_per_second"] > 0
    assert metrics["trainable_parameters"] == result.model.get_nb_trainable_parameters()[0]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 4
    assert all(entry["aux_orthogonality"] > 0 for entry in logged)
    assert all(0 <= entry["routing_router_A_entropy"] <= torch.log(torch.tensor(2.0)) + 1e-6 for entry in logged)
    assert any(p.name.startswith("events.out.tfevents") for p in out.rglob("*")), "TensorBoard logs expected"
    assert any("eval_loss" in entry for entry in state["log_history"])
    whole_log = json.loads((out / "train_log.json").read_text())
    assert whole_log[: len(state["log_history"])] == state["log_history"] and "train_runtime" in whole_log[-1]
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    # the saved adapter is the trained one, and reloads to the same outputs
    batch = torch.randint(0, 100, (2, 12))
    result.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert torch.equal(reloaded(input_ids=batch).logits, result.model(input_ids=batch).logits)
    weights = load_file(out / "adapter_model.safetensors")
    assert any(key.endswith("d2mora_B") and value.abs().sum() > 0 for key, value in weights.items())


def test_same_seed_gives_identical_adapters(tmp_path, tiny_model_dir):
    first = train(make_config(tmp_path / "a", max_steps=2), *load(tiny_model_dir))
    second = train(make_config(tmp_path / "b", max_steps=2), *load(tiny_model_dir))
    a = load_file(first.output_dir / "adapter_model.safetensors")
    b = load_file(second.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_train_over_another_run(tmp_path, tiny_model_dir):
    config = make_config(tmp_path / "run", max_steps=1)
    train(config, *load(tiny_model_dir))
    before = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"already holds files.*--overwrite"):
        train(config, *load(tiny_model_dir))
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == before
    train(config, *load(tiny_model_dir), overwrite=True)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, tiny_model_dir):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a moelora run"):
        train(make_config(precious), *load(tiny_model_dir), overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_resume_continues_a_run(tmp_path, tiny_model_dir):
    train(make_config(tmp_path / "run", max_steps=2), *load(tiny_model_dir))
    result = train(make_config(tmp_path / "run", max_steps=4), *load(tiny_model_dir), resume=True)
    assert result.metrics["tokens_seen"] > 0
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_refuses_another_method_or_config(tmp_path, tiny_model_dir):
    train(make_config(tmp_path / "run", max_steps=2), *load(tiny_model_dir))
    other = make_config(tmp_path / "run", max_steps=4)
    other.adapter["r"] = 8
    with pytest.raises(ValueError, match=r"different 'adapter'"):
        train(other, *load(tiny_model_dir), resume=True)
    other = make_config(tmp_path / "run", max_steps=4)
    other.method = "lora"
    with pytest.raises(ValueError, match=r"different 'method'"):
        train(other, *load(tiny_model_dir), resume=True)


class FailAt(TrainerCallback):
    """Raises at the start of the given optimizer step, as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise RuntimeError("injected crash")


def test_a_run_that_failed_before_its_first_checkpoint_reruns_with_the_same_command(tmp_path, tiny_model_dir, capsys):
    config = make_config(tmp_path / "run", max_steps=2, save_steps=2, eval_steps=100, load_best_model_at_end=False)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(config, *load(tiny_model_dir), callbacks=[FailAt(step=1)])
    assert (tmp_path / "run" / RUN_CONFIG_NAME).is_file()
    result = train(
        make_config(tmp_path / "run", max_steps=2, save_steps=2, eval_steps=100, load_best_model_at_end=False),
        *load(tiny_model_dir),
    )
    assert result.metrics["global_step"] == 2 and "starting again" in capsys.readouterr().out
    # --resume of such a run starts it again too
    with pytest.raises(RuntimeError, match="injected crash"):
        train(config, *load(tiny_model_dir), overwrite=True, callbacks=[FailAt(step=1)])
    assert train(config, *load(tiny_model_dir), resume=True).metrics["global_step"] == 2


def test_the_same_command_never_replaces_progress_or_another_config(tmp_path, tiny_model_dir):
    config = make_config(tmp_path / "run", max_steps=4, save_steps=1, eval_steps=100, load_best_model_at_end=False)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(config, *load(tiny_model_dir), callbacks=[FailAt(step=3)])
    with pytest.raises(ValueError, match="--resume to continue it"):  # checkpoints 1 and 2 are progress
        train(config, *load(tiny_model_dir))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    other = make_config(tmp_path / "other", max_steps=2, eval_steps=100, load_best_model_at_end=False)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(other, *load(tiny_model_dir), callbacks=[FailAt(step=1)])
    changed = make_config(tmp_path / "other", max_steps=3, eval_steps=100, load_best_model_at_end=False)
    with pytest.raises(ValueError, match="already holds files"):  # another config's folder is not replaced
        train(changed, *load(tiny_model_dir))


def test_checkpoints_are_removed_after_a_finished_run_when_not_kept(tmp_path, tiny_model_dir):
    config = make_config(tmp_path / "run", max_steps=2, save_steps=1, load_best_model_at_end=False)
    config.training.keep_checkpoints = False
    train(config, *load(tiny_model_dir))
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_resume_without_a_run_is_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="holds no moelora run"):
        train(make_config(tmp_path / "nothing"), *load(tiny_model_dir), resume=True)


class PoisonWeightsBefore(TrainerCallback):
    """Sets one adapter weight to NaN at the start of the given optimizer step: its loss becomes NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "d2mora_B" in n).fill_(float("nan"))


class PoisonGradientsAt(TrainerCallback):
    """Makes the gradients of the given optimizer step NaN: the loss is finite, the update is not."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    config = make_config(tmp_path / "run", max_steps=6, eval_steps=100, load_best_model_at_end=False)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at optimizer step 3.*checkpoint-2"):
        train(config, *load(tiny_model_dir), callbacks=[PoisonWeightsBefore(step=3)])
    weights = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_nan_update_is_caught_before_it_is_saved(tmp_path, tiny_model_dir):
    config = make_config(tmp_path / "run", max_steps=6, save_steps=1, eval_steps=100, load_best_model_at_end=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at optimizer step 2.*checkpoint-1"):
        train(config, *load(tiny_model_dir), callbacks=[PoisonGradientsAt(step=2)])
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    weights = load_file(tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_unknown_adapter_field_names_it(tmp_path, tiny_model_dir):
    config = make_config(tmp_path / "run")
    config.adapter["num_experts_typo"] = 3
    with pytest.raises(ValueError, match="num_experts_typo"):
        train(config, *load(tiny_model_dir))


def test_training_batches_are_padded_on_the_right(tiny_model_dir):
    """Left padding leaves fully masked attention rows, whose SDPA backward under CUDA bf16 gives NaN
    gradients; training pads right even though the tokenizer pads left for generation."""
    from moelora.training import training_collator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    batch = training_collator(tokenizer)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
            {"input_ids": [5], "attention_mask": [1], "labels": [5]},
        ]  # fmt: skip
    )
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [5] + [-100] * 7
    assert tokenizer.padding_side == "left"


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; config fields typed float parse it, other types are checked."""
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\nadapter:\n  orthogonal_loss_weight: 1e-4\n")
    config = load_config(path, ["training.weight_decay=1e-2"])
    assert config.training.learning_rate == 0.001 and config.training.weight_decay == 0.01
    from moelora.training import build_adapter_config

    assert build_adapter_config("d2mora", config.adapter).orthogonal_loss_weight == 1e-4
    with pytest.raises(ValueError, match="training.max_steps: expected int, got 'ten'"):
        load_config(path, ["training.max_steps=ten"])


def test_model_returned_after_mixed_precision_training_computes_in_full_precision(tmp_path, tiny_model_dir):
    result = train(make_config(tmp_path / "run", precision="bf16", max_steps=2), *load(tiny_model_dir))
    model, tokenizer = load(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(model, result.output_dir).eval()
    batch = tokenizer(["the correct answer is true"], return_tensors="pt")
    with torch.no_grad():
        after_training = result.model.eval()(**batch).logits
        expected = reloaded(**batch).logits
    assert after_training.dtype == torch.float32
    torch.testing.assert_close(after_training, expected)


def test_every_run_config_field_explains_itself():
    import dataclasses

    from moelora.config import DataConfig, EvaluationConfig, RunConfig, TrainingConfig

    for section in (RunConfig, DataConfig, TrainingConfig, EvaluationConfig):
        silent = [f.name for f in dataclasses.fields(section) if not f.metadata.get("help")]
        assert not silent, f"{section.__name__} fields without help: {silent}"


@pytest.mark.parametrize("method", sorted(name for name, method in METHODS.items() if not method.moe_only))
def test_every_method_trains_through_the_pipeline(method, tmp_path, tiny_model_dir):
    from test_all_methods import TINY_SETTINGS

    settings = {"r": 4, "lora_alpha": 8, **TINY_SETTINGS[method]}
    config = make_config(tmp_path / "run", max_steps=2, save_steps=2, eval_steps=2)
    config.method, config.adapter = method, settings
    result = train(config, *load(tiny_model_dir))
    metrics = json.loads((result.output_dir / "train_metrics.json").read_text())
    assert metrics["trainable_parameters"] > 0 and math.isfinite(metrics["train_loss"])
    model, _ = load(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(model, result.output_dir)
    assert type(reloaded.peft_config["default"]) is METHODS[method].config_cls


def test_peft_native_methods_use_peft_configs_and_moelora_targets(tiny_model_dir):
    import peft

    from moelora.methods import method_name_of
    from moelora.training import build_adapter_config, build_peft_model

    config = make_config("unused")
    config.method, config.adapter = "peft_dora", {"r": 4, "lora_alpha": 8}
    model = build_peft_model(load(tiny_model_dir)[0], config)
    adapter = model.peft_config["default"]
    assert type(adapter) is peft.LoraConfig and adapter.use_dora
    assert set(adapter.target_modules) == {"q_proj", "k_proj", "v_proj"}
    assert method_name_of(adapter) == "peft_dora"
    assert method_name_of(build_adapter_config("peft_lora", {"r": 4})) == "peft_lora"
    assert method_name_of(build_adapter_config("lora", {"r": 4})) == "lora"
    with pytest.raises(ValueError, match="fixes"):
        build_adapter_config("peft_lora", {"use_dora": True})


def test_shuffled_label_control_trains_on_permuted_answers(tmp_path, tiny_model_dir, monkeypatch):
    import moelora.training

    seen = []

    def capture(records, *args, **kwargs):
        seen.append(list(records))
        return build_datasets(records, *args, **kwargs)

    build_datasets = moelora.training.build_datasets
    monkeypatch.setattr(moelora.training, "build_datasets", capture)
    config = make_config(tmp_path / "plain", max_steps=1)
    train(config, *load(tiny_model_dir))
    config = make_config(tmp_path / "control", max_steps=1)
    config.data.shuffled_label_control = True
    train(config, *load(tiny_model_dir))

    plain, control = seen
    assert [r["instruction"] for r in plain] == [r["instruction"] for r in control]
    assert [r["answer"] for r in plain] != [r["answer"] for r in control]
    assert all(r["output"].endswith(r["answer"]) for r in control)
    saved = load_config(tmp_path / "control" / RUN_CONFIG_NAME)
    assert saved.data.shuffled_label_control is True


@pytest.mark.parametrize("compiled", [False, True])
def test_torch_compile_option_reaches_the_trainer(compiled):
    from moelora.training import training_arguments

    config = load_config(None, ["training.output_dir=unused", f"training.torch_compile={str(compiled).lower()}"])
    assert training_arguments(config, has_validation=False).torch_compile is compiled


@pytest.mark.parametrize("method", ["d2mora", "peft_lora"])
def test_response_logits_give_the_full_loss_and_gradients(tiny_model_dir, method):
    """`logits_to_keep` + `shift_labels` (the LM head at trained positions only) against the full logits: the same
    loss, auxiliary terms included, and the same gradients, on right-padded rows whose responses sit at
    different positions."""
    from moelora.config import config_from_dict
    from moelora.data import build_datasets, load_mixture
    from moelora.training import build_peft_model, training_collator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = load_mixture([f"{t}={p}" for t, p in bundled_train_sources(include_approx=False).items()])[:6]
    features = list(build_datasets(records, tokenizer, cutoff_len=512, train_on_inputs=False, val_size=0)[0])
    if method == "d2mora":
        adapter = {"r": 4, "init_weights": False, "num_down_experts": 2, "num_up_experts": 3}
    else:
        adapter = {"r": 4, "init_lora_weights": False}
    runs = []
    for compact in (False, True):
        config = config_from_dict({"method": method, "adapter": adapter})
        model = build_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).train()
        batch = training_collator(tokenizer, response_logits_only=compact)(features)
        torch.manual_seed(0)  # the same dropout masks in both runs
        loss = model(**batch).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.detach(), grads, batch))
    (full, full_grads, full_batch), (compact, compact_grads, compact_batch) = runs
    assert "logits_to_keep" in compact_batch and "logits_to_keep" not in full_batch
    assert 0 < len(compact_batch["logits_to_keep"]) < full_batch["input_ids"].shape[1] - 1
    torch.testing.assert_close(compact, full, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_run_prints_no_deprecation_warnings(tiny_model_dir, tmp_path):
    """transformers 5.25 deprecates `gradient_checkpointing` (passed even when off) and the
    `is_gradient_checkpointing` that PEFT reads: a run must not print either (in a fresh interpreter, where no
    test harness changes the warning filters)."""
    import subprocess
    import sys

    script = f"""
from moelora.config import config_from_dict
from moelora.training import build_peft_model, training_arguments
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = build_peft_model(AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}),
                         config_from_dict({{"method": "d2mora", "adapter": {{"r": 2}}}}))
model.save_pretrained({str(tmp_path)!r})
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}), {str(tmp_path)!r})
for checkpointing in (False, True):
    training_arguments(config_from_dict({{"training": {{"output_dir": {str(tmp_path)!r},
                                                       "gradient_checkpointing": checkpointing}}}}), False)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "deprecated" not in done.stderr, done.stderr


def test_the_adapter_says_what_made_it_and_loads_with_one_call(tmp_path, tiny_model_dir):
    import moelora

    result = train(make_config(tmp_path / "run", max_steps=1, load_best_model_at_end=False), *load(tiny_model_dir))
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"moelora {moelora.__version__}" in card and "Method `d2mora` (D2MORA)" in card
    assert "moelora.load_adapter" in card and "pip install moelora" in card
    model, tokenizer = moelora.load_adapter(tmp_path / "run", str(tiny_model_dir))
    ids = tokenizer("the correct answer is", return_tensors="pt")["input_ids"]
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, trained(input_ids=ids).logits)


@pytest.mark.parametrize("trainer", ["plain", "trl"])
@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_a_trainer_counts_the_auxiliary_loss_once_per_optimizer_step(tmp_path, tiny_model_dir, accumulation, trainer):
    """One SGD step (lr 1) of a plain HF Trainer or TRL's SFTTrainer, D2MoRA with a large orthogonality weight
    against the same run without it: the difference of the updated weights is the orthogonality gradient times how
    often the term counted in that step. It must be once, whatever the accumulation. The plain Trainer passes
    num_items_in_batch to a PeftModel and does not divide by the accumulation steps; TRL builds its loss from the
    fused head's log-probabilities and never reads `outputs.loss`."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from moelora import D2MoRAConfig
    from moelora.training import training_collator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": list(range(5 + i, 17 + i)), "attention_mask": [1] * 12, "labels": list(range(5 + i, 17 + i))}
            for i in range(8)]  # fmt: skip
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no",
        use_cpu=True, train_sampling_strategy="sequential",
    )  # fmt: skip

    def one_step(weight: float):
        torch.manual_seed(0)
        config = D2MoRAConfig(r=4, lora_dropout=0.0, init_weights=False, orthogonal_loss_weight=weight)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if trainer == "plain":
            collator = training_collator(tokenizer)
            Trainer(model=model, args=TrainingArguments(**settings), train_dataset=rows, data_collator=collator).train()
        else:
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])
            SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data, processing_class=tokenizer).train()
        return model, before, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    model, before, with_loss = one_step(10.0)
    _, _, without_loss = one_step(0.0)
    reference, _, _ = one_step(10.0)  # the same init, for the orthogonality gradient at the start
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            parameter.data.copy_(before[name])
            parameter.grad = None
    reference.base_model.auxiliary_losses()["orthogonality"].backward()
    names = [n for n, p in reference.named_parameters() if p.requires_grad and p.grad is not None]
    assert names
    for name in names:
        gradient = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(without_loss[name] - with_loss[name], gradient, rtol=1e-4, atol=1e-6)
