"""Auxiliary losses shared by the methods."""

from __future__ import annotations

from collections.abc import Callable

import torch


def pairwise_abs_cosine(experts: torch.Tensor, eps: float = 1e-6, batch_dims: int = 0) -> torch.Tensor:
    """Sum over expert pairs i < j of |cos(vec(E_i), vec(E_j))|, normalising by (||E|| + eps).

    `experts` stacks E experts along dim `batch_dims`, each flattened whole (Frobenius); leading batch dims
    (the same loss for many layers at once, `[L, E, ...]` with `batch_dims=1`) are summed over. The epsilon
    keeps the value and its gradient finite when experts are all zero, as the B experts are at initialisation
    (d2mora.md §4). Computed in fp32 whatever the parameter dtype, and outside autocast: a bf16 matmul of the
    unit vectors would put a relative error of ~1e-3 into the loss and its gradient.
    """
    with torch.autocast(experts.device.type, enabled=False):
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


class WeightedLikeTokenLoss(torch.autograd.Function):
    """Identity on per-token log-probabilities whose backward also trains `auxiliary` with the weight that the
    caller's loss gives those tokens together.

    For trainers that build their loss from the per-token log-probabilities and never read `outputs.loss` (TRL's
    `SFTTrainer` with its fused LM head): a loss `c * mean over the step's label tokens of -log p` sends each
    label position the gradient `-c / N`, so minus the sum over this micro-batch's label positions is `c` times
    its share of the step's tokens. Used as the auxiliary term's gradient, the shares sum to `c` per optimizer
    step, whatever the trainer does around the loss: division by accumulation steps, DDP rescaling, fp16 loss
    scaling. The term then counts once per step, as it does through `outputs.loss`. A loss that weights tokens
    unequally (TRL's `dft`) gives it the sum of those weights.
    """

    @staticmethod
    def forward(ctx, log_probs: torch.Tensor, label_mask: torch.Tensor, auxiliary: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(label_mask)
        ctx.auxiliary_dtype = auxiliary.dtype
        return log_probs.view_as(log_probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (label_mask,) = ctx.saved_tensors
        weight = -(grad.float() * label_mask).sum()
        return grad, None, weight.to(ctx.auxiliary_dtype)
