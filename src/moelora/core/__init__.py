"""Shared machinery of every moelora method: config base, tuner layer, tuner model, losses, routing stats."""

from .config import MoeLoraConfig
from .layer import MoeLoraLayer
from .losses import pairwise_abs_cosine, switch_load_balance
from .routing import RoutingRecorder, top_k_renormalized
from .tuner import CheckpointMismatchError, MoeLoraTuner

__all__ = [
    "CheckpointMismatchError",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MoeLoraTuner",
    "RoutingRecorder",
    "pairwise_abs_cosine",
    "switch_load_balance",
    "top_k_renormalized",
]
