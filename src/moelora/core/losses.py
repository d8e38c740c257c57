"""Auxiliary losses shared by the methods."""

from __future__ import annotations

import torch


def pairwise_abs_cosine(experts: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sum over expert pairs i < j of |cos(vec(E_i), vec(E_j))|, normalising by (||E|| + eps).

    `experts` stacks E experts along dim 0, each flattened whole (Frobenius). The epsilon keeps the value and
    its gradient finite when experts are all zero, as the B experts are at initialisation (d2mora.md §4).
    Computed in fp32 whatever the parameter dtype.
    """
    flat = experts.flatten(1).float()
    unit = flat / (flat.norm(dim=1, keepdim=True) + eps)
    return torch.triu(unit @ unit.T, diagonal=1).abs().sum()
