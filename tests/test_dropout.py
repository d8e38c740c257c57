"""core/dropout.py: per-expert dropout masks without keeping E dropped copies of x for backward (the D2MoRA,
MoLoRA, HydraLoRA default), in both forms; the method tests check it against their loop forms, these check the
function itself."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import AUTOCAST_DEVICE
from reference import recording_keep_masks
from torch.utils.checkpoint import checkpoint

from moelora.core import dropout
from moelora.core.dropout import (
    draw_dropped_positions,
    draw_keep_masks,
    expert_dropout_projection,
    routed_expert_dropout_projection,
)

FORMS = ["sparse", "dense"]


def plain_form(x, weight, keep, p):
    """What autograd would keep: the E dropped copies of x."""
    return torch.bmm(x * keep / (1 - p), weight.transpose(1, 2)).transpose(0, 1)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def keep_mask_of(positions, shape):
    keep = torch.ones(math.prod(shape), dtype=torch.float64)
    keep[positions.long()] = 0.0
    return keep.view(shape)


@pytest.mark.parametrize("experts", [1, 3])  # the sparse form's backward for one mask zeroes instead of correcting
@pytest.mark.parametrize("rank", [1, 4, 9])  # the sparse backward pads ranks 2-7 for sampled_addmm
@pytest.mark.parametrize("form", FORMS)
def test_same_values_and_gradients_as_the_plain_form_on_the_masks_drawn(form, rank, experts, monkeypatch):
    x, weight = torch.randn(40, 16), torch.randn(experts, rank, 16)
    upstream = torch.randn(40, experts, rank)
    masks = recording_keep_masks(monkeypatch)
    fx, fw = leaves(x, weight)
    fused = expert_dropout_projection(fx, fw, 0.3, form=form)
    fused.backward(upstream)
    keep = masks[0]
    assert torch.equal(keep, masks[-1]) and 0.5 < keep.mean() < 0.9
    assert experts == 1 or not torch.equal(keep[0], keep[1])

    px, pw = leaves(x, weight)
    plain = plain_form(px, pw, keep, 0.3)
    plain.backward(upstream)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fx.grad, px.grad)
    torch.testing.assert_close(fw.grad, pw.grad)


@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_a_router_on_the_undropped_x_shares_the_pass_over_x(form, autocast, experts, monkeypatch):
    """routed_expert_dropout_projection: the projections as without a router, the router's logits x Gᵀ in fp32
    (autocast or not), and the gradients of x, the experts and the router all as the plain form's (one mask:
    the router's part of x's gradient is not zeroed where the experts' is)."""
    x, weight, router = torch.randn(40, 16), torch.randn(experts, 4, 16), torch.randn(5, 16)
    upstream, upstream_logits = torch.randn(40, experts, 4), torch.randn(40, 5)
    masks = recording_keep_masks(monkeypatch)
    fx, fw, fr = leaves(x, weight, router)
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16, enabled=autocast):
        projections, logits = routed_expert_dropout_projection(fx, fw, fr, 0.3, form=form)
    assert logits.dtype == torch.float32 and len(masks) == 1
    (projections.float() * upstream).sum().add((logits * upstream_logits).sum()).backward()

    px, pw, pr = leaves(x, weight, router)
    plain = plain_form(px, pw, masks[0], 0.3)
    plain_logits = px @ pr.T
    (plain * upstream).sum().add((plain_logits * upstream_logits).sum()).backward()
    tolerance = {"atol": 0.15, "rtol": 0.05} if autocast and form == "dense" else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(projections.float(), plain, **tolerance)
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
    for got, expected in ((fx, px), (fw, pw), (fr, pr)):
        torch.testing.assert_close(got.grad, expected.grad, **tolerance)


@pytest.mark.parametrize("form", FORMS)
def test_draws_once_per_forward_and_the_backward_leaves_the_random_stream_alone(form):
    x, weight = leaves(torch.randn(6, 16), torch.randn(3, 4, 16))
    torch.manual_seed(7)
    out = expert_dropout_projection(x, weight, 0.3, form=form)
    after_forward = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)

    torch.manual_seed(7)
    if form == "dense":
        draw_keep_masks((3, 6, 16), 0.3, x)
    else:
        draw_dropped_positions((3, 6, 16), 0.3, x.device)
    assert torch.equal(torch.get_rng_state(), after_forward)  # one draw, what the forward took


@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("form", FORMS)
def test_saves_no_dropped_copy_of_x(form, experts):
    x, weight = leaves(torch.randn(64, 32), torch.randn(experts, 4, 32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        expert_dropout_projection(x, weight, 0.1, form=form)
    assert (experts, 64, 32) not in [t.shape for t in saved]
    extra = sorted((t.shape for t in saved if 0 not in t.shape), key=str)  # leaves out the empty router
    for shape in (x.shape, weight.shape):
        extra.remove(shape)
    # the sparse form keeps three int32 indices and x's value per dropped entry (~10 %) and the rows' starts, or
    # with one mask only the entries' int32 places in x; the dense form only the RNG state
    if form == "dense":
        assert extra == []
    elif experts == 1:
        assert len(extra) == 1 and len(extra[0]) == 1 and 0 < extra[0][0] < 64 * 32 / 5
        assert {t.dtype for t in saved if t.shape == extra[0]} == {torch.int32}
    else:
        per_entry = [shape for shape in extra if shape != (3 * 64 + 1,)]
        assert len(extra) == 5 and len(per_entry) == 4 and len(set(per_entry)) == 1
        assert len(per_entry[0]) == 1 and per_entry[0][0] < 3 * 64 * 32 / 5
    plain_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t.shape) or t, lambda t: t):
        plain_form(x, weight, draw_keep_masks((experts, 64, 32), 0.1, x), 0.1)
    assert (experts, 64, 32) in plain_saved  # what the function avoids


@pytest.mark.parametrize("form", FORMS)
def test_gradient_checkpointing_recomputes_the_same_masks(form):
    x, weight = torch.randn(5, 8), torch.randn(2, 3, 8)
    grads = []
    for use_checkpoint in (False, True):
        lx, lw = leaves(x, weight)
        torch.manual_seed(3)
        if use_checkpoint:
            out = checkpoint(expert_dropout_projection, lx, lw, 0.5, form, use_reentrant=False)
        else:
            out = expert_dropout_projection(lx, lw, 0.5, form=form)
        out.pow(2).sum().backward()
        grads.append((lx.grad, lw.grad))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("form", FORMS)
def test_autocast_runs_the_gemms_in_bf16_and_keeps_parameter_gradients_fp32(form, experts):
    x, weight = leaves(torch.randn(6, 16), torch.randn(experts, 4, 16))
    torch.manual_seed(1)
    with torch.autocast(AUTOCAST_DEVICE, dtype=torch.bfloat16):
        out = expert_dropout_projection(x, weight, 0.2, form=form)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    rx, rw = leaves(x, weight)
    torch.manual_seed(1)
    reference = expert_dropout_projection(rx, rw, 0.2, form=form)
    reference.sum().backward()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    torch.testing.assert_close(weight.grad, rw.grad, atol=0.2, rtol=0.05)


@pytest.mark.parametrize("form", FORMS)
def test_a_shared_weight_passed_expanded_gets_the_summed_gradient(form, monkeypatch):
    """HydraLoRA passes its one A as A.expand(E, r, d_in)."""
    x, A = torch.randn(30, 12), torch.randn(4, 12)
    masks = recording_keep_masks(monkeypatch)
    fx, fA = leaves(x, A)
    expert_dropout_projection(fx, fA.expand(3, 4, 12), 0.25, form=form).pow(2).sum().backward()
    px, pA = leaves(x, A)
    plain_form(px, pA.expand(3, 4, 12), masks[0], 0.25).pow(2).sum().backward()
    # the sparse form subtracts the dropped terms from the whole product: fp32 rounding of a different sum
    torch.testing.assert_close(fA.grad, pA.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fx.grad, px.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_dropped_projection_is_a_linear_on_the_dropped_x(form, monkeypatch):
    """One mask ([1, T, d_in]) through either form against F.linear on x times that mask, in values and in both
    gradients; outside training, or at p 0, F.linear itself."""
    monkeypatch.setattr(dropout, "_is_sparse", lambda requested, x: form == "sparse")
    masks = recording_keep_masks(monkeypatch)
    x, weight = leaves(torch.randn(30, 12), torch.randn(5, 12))
    upstream = torch.randn(30, 5)
    got = dropout.dropped_projection(x, weight, 0.4, training=True)
    got.backward(upstream)
    keep = masks[0][0]
    assert keep.shape == (30, 12) and torch.equal(masks[0], masks[-1]) and 0.4 < keep.mean() < 0.8

    rx, rw = leaves(x.detach(), weight.detach())
    expected = F.linear(rx * keep / 0.6, rw)
    expected.backward(upstream)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, rx.grad)
    torch.testing.assert_close(weight.grad, rw.grad)
    with torch.no_grad():
        for training, p in ((False, 0.4), (True, 0.0)):
            assert torch.equal(dropout.dropped_projection(x, weight, p, training), F.linear(x, weight))


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_rejects_a_probability_outside_0_1(p):
    with pytest.raises(ValueError, match="0 < p < 1"):
        expert_dropout_projection(torch.randn(2, 4), torch.randn(2, 1, 4), p)


def test_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="'sparse' or 'dense'"):
        expert_dropout_projection(torch.randn(2, 4), torch.randn(2, 1, 4), 0.1, form="fused")


def check_independent_with_rate(keep: torch.Tensor, p: float) -> None:
    """Each entry kept with probability 1 - p, independently of its neighbour and of the other experts' entries."""
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    flat = keep.flatten()
    for a, b in ((flat[:-1], flat[1:]), (keep[0].flatten(), keep[1].flatten())):  # neighbours, experts
        correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(a.numel())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dense_masks_keep_with_probability_one_minus_p_independently(p):
    """p exact to 2^-33: the two halves of one 64-bit draw land side by side, experts' masks are adjacent blocks."""
    check_independent_with_rate(draw_keep_masks((3, 333, 1001), p, torch.empty(0)).double(), p)  # odd count
    scaled = draw_keep_masks((4, 5), p, torch.empty(0), kept=1 / (1 - p))
    assert all(value == 0 or value == pytest.approx(1 / (1 - p)) for value in scaled.unique().tolist())


@pytest.mark.parametrize("p", [0.001, 0.05, 0.3, 0.9])
def test_sparse_positions_drop_each_entry_with_probability_p_independently(p):
    shape = (3, 333, 1001)
    positions = draw_dropped_positions(shape, p, torch.device("cpu"))
    assert positions.dtype == torch.float64 and torch.equal(positions, positions.floor())  # exact integers
    assert bool((positions[1:] > positions[:-1]).all())  # sorted, distinct
    assert positions.min() >= 0 and positions.max() < math.prod(shape)
    check_independent_with_rate(keep_mask_of(positions, shape), p)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_sparse_positions_top_up_when_the_first_batch_of_gaps_falls_short(p, monkeypatch):
    """Batches of three gaps force a top-up at almost every step: the positions still cover the whole mask with
    the right rate and independence (a missing top-up would leave the end of the mask undropped)."""
    monkeypatch.setattr(
        dropout, "math", types.SimpleNamespace(prod=math.prod, sqrt=math.sqrt, log1p=math.log1p, ceil=lambda v: 3)
    )
    shape = (3, 100, 100)
    positions = draw_dropped_positions(shape, p, torch.device("cpu"))
    assert bool((positions[1:] > positions[:-1]).all()) and positions.max() < math.prod(shape)
    keep = keep_mask_of(positions, shape)
    check_independent_with_rate(keep, p)
    assert abs(keep[2, 50:].mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / 5000)  # the end, too


def test_sparse_positions_of_an_empty_mask():
    assert draw_dropped_positions((3, 0, 8), 0.1, torch.device("cpu")).numel() == 0
