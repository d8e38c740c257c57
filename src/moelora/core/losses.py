"""Auxiliary losses shared by the methods."""

from __future__ import annotations

from collections.abc import Callable

import torch


def pairwise_abs_cosine(experts: torch.Tensor, eps: float = 1e-6, batch_dims: int = 0) -> torch.Tensor:
    """Sum over expert pairs i < j of |cos(vec(E_i), vec(E_j))|, normalising by (||E|| + eps).

    `experts` stacks E experts along dim `batch_dims`, each flattened whole (Frobenius); leading batch dims
    (the same loss for many layers at once, `[L, E, ...]` with `batch_dims=1`) are summed over. The epsilon
    keeps the value and its gradient finite when experts are all zero, as the B experts are at initialisation
    (d2mora.md §4). Computed in fp32 whatever the parameter dtype.
    """
    flat = experts.flatten(batch_dims + 1).float()
    unit = flat / (flat.norm(dim=-1, keepdim=True) + eps)
    return torch.triu(unit @ unit.transpose(-1, -2), diagonal=1).abs().sum()


def switch_load_balance(
    probs: torch.Tensor,
    selected: torch.Tensor,
    token_mean: Callable[[torch.Tensor], torch.Tensor] = lambda values: values.mean(0),
) -> torch.Tensor:
    """Switch / Mixtral load balance E * sum_i f_i P_i (baselines.md §2.3): f_i the fraction of tokens that
    select expert i (a count, no gradient; sums to k), P_i its mean router probability. `token_mean` may leave
    padding out (MoeLoraLayer.token_mean)."""
    return probs.shape[-1] * (token_mean(selected) * token_mean(probs)).sum()
