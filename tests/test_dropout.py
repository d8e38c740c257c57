"""core/dropout.py: per-expert dropout masks redrawn in backward instead of kept (the D2MoRA, MoLoRA, HydraLoRA
default); the method tests check it against their loop forms, these check the function itself."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AUTOCAST_DEVICE
from torch.utils.checkpoint import checkpoint

from moelora.core.dropout import draw_keep_masks, expert_dropout_projection


def plain_form(x, weight, keep, p):
    """What autograd would keep: the E dropped copies of x."""
    return torch.bmm(x * keep / (1 - p), weight.transpose(1, 2)).transpose(0, 1)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_same_values_gradients_and_random_stream_as_the_plain_form():
    x, weight = torch.randn(6, 16), torch.randn(3, 4, 16)
    upstream = torch.randn(6, 3, 4)
    fx, fw = leaves(x, weight)
    torch.manual_seed(7)
    fused = expert_dropout_projection(fx, fw, 0.3)
    fused.backward(upstream)
    next_fused = torch.rand(3)

    torch.manual_seed(7)
    keep = draw_keep_masks((3, 6, 16), 0.3, x)
    next_plain = torch.rand(3)
    px, pw = leaves(x, weight)
    plain = plain_form(px, pw, keep, 0.3)
    plain.backward(upstream)

    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fx.grad, px.grad)
    torch.testing.assert_close(fw.grad, pw.grad)
    # the forward draws what F.dropout would (one mask draw), the backward replays without advancing the stream
    assert torch.equal(next_fused, next_plain)
    assert 0.55 < keep.mean() < 0.85 and not torch.equal(keep[0], keep[1])


def test_saves_no_dropped_copy_of_x():
    x, weight = leaves(torch.randn(64, 32), torch.randn(3, 4, 32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        expert_dropout_projection(x, weight, 0.1)
    assert (3, 64, 32) not in saved and sorted(saved) == sorted([x.shape, weight.shape])
    plain_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t.shape) or t, lambda t: t):
        plain_form(x, weight, draw_keep_masks((3, 64, 32), 0.1, x), 0.1)
    assert (3, 64, 32) in plain_saved  # what the function avoids


def test_gradient_checkpointing_recomputes_the_same_masks():
    x, weight = torch.randn(5, 8), torch.randn(2, 3, 8)
    grads = []
    for use_checkpoint in (False, True):
        lx, lw = leaves(x, weight)
        torch.manual_seed(3)
        if use_checkpoint:
            out = checkpoint(expert_dropout_projection, lx, lw, 0.5, use_reentrant=False)
        else:
            out = expert_dropout_projection(lx, lw, 0.5)
        out.pow(2).sum().backward()
        grads.append((lx.grad, lw.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_autocast_runs_the_gemms_in_bf16_and_keeps_parameter_gradients_fp32():
    x, weight = leaves(torch.randn(6, 16), torch.randn(3, 4, 16))
    torch.manual_seed(1)
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = expert_dropout_projection(x, weight, 0.2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    rx, rw = leaves(x, weight)
    torch.manual_seed(1)
    reference = expert_dropout_projection(rx, rw, 0.2)
    reference.sum().backward()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    torch.testing.assert_close(weight.grad, rw.grad, atol=0.2, rtol=0.05)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_rejects_a_probability_outside_0_1(p):
    with pytest.raises(ValueError, match="0 < p < 1"):
        expert_dropout_projection(torch.randn(2, 4), torch.randn(2, 1, 4), p)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_masks_keep_with_probability_one_minus_p_independently(p):
    """Each entry of the masks is kept with probability 1 - p (to 2^-33), independently of its neighbours: the two
    halves of one 64-bit draw land side by side, and experts' masks are adjacent blocks of one draw."""
    keep = draw_keep_masks((3, 333, 1001), p, torch.empty(0)).double()  # odd count: a half-used last word
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    flat = keep.flatten()
    for a, b in ((flat[:-1], flat[1:]), (keep[0].flatten(), keep[1].flatten())):  # neighbours, experts
        correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(a.numel())
    scaled = draw_keep_masks((4, 5), p, torch.empty(0), kept=1 / (1 - p))
    assert all(value == 0 or value == pytest.approx(1 / (1 - p)) for value in scaled.unique().tolist())
