"""moelora: Mixture-of-Experts LoRA methods as PEFT tuners.

Importing the package registers every method with PEFT, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` accept moelora configs and checkpoints.
"""

import warnings

from .core import CheckpointMismatchError, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner
from .methods import (
    METHODS,
    CoMoLConfig,
    D2MoRAConfig,
    DRLoRAConfig,
    HydraLoRAConfig,
    LoraConfig,
    MALoRAConfig,
    MoAConfig,
    MoLoRAConfig,
    MoSLoRAConfig,
    SMoRAConfig,
    TeamLoRAConfig,
    get_method,
)
from .models import default_model_path, load_adapter

__version__ = "0.1.0"

# PEFT reads `model.is_gradient_checkpointing` whenever it wraps or loads a model, which transformers 5.25
# deprecates with a FutureWarning on every run: nothing a user can act on, so only that message is silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = [
    "METHODS",
    "CheckpointMismatchError",
    "CoMoLConfig",
    "D2MoRAConfig",
    "DRLoRAConfig",
    "HydraLoRAConfig",
    "LoraConfig",
    "MALoRAConfig",
    "MoAConfig",
    "MoLoRAConfig",
    "MoSLoRAConfig",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MoeLoraTuner",
    "SMoRAConfig",
    "TeamLoRAConfig",
    "default_model_path",
    "get_method",
    "load_adapter",
]
