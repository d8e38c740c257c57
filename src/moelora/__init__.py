"""moelora: Mixture-of-Experts LoRA methods as PEFT tuners.

Importing the package registers every method with PEFT, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` accept moelora configs and checkpoints.
"""

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

__version__ = "0.1.0"

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
    "get_method",
]
