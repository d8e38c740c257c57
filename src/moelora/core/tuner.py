"""The tuner model every method shares: target resolution and checks, injection, auxiliary losses in the
forward pass, router statistics and strict checkpoint loading.

A method's tuner is a two-line subclass naming its `prefix` and `tuner_layer_cls`.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..peft_compat import adapter_state_dict, check_target_module_exists
from .config import MoeLoraConfig
from .layer import ModelCall, MoeLoraLayer
from .losses import WeightedLikeTokenLoss

#: The D2MoRA paper adapts the attention q/k/v projections; these decoders name them alike.
_QKV = ["q_proj", "k_proj", "v_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    model_type: _QKV
    for model_type in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "olmoe", "granite", "smollm3", "deepseek_v2", "phimoe", "starcoder2",
    )
}  # fmt: skip


class CheckpointMismatchError(ValueError):
    """An adapter checkpoint does not fit the model it is loaded into."""


def _linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's nn.Linear layers, for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def resolve_default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    if set(_QKV) <= set(_linear_layer_names(model)):
        return list(_QKV)
    raise ValueError(
        f"target_modules is not set and model type {model_type!r} has no default; pick from the model's "
        f"linear layers: {', '.join(_linear_layer_names(model))}"
    )


def check_targets(model: nn.Module, config: MoeLoraConfig) -> None:
    """Fail before anything is injected: no match, a non-Linear match, or a rank a module cannot hold."""
    matched = []
    for name, module in model.named_modules():
        if not name or isinstance(module, BaseTunerLayer) or ".base_layer" in name:
            continue
        hit = check_target_module_exists(config, name)
        if not hit:  # no match, or an _ExcludedModule (falsy)
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{type(config).__name__}.target_modules matches {name!r}, a {type(module).__name__}; "
                "only nn.Linear layers can be adapted"
            )
        config.check_module_shape(name, module.in_features, module.out_features)
        matched.append(name)
    if not matched:
        targets = config.target_modules
        shown = sorted(targets) if isinstance(targets, set) else targets
        raise ValueError(
            f"{type(config).__name__}.target_modules={shown!r} matches no module of the model; "
            f"its linear layers are: {', '.join(_linear_layer_names(model))}"
        )


class MoeLoraTuner(BaseTuner):
    prefix: str
    tuner_layer_cls: type[MoeLoraLayer]
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        #: Shared with every layer: what they may need of the current model call (its attention mask).
        self.model_call = ModelCall()
        super().__init__(model, peft_config, adapter_name, **kwargs)
        #: Add the layers' auxiliary losses to `outputs.loss` when labels are given; set False to add
        #: them yourself (`auxiliary_losses()`).
        self.add_auxiliary_losses_to_loss = True
        #: Detached values of the auxiliary terms of the last forward with labels, for logging.
        self.last_auxiliary_losses: dict[str, torch.Tensor] = {}
        self._hooks = [
            self.model.register_forward_hook(self._add_auxiliary_losses, with_kwargs=True),
            self.model.register_forward_pre_hook(self._share_model_call, with_kwargs=True),
        ]

    # --- injection ----------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: MoeLoraConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            config.target_modules = set(resolve_default_targets(model))
        check_targets(model, config)

    def _create_and_replace(
        self,
        config: MoeLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key!r} is already adapted by {type(target).__name__}")
        new_module = self.create_tuner_layer(target, adapter_name, config, current_key)
        new_module.model_call = self.model_call
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def create_tuner_layer(
        self, target: nn.Module, adapter_name: str, config: MoeLoraConfig, current_key: str
    ) -> MoeLoraLayer:
        """The new tuner layer wrapping `target`; a method with several kinds of layer (MoA) picks one per target."""
        return self.tuner_layer_cls(target, adapter_name, config)

    def trainer_callbacks(self) -> list:
        """Trainer callbacks the method needs during training (DR-LoRA's rank growth); most need none."""
        return []

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> Any:
        """PEFT's unload / merge_and_unload; once it succeeds the plain model keeps none of the tuner's hooks."""
        result = super()._unload_and_optionally_merge(*args, **kwargs)
        for hook in self._hooks:
            hook.remove()
        return result

    def _adapter_layers(self) -> list[tuple[str, MoeLoraLayer]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, MoeLoraLayer)]

    def _share_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.model_call.attention_mask = kwargs.get("attention_mask")

    # --- auxiliary losses ---------------------------------------------------------------------------------

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Each auxiliary term summed over all adapted layers and active adapters (already weighted); the layers
        of one class and adapter go to their class's `batched_auxiliary_losses` together."""
        members: dict[tuple[type, str], list[MoeLoraLayer]] = {}
        for _, layer in self._adapter_layers():
            if layer.disable_adapters:
                continue
            for adapter_name in layer.active_adapters:
                if adapter_name in layer.adapter_config:
                    members.setdefault((type(layer), adapter_name), []).append(layer)
        totals: dict[str, torch.Tensor] = {}
        for (layer_class, adapter_name), layers in members.items():
            for term, value in layer_class.batched_auxiliary_losses(layers, adapter_name).items():
                totals[term] = totals[term] + value if term in totals else value
        return totals

    def _add_auxiliary_losses(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        """Forward hook on the wrapped model: adds the auxiliary terms to `outputs.loss` when labels are given.

        A hook rather than an override of `forward`, because `PeftModel` without a task type calls the
        wrapped model directly and would bypass the tuner's forward.
        """
        loss = getattr(outputs, "loss", None)
        if kwargs.get("labels") is None or loss is None or not self.add_auxiliary_losses_to_loss:
            return outputs
        terms = self.auxiliary_losses()
        if torch.is_grad_enabled() and any(not value.requires_grad for value in terms.values()):
            self._check_auxiliary_losses_can_train(terms)
        if terms:
            share = self._share_of_optimizer_step(kwargs)
            total = sum(terms.values())
            outputs.loss = loss + share * total.to(loss.dtype)
            log_probs, mask = getattr(outputs, "log_probs", None), getattr(outputs, "label_mask", None)
            if log_probs is not None and mask is not None and log_probs.requires_grad and total.requires_grad:
                # TRL's fused LM head: its trainer builds the loss from these and ignores `loss`; whichever of the
                # two the loss is built from carries the terms, once (`WeightedLikeTokenLoss`).
                outputs.log_probs = WeightedLikeTokenLoss.apply(log_probs, mask, total)
            # detached tensors, read as floats only when logged: no device sync (or graph break) per step
            self.last_auxiliary_losses = {term: value.detach() for term, value in terms.items()}
        return outputs

    @staticmethod
    def _share_of_optimizer_step(kwargs: dict) -> torch.Tensor | float:
        """How much of one optimizer step this forward is, for terms that must count once per step.

        The HF Trainer divides each micro-batch's loss by the accumulation steps, unless the model takes loss
        kwargs (a PeftModel does): then it passes `num_items_in_batch`, the label tokens of the whole step, lets
        the model's loss sum over tokens and divide by that, and does not divide. An auxiliary term added whole to
        each micro-batch's loss would then count once per micro-batch; weighted by this micro-batch's share of the
        step's label tokens (counted as the Trainer counts them: shifted), the shares sum to one per step. Without
        `num_items_in_batch` (moelora's trainer, a hand-written loop) the share is 1.
        """
        total = kwargs.get("num_items_in_batch")
        labels = kwargs.get("shift_labels")
        if labels is None and kwargs.get("labels") is not None:
            labels = kwargs["labels"][..., 1:]
        if total is None or labels is None:
            return 1.0
        return labels.ne(-100).sum() / total

    def _check_auxiliary_losses_can_train(self, terms: dict[str, torch.Tensor]) -> None:
        """A term without a graph in a forward that builds one: the layers kept their values in a pass run without
        gradients, which is what reentrant activation checkpointing does (it recomputes with gradients only in
        backward, after the loss is formed). The term would then train nothing, silently."""
        if not any(p.requires_grad for _, layer in self._adapter_layers() for p in layer.parameters()):
            return  # nothing to train: a loss without a graph is expected
        dead = sorted(term for term, value in terms.items() if not value.requires_grad)
        raise RuntimeError(
            f"auxiliary loss(es) {dead} have no gradient: the adapter layers ran without autograd in this forward, "
            "as under reentrant gradient checkpointing; use non-reentrant checkpointing "
            '(gradient_checkpointing_kwargs={"use_reentrant": False}), which moelora train does'
        )

    # --- router statistics --------------------------------------------------------------------------------

    def record_routing(self, enabled: bool = True) -> None:
        """Start (or stop) accumulating router statistics in every layer; free while off."""
        for _, layer in self._adapter_layers():
            layer.routing.enabled = enabled

    def reset_routing_statistics(self) -> None:
        for _, layer in self._adapter_layers():
            layer.routing.reset()

    def routing_statistics(self) -> dict[str, dict[str, dict[str, object]]]:
        """{module name: {adapter/router: {mean_prob, entropy, tokens}}} since the last reset."""
        return {
            name: {key: stats.as_dict() for key, stats in layer.routing.stats.items()}
            for name, layer in self._adapter_layers()
            if layer.routing.stats
        }

    # --- checkpoints --------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MoeLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT loads adapters with strict=False and only warns on missing keys, which can silently leave
        experts at their init (the official D2MoRA loader's bug); refuse any missing, extra or misshapen key."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = adapter_state_dict(model, adapter_name)
        prefix = "base_model.model."

        def checkpoint_key(key: str) -> str:
            return cls._remove_adapter_name_from_key(key, adapter_name).removeprefix(prefix)

        missing = sorted(checkpoint_key(k) for k in expected.keys() - remapped.keys())
        unexpected = sorted(k.removeprefix(prefix) for k in remapped.keys() - expected.keys())
        problems = []
        if missing:
            problems.append(
                f"missing key(s) {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        if unexpected:
            problems.append(
                f"unexpected key(s) {unexpected[:5]}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )
        for key in sorted(expected.keys() & remapped.keys()):
            if expected[key].shape != remapped[key].shape:
                problems.append(
                    f"shape mismatch for {checkpoint_key(key)}: checkpoint {tuple(remapped[key].shape)}, "
                    f"model {tuple(expected[key].shape)}"
                )
        if problems:
            raise CheckpointMismatchError(
                f"adapter checkpoint does not match the {config.peft_type} model ({adapter_name!r}): "
                + "; ".join(problems)
            )
        return remapped
