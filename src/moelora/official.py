"""Import official D2MoRA checkpoints (iLearn-Lab/AAAI26-D2MoRA) as moelora adapters (specs: d2mora.md §10-§11).

The official code saves an adapter folder with its old PEFT fork: `adapter_config.json` (the fields of its
`D2MoRAConfig`, `peft_type` "D2MoRA" in the released checkpoints) and `adapter_model.bin`, a pickled flat
state dict of every parameter whose name contains `lora_`. Each adapted nn.Linear became a `D2MoRALinear`
holding its experts as separate bias-free nn.Linear modules in ModuleLists, so one module's keys are

    base_model.model.<module>.lora_A.<i>.weight      A_i, [r, d_in]      i = 0..expert_down-1
    base_model.model.<module>.lora_B.<j>.weight      B_j, [d_out, r]     j = 0..expert_up-1
    base_model.model.<module>.lora_route1.weight     G_A, [M, d_in]      router over the A experts
    base_model.model.<module>.lora_route2.weight     G_B, [N, r]         router over the B experts

with <module> the Hugging Face module path (`model.layers.0.self_attn.q_proj`). Trainer checkpoints of the same
run (`checkpoint-N/model.safetensors`, `pytorch_model.bin`) hold the same keys.

Key map (official -> moelora, `base_model.model.<module>.` kept as the prefix on both sides):

    lora_A.<i>.weight, i = 0..M-1   stacked along a new dim 0 -> d2mora_A         [M, r, d_in]
    lora_B.<j>.weight, j = 0..N-1   stacked along a new dim 0 -> d2mora_B         [N, d_out, r]
    lora_route1.weight                                       -> d2mora_router_A  [M, d_in]
    lora_route2.weight                                       -> d2mora_router_B  [N, r]

No transpose anywhere: nn.Linear stores [out, in], which is how moelora stores A_i, B_j and both routers; the
official `fan_in_fan_out` only ever transposed the *base* weight (and is refused below). Scaling is
lora_alpha / r in both codes. Tensors become fp32 (moelora's adapter master weights; fp16 and bf16 convert
exactly).

Unlike the official loader (`load_state_dict(strict=False)`, which silently leaves experts at zero when a key
does not match, §11 item 3), every key must be accounted for: a key outside this map, an expert index
outside 0..M-1 / 0..N-1, a module with a missing tensor, a misshapen tensor, a non-float or non-finite tensor,
or a module the config's `target_modules` would not adapt is an error naming the key. Which modules of the
base model must be adapted is checked when the adapter is loaded: moelora's loader refuses a checkpoint that
lacks any adapted module's tensors.

Config map (official `adapter_config.json` field -> moelora `D2MoRAConfig`):

    peft_type                must be "D2MoRA" (released checkpoints; the official loader only accepts them
                             after editing it, §11 item 2) or "D2MORA" (the code's enum) -> "D2MORA"
    r                        -> r; must equal the experts' rank in the weights
    lora_alpha               -> lora_alpha (required: the official default, null, cannot run)
    lora_dropout             -> lora_dropout (required); independent mask per A expert in both codes,
                             hence shared_dropout_mask = False
    expert_down              -> num_down_experts; must equal the number of A experts in the weights
    expert_up                -> num_up_experts; must equal the number of B experts in the weights
    target_modules           -> target_modules as one regex: a list [t1, t2] becomes ".*(?:t1|t2)" because the
                             official code adapts a module when its name *ends with* a target string, which a
                             regex matched in full (as PEFT does) reproduces exactly, while PEFT's list rule
                             (exact name or ".t" suffix) can differ; a string is already such a regex
    task_type                must be "CAUSAL_LM" or null -> "CAUSAL_LM"
    base_model_name_or_path  -> base_model_name_or_path (or the `base_model` argument)
    inference_mode           ignored: PEFT sets it when loading (from_pretrained(is_trainable=...))
    merge_weights            ignored: D2MoRA's update depends on the input and cannot merge; in the official
                             code True only reaches its broken merge path (§11 item 4), it changes no weight
    fan_in_fan_out           must be false: true transposes the base weight that the official code then
                             replaces by the untransposed original, a broken model (and no adapter tensor)
    enable_lora              must be null: otherwise the official code built plain merged LoRA, not D2MoRA
    bias                     must be "none": moelora trains no biases
    modules_to_save          must be null or empty: moelora saves no full modules
    (not in the file)        orthogonal_loss_weight = 1e-4, the official λ (a training flag there); it only
                             matters when training continues from the imported adapter

Any other field is an error. Pickles are opened only with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers; safetensors files are read as such. The source folder is only read;
the output folder is written next to its final place and renamed into it, and an existing one is replaced only
with `overwrite=True` (and only when it holds an adapter or nothing).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .methods.d2mora import D2MoRAConfig

OFFICIAL_PEFT_TYPES = ("D2MoRA", "D2MORA")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROVENANCE_NAME = "import_d2mora.json"
OFFICIAL_ORTHOGONAL_LOSS_WEIGHT = 1e-4
_KEY_PREFIX = "base_model.model."
_WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")
#: Files a Trainer checkpoint folder holds beside the weights; never adapter weights.
_TRAINER_STATE_FILES = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
_PARAMETER = re.compile(
    r"^(?P<module>.+)\.(?:(?P<expert>lora_A|lora_B)\.(?P<index>0|[1-9]\d*)|(?P<router>lora_route[12]))$"
)
_REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "expert_down", "expert_up")
#: Optional fields with the value the official D2MoRAConfig defaults to when they are absent.
_OPTIONAL_FIELDS: dict[str, Any] = {
    "base_model_name_or_path": None,
    "task_type": None,
    "inference_mode": False,
    "merge_weights": False,
    "fan_in_fan_out": False,
    "enable_lora": None,
    "bias": "none",
    "modules_to_save": None,
}


class OfficialCheckpointError(ValueError):
    """An official D2MoRA checkpoint that cannot be imported faithfully."""


@dataclass(frozen=True)
class ImportedAdapter:
    """What `import_d2mora` wrote."""

    path: Path
    weights_file: Path
    modules: int
    r: int
    num_down_experts: int
    num_up_experts: int


def _integer(config: dict[str, Any], name: str) -> int:
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OfficialCheckpointError(f"{CONFIG_NAME}: {name} must be an integer >= 1, got {value!r}")
    return value


def _number(config: dict[str, Any], name: str) -> float:
    value = config[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise OfficialCheckpointError(f"{CONFIG_NAME}: {name} must be a number, got {value!r}")
    return value


def target_regex(target_modules: list[str] | str) -> str:
    """The official target rule as a regex PEFT matches in full: a list means 'the module name ends with one of
    these strings' (plain string suffix, no component boundary); a string is already a full-match regex."""
    if isinstance(target_modules, str):
        return target_modules
    return ".*(?:" + "|".join(re.escape(target) for target in target_modules) + ")"


def convert_config(official: dict[str, Any], base_model: str | None = None) -> D2MoRAConfig:
    """The moelora config of an official `adapter_config.json` (the config map in the module docstring)."""
    unknown = sorted(set(official) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise OfficialCheckpointError(
            f"{CONFIG_NAME}: unknown field(s) {unknown}; an official D2MoRA config has "
            f"{sorted((*_REQUIRED_FIELDS, *_OPTIONAL_FIELDS))}"
        )
    missing = [name for name in _REQUIRED_FIELDS if name not in official]
    if missing:
        raise OfficialCheckpointError(f"{CONFIG_NAME}: required field(s) {missing} missing")
    config = {**_OPTIONAL_FIELDS, **official}
    if config["peft_type"] not in OFFICIAL_PEFT_TYPES:
        raise OfficialCheckpointError(
            f"{CONFIG_NAME}: peft_type {config['peft_type']!r} is not an official D2MoRA checkpoint "
            f"(expected one of {list(OFFICIAL_PEFT_TYPES)})"
        )
    if config["task_type"] not in (None, "CAUSAL_LM"):
        raise OfficialCheckpointError(f"{CONFIG_NAME}: task_type {config['task_type']!r}; only CAUSAL_LM is supported")
    refused = {
        "fan_in_fan_out": (config["fan_in_fan_out"] is not False, "must be false (true breaks the official model)"),
        "enable_lora": (config["enable_lora"] is not None, "must be null (otherwise the official code is plain LoRA)"),
        "bias": (config["bias"] != "none", "must be 'none' (moelora trains no biases)"),
        "modules_to_save": (bool(config["modules_to_save"]), "must be null (moelora saves no full modules)"),
        "merge_weights": (not isinstance(config["merge_weights"], bool), "must be a boolean"),
        "inference_mode": (not isinstance(config["inference_mode"], bool), "must be a boolean"),
    }
    for name, (bad, rule) in refused.items():
        if bad:
            raise OfficialCheckpointError(f"{CONFIG_NAME}: {name}={config[name]!r} {rule}")
    targets = config["target_modules"]
    valid_targets = isinstance(targets, str) or (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    )
    if not valid_targets:
        raise OfficialCheckpointError(
            f"{CONFIG_NAME}: target_modules must be a non-empty list of names or a regex, got {targets!r}"
        )
    alpha, dropout = _number(config, "lora_alpha"), _number(config, "lora_dropout")
    try:
        return D2MoRAConfig(
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model or config["base_model_name_or_path"],
            inference_mode=True,
            r=_integer(config, "r"),
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_regex(targets),
            num_down_experts=_integer(config, "expert_down"),
            num_up_experts=_integer(config, "expert_up"),
            orthogonal_loss_weight=OFFICIAL_ORTHOGONAL_LOSS_WEIGHT,
            shared_dropout_mask=False,
        )
    except ValueError as error:  # D2MoRAConfig's own range checks (alpha > 0, 0 <= dropout < 1)
        raise OfficialCheckpointError(f"{CONFIG_NAME}: {error}") from None


def check_not_official(folder: str | Path) -> None:
    """Refuse an official D2MoRA folder where a moelora adapter is expected, pointing to the import. (PEFT would
    read its config as moelora's, dropping expert_down/expert_up with a mere warning; only the strict weight
    check would then stop it, with a less helpful message.)"""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # not readable as a config: the regular loader reports it
    if isinstance(config, dict) and ("expert_down" in config or config.get("peft_type") == "D2MoRA"):
        raise OfficialCheckpointError(
            f"{folder} is an official D2MoRA checkpoint; convert it first: moelora import-d2mora {folder} --out DIR"
        )


def find_weights_file(source: Path) -> Path:
    """The one weights file of an adapter folder; Trainer state files beside it are not candidates."""
    candidates = sorted(
        path
        for path in source.iterdir()
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES and not _TRAINER_STATE_FILES.match(path.name)
    )
    if not candidates:
        raise OfficialCheckpointError(f"{source}: no weights file (*.bin, *.pth, *.pt or *.safetensors)")
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise OfficialCheckpointError(f"{source}: several weights files ({names}); choose one with --weights")
    return candidates[0]


def _unpickling_reason(error: Exception) -> str:
    """The part of torch's refusal that names what the pickle holds, without its advice to load it unsafely."""
    match = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(error), re.MULTILINE)
    return match.group(1).strip() if match else str(error).splitlines()[0]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a safetensors file or a pickle opened with weights_only=True only."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise OfficialCheckpointError(f"{path}: not a readable safetensors file: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise OfficialCheckpointError(
            f"{path}: refused by torch.load(weights_only=True), which moelora never bypasses: "
            f"{_unpickling_reason(error)}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise OfficialCheckpointError(f"{path}: not a readable PyTorch file: {error}") from None
    if not isinstance(state, dict):
        raise OfficialCheckpointError(f"{path}: expected a flat dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise OfficialCheckpointError(
                f"{path}: expected a flat dict of tensors; entry {key!r} is a {type(value).__name__}"
            )
    return state


def _stack_module(module: str, tensors: dict[str, torch.Tensor], config: D2MoRAConfig) -> dict[str, torch.Tensor]:
    """One module's official tensors, checked and converted to moelora's four stacked tensors."""
    m, n, r = config.num_down_experts, config.num_up_experts, config.r
    expected = {
        *(f"lora_A.{i}" for i in range(m)),
        *(f"lora_B.{j}" for j in range(n)),
        "lora_route1",
        "lora_route2",
    }

    def key(name: str) -> str:
        return f"{_KEY_PREFIX}{module}.{name}.weight"

    missing = sorted(expected - tensors.keys())
    if missing:
        raise OfficialCheckpointError(f"missing key(s) {[key(name) for name in missing]}")
    unused = sorted(tensors.keys() - expected)
    if unused:
        raise OfficialCheckpointError(
            f"unused key(s) {[key(name) for name in unused]} (the config has expert_down={m}, expert_up={n})"
        )
    d_in, d_out = tensors["lora_A.0"].shape[-1], tensors["lora_B.0"].shape[0]
    shapes = {
        **{f"lora_A.{i}": (r, d_in) for i in range(m)},
        **{f"lora_B.{j}": (d_out, r) for j in range(n)},
        "lora_route1": (m, d_in),
        "lora_route2": (n, r),
    }
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise OfficialCheckpointError(
                f"{key(name)} has shape {tuple(tensor.shape)}, expected {shape} (r={r}, expert_down={m}, "
                f"expert_up={n}, d_in={d_in}, d_out={d_out})"
            )
        if not tensor.is_floating_point():
            raise OfficialCheckpointError(f"{key(name)} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise OfficialCheckpointError(f"{key(name)} holds non-finite values")
    as_fp32 = {name: tensor.to(torch.float32) for name, tensor in tensors.items()}
    prefix = f"{_KEY_PREFIX}{module}."
    return {
        prefix + "d2mora_A": torch.stack([as_fp32[f"lora_A.{i}"] for i in range(m)]).contiguous(),
        prefix + "d2mora_B": torch.stack([as_fp32[f"lora_B.{j}"] for j in range(n)]).contiguous(),
        prefix + "d2mora_router_A": as_fp32["lora_route1"].contiguous(),
        prefix + "d2mora_router_B": as_fp32["lora_route2"].contiguous(),
    }


def convert_state_dict(state: dict[str, torch.Tensor], config: D2MoRAConfig) -> dict[str, torch.Tensor]:
    """The moelora state dict (PEFT's saved key format) of an official one; strict, see the module docstring."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        inner = key.removeprefix(_KEY_PREFIX).removesuffix(".weight")
        match = _PARAMETER.match(inner) if key.startswith(_KEY_PREFIX) and key.endswith(".weight") else None
        if match is None:
            raise OfficialCheckpointError(
                f"unused key {key!r}: not an official D2MoRA parameter ({_KEY_PREFIX}<module>. followed by "
                "lora_A.<i>.weight, lora_B.<j>.weight, lora_route1.weight or lora_route2.weight)"
            )
        name = match["router"] or f"{match['expert']}.{match['index']}"
        by_module.setdefault(match["module"], {})[name] = tensor
    if not by_module:
        raise OfficialCheckpointError("the weights file holds no tensors")
    targets = re.compile(config.target_modules)
    untargeted = sorted(module for module in by_module if not targets.fullmatch(module))
    if untargeted:
        raise OfficialCheckpointError(
            f"the weights adapt module(s) {untargeted[:3]} that target_modules {config.target_modules!r} does not"
        )
    converted: dict[str, torch.Tensor] = {}
    for module in sorted(by_module):
        converted.update(_stack_module(module, by_module[module], config))
    return converted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_output(source: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would touch the source or replace something that is not an adapter folder."""
    source_resolved, out_resolved = source.resolve(), out.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        raise OfficialCheckpointError(f"--out {out} is inside the source folder {source}, which is never written")
    if out_resolved in source_resolved.parents:
        raise OfficialCheckpointError(f"--out {out} contains the source folder {source}")
    if not out.exists():
        return
    if not out.is_dir():
        raise OfficialCheckpointError(f"--out {out} exists and is not a folder")
    if not overwrite:
        if any(out.iterdir()):
            raise OfficialCheckpointError(f"--out {out} already exists; pass --overwrite to replace it")
        return
    if any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise OfficialCheckpointError(f"--overwrite: refusing to replace {out}, which holds no {CONFIG_NAME}")


def import_d2mora(
    source: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    weights: str | Path | None = None,
    base_model: str | None = None,
) -> ImportedAdapter:
    """Convert the official D2MoRA adapter folder `source` into a moelora adapter folder `out`.

    `out` then loads with `PeftModel.from_pretrained(base, out)` (after `import moelora`) and with
    `moelora eval --adapter out`. `weights` picks the weights file when `source` holds several; `base_model`
    replaces the checkpoint's `base_model_name_or_path` (for instance with a local copy of the base model).
    """
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise OfficialCheckpointError(f"{source} is not a folder")
    config_path = source / CONFIG_NAME
    if not config_path.is_file():
        raise OfficialCheckpointError(
            f"{source} holds no {CONFIG_NAME}: not an adapter folder (a Trainer checkpoint-N folder has none; the "
            "official run's output folder holds the selected adapter with its config)"
        )
    _check_output(source, out, overwrite)
    try:
        official = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise OfficialCheckpointError(f"{config_path}: invalid JSON: {error}") from None
    if not isinstance(official, dict):
        raise OfficialCheckpointError(f"{config_path}: expected a JSON object")
    config = convert_config(official, base_model)
    weights_file = Path(weights) if weights is not None else find_weights_file(source)
    if not weights_file.is_file():
        raise OfficialCheckpointError(f"weights file {weights_file} does not exist")
    state = load_state_dict(weights_file)
    converted = convert_state_dict(state, config)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        config.save_pretrained(str(staging))
        save_file(converted, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        provenance = {
            "source": str(source.resolve()),
            "weights_file": weights_file.name,
            "weights_sha256": _sha256(weights_file),
            "official_config": official,
            "official_tensors": len(state),
            "modules": len(converted) // 4,
        }
        (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportedAdapter(
        path=out,
        weights_file=weights_file,
        modules=len(converted) // 4,
        r=config.r,
        num_down_experts=config.num_down_experts,
        num_up_experts=config.num_up_experts,
    )


__all__ = [
    "ImportedAdapter",
    "OfficialCheckpointError",
    "check_not_official",
    "convert_config",
    "convert_state_dict",
    "find_weights_file",
    "import_d2mora",
    "load_state_dict",
    "target_regex",
]
