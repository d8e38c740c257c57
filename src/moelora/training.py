"""Fine-tuning on the HF Trainer: the official D2MoRA recipe by default, any moelora method or PEFT config.

Runs unchanged under `accelerate launch` / `torchrun` (DDP, FSDP, DeepSpeed come from the Trainer). What
this module adds to a plain Trainer run:

- seeding before the adapter is built (the official code leaves the adapter init unseeded);
- an output-directory guard: never train over another run unless asked, resume only a matching run;
- auxiliary losses and router statistics in the logs (TensorBoard by default);
- a non-finite-loss guard that stops before a bad step reaches the weights and names the last good checkpoint.
- checkpoints that appear only when complete and metrics over every resumed segment (`moelora.checkpoints`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import PeftModel, get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .checkpoints import STAGING_PREFIX, MoeLoraTrainer, last_complete_checkpoint, skipped_checkpoints
from .config import RunConfig, coerce_float_strings, config_from_dict, load_config, resolve_train_files
from .core.tuner import MoeLoraTuner, resolve_default_targets
from .data import build_datasets, load_mixture, parse_sources, shuffle_answers, to_text_targets
from .methods import get_method

RUN_CONFIG_NAME = "moelora_run.yaml"
#: Fields that must match for `--resume` to continue a run rather than silently start a different one.
_RESUME_MUST_MATCH = ("model", "method", "adapter", "data")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingFinished(Exception):
    """`--resume` of a run whose training finished: there is nothing to continue. Not an error: the command line
    says so and exits 0."""


def build_adapter_config(method_name: str, fields: dict[str, Any]):
    method = get_method(method_name)
    fixed = sorted(set(fields) & set(method.preset))
    if fixed:
        raise ValueError(f"adapter: method {method_name!r} fixes {fixed} ({method.preset}); leave them out")
    try:
        return method.config_cls(
            task_type="CAUSAL_LM", **method.preset, **coerce_float_strings(method.config_cls, fields)
        )
    except TypeError as error:
        raise ValueError(f"adapter: {error} (method {method_name!r}, config {method.config_cls.__name__})") from None


def build_peft_model(model: PreTrainedModel, config: RunConfig) -> PeftModel:
    """Seed, then inject the adapter, so its initialisation is reproducible.

    PEFT-native methods without `target_modules` get moelora's defaults (q, k, v on Llama-style models), not
    PEFT's (q, v), so every method in a comparison adapts the same modules.
    """
    set_seed(config.training.seed)
    adapter_config = build_adapter_config(config.method, config.adapter)
    if get_method(config.method).native_to_peft and adapter_config.target_modules is None:
        adapter_config.target_modules = set(resolve_default_targets(model))
    return get_peft_model(model, adapter_config)


def check_output_dir(config: RunConfig, *, resume: bool, overwrite: bool) -> tuple[str | None, bool]:
    """Read-only checks of the output directory: (checkpoint to resume from, whether a run will be replaced).

    A run of the same config that stopped before its first complete checkpoint (a crash, a bad input found late, a
    kill) holds nothing worth keeping: the same command, or `--resume`, starts it again. A run with checkpoints is
    continued only by `--resume`, from its newest complete checkpoint; a finished run (`train_metrics.json`) is
    replaced only by `--overwrite`, and `--resume` of it raises `TrainingFinished` unless the config now asks
    for more steps or epochs than it trained.
    """
    output_dir = Path(config.training.output_dir)
    saved = output_dir / RUN_CONFIG_NAME
    finished = (output_dir / "train_metrics.json").is_file()
    if resume:
        if not saved.is_file():
            raise ValueError(f"--resume: {output_dir} holds no moelora run ({RUN_CONFIG_NAME} missing)")
        previous = load_config(saved).to_dict()
        current = config.to_dict()
        for key in _RESUME_MUST_MATCH:
            if previous[key] != current[key]:
                raise ValueError(
                    f"--resume: {output_dir} was trained with a different '{key}' "
                    f"({previous[key]!r}, now {current[key]!r}); resume with the same config or pick a new output_dir"
                )
        if finished:
            done, t = json.loads((output_dir / "train_metrics.json").read_text()), config.training
            if done["global_step"] >= t.max_steps if t.max_steps > 0 else done.get("epoch", math.inf) >= t.num_epochs:
                raise TrainingFinished(
                    f"{output_dir}: training finished already ({done['global_step']} steps); nothing to resume "
                    "(--overwrite trains it again)"
                )
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            if finished:  # and the config asks for more steps
                raise ValueError(f"--resume: {output_dir} holds a finished run and no checkpoint to continue from")
            return None, True  # stopped before its first complete checkpoint: start it again
        return checkpoint, False
    if output_dir.exists() and any(output_dir.iterdir()):
        if _failed_before_first_checkpoint(config, output_dir, finished):
            return None, True
        if not overwrite:
            hint = "--resume to continue it, " if last_complete_checkpoint(output_dir) and not finished else ""
            raise ValueError(
                f"{output_dir} already holds files ({'a finished run' if finished else 'another run?'}); pass "
                f"--overwrite to replace it, {hint}or choose another training.output_dir"
            )
        if not saved.is_file():
            raise ValueError(f"--overwrite: refusing to delete {output_dir}, which is not a moelora run folder")
        return None, True
    return None, False


def _failed_before_first_checkpoint(config: RunConfig, output_dir: Path, finished: bool) -> bool:
    saved = output_dir / RUN_CONFIG_NAME
    if finished or not saved.is_file() or last_complete_checkpoint(output_dir) is not None:
        return False
    if (output_dir / "adapter_model.safetensors").exists():
        return False  # an adapter without metrics: someone's result, not a failed start
    try:
        return load_config(saved).to_dict() == config.to_dict()
    except ValueError:
        return False


def prepare_output_dir(config: RunConfig, *, resume: bool, overwrite: bool) -> str | None:
    """Check the output directory, then (main process only) claim it; returns the checkpoint to resume from.

    Every process runs the read-only checks before any process writes, so under DDP all ranks reach the same
    verdict and none waits at a barrier for a rank that failed.
    """
    checkpoint, replace_existing = check_output_dir(config, resume=resume, overwrite=overwrite)
    output_dir = Path(config.training.output_dir)
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process and checkpoint is not None:
        print(f"{output_dir}: resuming from {Path(checkpoint).name}{skipped_checkpoints(output_dir, checkpoint)}")
    if state.is_main_process and (replace_existing or not resume):
        if replace_existing:
            if not overwrite:
                print(
                    f"{output_dir}: the run of this config there stopped before its first checkpoint"
                    f"{skipped_checkpoints(output_dir, None)}; starting again"
                )
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / RUN_CONFIG_NAME)
    state.wait_for_everyone()
    return checkpoint


def _tuner(model: PeftModel) -> MoeLoraTuner | None:
    tuner = model.base_model
    return tuner if isinstance(tuner, MoeLoraTuner) else None


class MoeLoraCallback(TrainerCallback):
    """Adds auxiliary losses and router statistics to the logs, counts tokens, and guards the loss.

    Router statistics are recorded only during the step before each log, so the cost is paid once per
    `logging_steps`. Token counts and the finiteness of the losses stay on the device until the end of the
    optimizer step, where one synchronisation checks the step's losses and the updated weights together: a
    check per forward or per weight would stall a GPU that is fed by a launch-bound loop.
    """

    def __init__(self, model: PeftModel) -> None:
        self.tuner = _tuner(model)
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.step = 0
        self._tokens: torch.Tensor | int = 0
        self._losses: list[torch.Tensor] = []
        self._loss_sum: torch.Tensor | float = 0.0  # of the per-step mean losses, as the Trainer's `train_loss`
        model.get_base_model().register_forward_hook(self._record_forward, with_kwargs=True)

    @property
    def tokens_seen(self) -> int:
        return int(self._tokens)

    @property
    def loss_sum(self) -> float:
        return float(self._loss_sum)

    def _record_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, outputs: Any) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None:
            self._tokens = self._tokens + mask.sum()
        loss = getattr(outputs, "loss", None)
        if loss is not None:
            self._losses.append(loss.detach().float().reshape(-1))

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.tuner is not None and args.logging_steps > 0:
            self.tuner.record_routing((state.global_step + 1) % args.logging_steps == 0)

    def on_step_end(self, args, state, control, **kwargs):
        """Runs before the Trainer may save this step, so non-finite weights never reach a checkpoint."""
        losses = torch.cat(self._losses) if self._losses else None
        self._losses = []
        if losses is not None:
            self._loss_sum = self._loss_sum + losses.mean()
        weights = [param.detach() for _, param in self.trainable]
        parts = [
            part
            for part in (losses, torch.stack(torch._foreach_norm(weights)) if weights else None)
            if part is not None
        ]
        if not parts or bool(torch.isfinite(torch.cat([part.to(parts[-1].device) for part in parts])).all()):
            return
        if losses is not None and not bool(torch.isfinite(losses).all()):
            bad = losses[~torch.isfinite(losses)][0]
            raise NonFiniteLossError(f"training loss became {float(bad)} at optimizer step {state.global_step}")
        for name, param in self.trainable:
            if not torch.isfinite(param.detach()).all():
                raise NonFiniteLossError(
                    f"adapter weight {name} became non-finite at optimizer step {state.global_step}"
                )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tuner is None or logs is None or "loss" not in logs:
            return
        added = {f"aux_{term}": float(value) for term, value in self.tuner.last_auxiliary_losses.items()}
        by_router: dict[str, list[float]] = {}
        for per_module in self.tuner.routing_statistics().values():
            for key, stats in per_module.items():
                by_router.setdefault(key.rsplit("/", 1)[-1], []).append(stats["entropy"])
        for router, entropies in by_router.items():
            added[f"routing_{router}_entropy"] = sum(entropies) / len(entropies)
        logs.update(added)
        if state.log_history:  # the Trainer stored a copy of the logs before calling the callbacks
            state.log_history[-1].update(added)
        self.tuner.reset_routing_statistics()
        self.tuner.record_routing(False)


def plot_training_curves(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per logged quantity over the optimizer steps: the training loss, each auxiliary loss, each
    router's mean entropy (what `MoeLoraCallback` adds to the logs), the validation loss when there is one."""
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            wanted = key in ("loss", "eval_loss") or key.startswith(("aux_", "routing_"))
            if step is not None and wanted and isinstance(value, (int, float)):
                series.setdefault(key, []).append((step, float(value)))
    if not series:
        return None
    figure = Figure(figsize=(4.2 * len(series), 3.0), layout="constrained")
    for ax, (key, points) in zip(figure.subplots(1, len(series), squeeze=False)[0], series.items(), strict=True):
        ax.plot([step for step, _ in points], [value for _, value in points], marker="." if len(points) < 30 else "")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
    figure.savefig(path, dpi=100)
    return path


def write_model_card(output_dir: Path, config: RunConfig, model: PeftModel) -> None:
    """The adapter's README.md: what made it (moelora, its version, the method and its settings, the data) and how
    to load it, in place of PEFT's template card, whose base model would be whatever path the model came from."""
    import moelora

    from .methods import get_method

    method = get_method(config.method)
    adapter = model.peft_config[model.active_adapter]
    base = adapter.base_model_name_or_path or config.model
    settings = ", ".join(f"{key}={value}" for key, value in sorted(config.adapter.items()))
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        f"tags: [moelora, {config.method}, peft]",
        "---",
        "",
        f"# {config.method} adapter for {base}",
        "",
        f"Trained with moelora {moelora.__version__}: {method.summary}.",
        f"Method `{config.method}` ({adapter.peft_type}), settings: {settings or 'defaults'}; "
        f"{model.get_nb_trainable_parameters()[0]:,} trainable parameters.",
        f"Data: {', '.join(config.data.train_files)} (targets: {config.data.target}, cutoff {config.data.cutoff_len}).",
        f"Training: seed {config.training.seed}, lr {config.training.learning_rate}, "
        f"{config.training.global_batch_size} sequences per step, precision {config.training.precision}.",
        "",
        "## Load",
        "",
        "```python",
        "import moelora  # registers the moelora methods with PEFT",
        "",
        f'model, tokenizer = moelora.load_adapter("{output_dir.name}")  # the base model recorded above',
        "```",
        "",
        f"or `moelora eval --adapter {output_dir.name}`. "
        + (
            "PEFT loads it without moelora too (`PeftModel.from_pretrained`), on the same base model."
            if method.native_to_peft
            else f"Without moelora installed, PEFT does not know the `{adapter.peft_type}` adapter type and cannot "
            "load this folder: `pip install moelora`."
        ),
        "",
        "The run's full settings are in `moelora_run.yaml` beside this card.",
    ]
    (output_dir / "README.md").write_text("\n".join(lines) + "\n")


@dataclass
class TrainResult:
    model: PeftModel
    output_dir: Path
    metrics: dict[str, float]


def training_arguments(config: RunConfig, has_validation: bool) -> TrainingArguments:
    t = config.training
    world = PartialState().num_processes
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size={t.micro_batch_size} x {world} process(es)"
        )
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // (t.micro_batch_size * world),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="steps" if has_validation else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end and has_validation,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=t.logging_steps,
        report_to=t.report_to,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        torch_compile=t.torch_compile,
        **_checkpointing_arguments(t.gradient_checkpointing),
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy=t.train_sampling,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers version takes (5.25 renamed it and warns on
    the old name, even when off, so nothing is passed when it is off).

    Reentrant checkpointing runs the first forward without autograd: auxiliary losses of routed methods (load
    balance) would then get no gradient, and it needs input embeddings that require grad."""
    if not enabled:
        return {}
    names = {item.name for item in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def check_requested_sharding(distributed_type: str) -> None:
    """accelerate falls back to plain data parallelism when an FSDP or DeepSpeed launch config meets a machine
    without GPUs; a run that silently trains unsharded is not the run that was asked for."""
    for variable, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true" and distributed_type != wanted:
            raise RuntimeError(
                f"the accelerate launch config asks for {wanted}, but accelerate set up {distributed_type} "
                f"(accelerate enables {wanted} on GPUs only); launch with configs/accelerate/ddp.yaml on CPU"
            )


def training_collator(tokenizer: PreTrainedTokenizerBase, response_logits_only: bool = False):
    """Pads training batches on the right, whatever the tokenizer's side (left, for generation).

    The official recipe pads on the left. Under bf16 autocast on CUDA, PyTorch's SDPA kernels return NaN
    gradients for the fully masked rows that left padding creates (the loss stays finite), which reached the
    adapter weights after a few hundred steps of the quickstart on an H100. Right padding leaves no fully
    masked row; with rotary positions the shift it undoes changes no attention score.

    With `response_logits_only`, batches also name the positions whose logits the loss needs (`ResponseLogits`).
    """
    right_padding = copy.copy(tokenizer)
    right_padding.padding_side = "right"
    collator = DataCollatorForSeq2Seq(right_padding, pad_to_multiple_of=8, label_pad_token_id=-100)
    return ResponseLogits(collator) if response_logits_only else collator


@dataclass
class ResponseLogits:
    """Wraps a collator: each batch also carries `logits_to_keep`, the positions whose next token is trained in
    some row (the union over the batch), and `shift_labels`, those next tokens. The causal LM then runs its head
    at those positions only and its loss reads the given shifted labels: the same set of (logit, target) pairs
    as the full computation, so the same loss and gradients, without the [batch, length, vocab] logits. With
    the loss on the responses only, a label target keeps about 7 of ~100 positions."""

    collator: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        following = batch["labels"][:, 1:]  # the logits at position p predict token p + 1
        keep = (following != -100).any(0).nonzero().squeeze(1)
        if keep.numel() == 0:  # a batch without any trained token: its loss is 0/0 either way
            keep = torch.zeros(1, dtype=torch.long)
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = following[:, keep]
        return batch


def train(
    config: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Fine-tune `model` with the configured method; the final adapter is saved in `training.output_dir`."""
    config = config_from_dict(config.to_dict())  # validate a config built in Python like one read from YAML
    checkpoint = prepare_output_dir(config, resume=resume, overwrite=overwrite)
    sources = parse_sources(resolve_train_files(config.data.train_files))
    cap = config.data.max_records_per_task
    if cap is not None:
        sources = [replace(s, max_records=cap if s.max_records is None else s.max_records) for s in sources]
    records = load_mixture(sources, seed=config.training.seed)
    if config.data.shuffled_label_control:
        records = shuffle_answers(records, seed=config.training.seed)
    if config.data.target == "text":
        records = to_text_targets(records)
    train_set, val_set = build_datasets(
        records,
        tokenizer,
        cutoff_len=config.data.cutoff_len,
        train_on_inputs=config.data.train_on_inputs,
        val_size=config.data.val_size,
        seed=config.training.seed,
        template=config.data.template,
    )
    peft_model = build_peft_model(model, config)
    monitor = MoeLoraCallback(peft_model)
    trainer = MoeLoraTrainer(
        model=peft_model,
        args=training_arguments(config, has_validation=val_set is not None),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=training_collator(
            tokenizer, config.training.response_logits_only and not config.data.train_on_inputs
        ),
        processing_class=tokenizer,
        callbacks=callbacks,
        monitor=monitor,
    )
    check_requested_sharding(trainer.accelerator.distributed_type.value)
    # First, so the values it adds to the logs reach the reporting callbacks (TensorBoard) after it.
    trainer.callback_handler.callbacks.insert(0, monitor)
    # A tuner whose method needs the training loop (DR-LoRA's rank growth) provides `trainer_callbacks()`; they
    # follow the monitor, so what they add to the logs reaches the reporting callbacks too.
    tuner = _tuner(peft_model)
    trainer.callback_handler.callbacks[1:1] = tuner.trainer_callbacks() if isinstance(tuner, MoeLoraTuner) else []
    # The official recipe (transformers 4.36) averages the loss per micro-batch and divides by the
    # accumulation steps; the auxiliary losses are per micro-batch too. Token-count normalisation across
    # micro-batches would otherwise count those terms once per micro-batch.
    trainer.model_accepts_loss_kwargs = False
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as error:
        last = last_complete_checkpoint(config.training.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise NonFiniteLossError(f"{error}; training stopped, {kept}") from None
    trainer.save_model(config.training.output_dir)
    if trainer.is_world_process_zero():
        write_model_card(Path(config.training.output_dir), config, peft_model)
    # The Trainer's accelerator leaves the model's forward wrapped in the training autocast (bf16/fp16);
    # evaluation after training would then score with bf16 logits, whose coarse steps tie candidates.
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    metrics = trainer.whole_run_metrics(dict(output.metrics))  # of the whole run, resumed or not
    metrics["global_step"] = output.global_step
    metrics["tokens_seen"] = trainer.progress().tokens_seen
    metrics["train_records"] = len(train_set)
    runtime = metrics.get("train_runtime") or math.nan
    metrics["train_tokens_per_second"] = metrics["tokens_seen"] / runtime if runtime else math.nan
    metrics["trainable_parameters"] = peft_model.get_nb_trainable_parameters()[0]
    metrics["distributed_type"] = str(trainer.accelerator.distributed_type.value)
    metrics["world_size"] = trainer.accelerator.num_processes
    if trainer.is_world_process_zero():
        output_dir = Path(config.training.output_dir)
        (output_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history))
        # the mark of a finished run (`check_output_dir`): renamed into place, so it is whole or absent
        staged = output_dir / ".train_metrics.json.tmp"
        staged.write_text(json.dumps(metrics, indent=2))
        staged.replace(output_dir / "train_metrics.json")
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        if not config.training.keep_checkpoints:
            for checkpoint in [*output_dir.glob("checkpoint-*"), *output_dir.glob(f"{STAGING_PREFIX}*")]:
                shutil.rmtree(checkpoint)
    return TrainResult(peft_model, Path(config.training.output_dir), metrics)
