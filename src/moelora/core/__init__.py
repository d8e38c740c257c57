"""Shared machinery of every moelora method: config base, tuner layer, tuner model, losses, routing stats."""

from .config import MoeLoraConfig
from .layer import MoeLoraLayer
from .losses import pairwise_abs_cosine
from .routing import RoutingRecorder
from .tuner import CheckpointMismatchError, MoeLoraTuner

__all__ = [
    "CheckpointMismatchError",
    "MoeLoraConfig",
    "MoeLoraLayer",
    "MoeLoraTuner",
    "RoutingRecorder",
    "pairwise_abs_cosine",
]
