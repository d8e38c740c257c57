"""Every place where moelora touches PEFT internals (tested with peft 0.21.x).

PEFT's public `register_peft_method` only accepts names that are already members of its closed `PeftType`
enum. `PeftType` is a `str` enum, so a plain string such as ``"D2MORA"`` hashes and compares like a member:
writing the config class, tuner class and prefix into PEFT's mapping dicts under that string makes
`get_peft_model`, `PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModel*` work
(specs: ecosystem.md §1.1). If PEFT changes these internals, this module is the only one to update.
"""

from __future__ import annotations

import torch
from peft import mapping as _peft_mapping
from peft.tuners import tuners_utils as _tuners_utils
from torch import nn

__all__ = ["adapter_state_dict", "check_target_module_exists", "keep_frozen", "register_peft_method"]

check_target_module_exists = _tuners_utils.check_target_module_exists


def register_peft_method(peft_type: str, config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Register an out-of-tree tuner under a plain-string peft_type (idempotent for the same classes)."""
    registered = _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None and registered is not config_cls:
        raise ValueError(f"peft_type {peft_type!r} is already registered by {registered.__module__}")
    _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    _peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that belong to `adapter_name`, found structurally like PEFT does."""
    prefixes = _tuners_utils._get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    return _tuners_utils._filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)


def keep_frozen(layer: _tuners_utils.BaseTunerLayer, adapter_name: str, names: tuple[str, ...]) -> None:
    """Adapter tensors that are saved state rather than trained weights (SMoRA's routing bias): PEFT re-freezes
    the names in `frozen_peft_weight_names` after every path that marks adapter weights trainable (injection,
    set_adapter, from_pretrained(is_trainable=True)). A per-instance copy, as PEFT's own variants make, so the
    class attribute shared by all tuner layers stays untouched."""
    frozen = dict(layer.frozen_peft_weight_names)
    frozen[adapter_name] = tuple(dict.fromkeys(frozen.get(adapter_name, ()) + names))
    layer.frozen_peft_weight_names = frozen
    layer._freeze_non_trainable_peft_weights(adapter_name)
