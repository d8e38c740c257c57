"""Per-expert dropout before per-expert projections, without keeping E dropped copies of x for backward.

D2MoRA, MoLoRA (and the CoMoL code it follows) and HydraLoRA draw an independent dropout mask per expert by
default, as their official code does. The plain form builds the E dropped copies of the input and autograd keeps
them for the expert GEMM's backward: E·T·d_in values per module (3.3x PEFT LoRA's saved bytes for D2MoRA's
M = 3). `expert_dropout_projection` keeps only x (which the router keeps anyway), the weights and the RNG state,
and redraws the same masks in backward: the same values and gradients, for one extra mask draw.

    y[t, e] = A_e (m_e[t] ⊙ x[t]) / (1 - p)            m_e[t] ~ Bernoulli(1 - p)^d_in, independent over e and t
    dA_e    = Σ_t g[t, e] (m_e[t] ⊙ x[t])ᵀ / (1 - p)
    dx[t]   = Σ_e m_e[t] ⊙ (A_eᵀ g[t, e]) / (1 - p)

Under autocast the GEMMs run in the autocast dtype (as a plain bmm would), forward and backward alike.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .layer import compute_dtype


def draw_keep_masks(shape: tuple[int, ...], p: float, like: torch.Tensor, kept: float = 1.0) -> torch.Tensor:
    """Keep-masks with P(keep) = 1 - p, from the generator of `like`'s device: `kept` where kept, 0 elsewhere.

    One 64-bit draw gives two masks' entries, each an independent 32-bit integer compared with p's threshold, so
    p is exact to 2^-33; `bernoulli_` draws a double per entry, and E masks of a [T, d_in] input took as long as
    the frozen layer's GEMM on a CPU. Passing the dropout scale as `kept` makes the mask and the scaling one pass.
    """
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 1) // 2,), dtype=torch.int64, device=like.device)
    draws = words.view(torch.int32)[:count].view(shape)
    threshold = round(p * 2**32) - 2**31  # P(draw >= threshold) = 1 - p
    # torch.full, not torch.tensor: on a GPU a tensor built from a Python number is a host-to-device copy
    kept_value = torch.full((), kept, dtype=like.dtype, device=like.device)
    return torch.where(draws >= threshold, kept_value, 0.0)


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the default generator of `device`: the one `draw_keep_masks` draws from. Any accelerator, not
    only CUDA: the CPU state would not replay an XPU or MPS draw, and backward would silently use other masks."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


@contextmanager
def _replayed_rng(device: torch.device, state: torch.Tensor):
    """Run with the generator of `device` at `state`, leaving the global random streams as they were."""
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [], device_type=device.type):
        if accelerator:
            torch.get_device_module(device.type).set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class _ExpertDropoutProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        experts, rank, features = weight.shape
        dtype = compute_dtype(x, x.dtype)
        ctx.rng_state = _rng_state(x.device)
        ctx.p, ctx.dtype = p, dtype
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            scaled_keep = draw_keep_masks((experts, *x.shape), p, x.to(dtype), kept=1.0 / (1.0 - p))
            dropped = x.to(dtype) * scaled_keep  # [E, T, d_in], freed after the GEMM
            return torch.bmm(dropped, weight.to(dtype).transpose(1, 2)).transpose(0, 1)  # [T, E, r]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        experts = weight.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(ctx.dtype)
            with _replayed_rng(x.device, ctx.rng_state):
                scaled_keep = draw_keep_masks((experts, *x.shape), ctx.p, x_c, kept=1.0 / (1.0 - ctx.p))
            grad = grad.transpose(0, 1).to(ctx.dtype)  # [E, T, r]
            grad_x = grad_weight = None
            if ctx.needs_input_grad[0]:
                grad_x = (torch.bmm(grad, weight.to(ctx.dtype)) * scaled_keep).sum(0).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = torch.bmm(grad.transpose(1, 2), x_c * scaled_keep).to(weight.dtype)
        return grad_x, grad_weight, None


def expert_dropout_projection(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """[T, d_in] x, [E, r, d_in] weight -> [T, E, r]: each expert projects x under its own dropout mask.

    A weight shared by all experts (HydraLoRA's single A) can be passed as `A.expand(E, r, d_in)`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"expert_dropout_projection needs 0 < p < 1, got {p!r}")
    return _ExpertDropoutProjection.apply(x, weight, p)
