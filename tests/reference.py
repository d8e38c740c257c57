"""Loop forms of the methods, as the official code writes them; used only to check the fused forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d2mora_loop(x, A, B, router_A, router_B, scaling, dropped_inputs=None):
    """Official D2MoRA forward for one module, one expert at a time (d2mora.md §2).

    x: [..., d_in]; A: [M, r, d_in]; B: [N, d_out, r]; router_A: [M, d_in]; router_B: [N, r].
    dropped_inputs: optional list of M tensors like x, the input each A expert sees after its own dropout.
    """
    p = torch.softmax(x.double() @ router_A.double().T, dim=-1)
    z = torch.zeros(*x.shape[:-1], A.shape[1], dtype=torch.float64)
    for i in range(A.shape[0]):
        x_i = x if dropped_inputs is None else dropped_inputs[i]
        z = z + p[..., i : i + 1] * (x_i.double() @ A[i].double().T)
    q = torch.softmax(z @ router_B.double().T, dim=-1)
    delta = torch.zeros(*x.shape[:-1], B.shape[1], dtype=torch.float64)
    for j in range(B.shape[0]):
        delta = delta + q[..., j : j + 1] * (z @ B[j].double().T) * scaling
    return delta


def orthogonality_by_hand(experts: torch.Tensor, eps: float = 1e-6) -> float:
    """Σ_{i<j} |<a_i, a_j>| / ((|a_i| + eps)(|a_j| + eps)) with explicit Python loops, in float64."""
    vectors = [e.flatten().double() for e in experts]
    total = 0.0
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            norm_i = float(vectors[i].norm()) + eps
            norm_j = float(vectors[j].norm()) + eps
            total += abs(float(vectors[i] @ vectors[j])) / (norm_i * norm_j)
    return total


def lora_reference(x, A, B, scaling):
    return F.linear(F.linear(x.double(), A.double()), B.double()) * scaling


def recording_keep_masks(monkeypatch) -> list[torch.Tensor]:
    """Record the per-expert 0/1 keep masks `core.dropout` draws, from either form: the dense form's masks (drawn
    in forward and redrawn in backward) and the sparse form's dropped positions (drawn once, in forward)."""
    from moelora.core import dropout

    recorded = []
    draw_masks, draw_positions = dropout.draw_keep_masks, dropout.draw_dropped_positions

    def masks(shape, p, like, kept=1.0):
        mask = draw_masks(shape, p, like, kept)
        recorded.append(mask / kept)  # the 0/1 keep mask, whatever value the caller keeps
        return mask

    def positions(shape, p, device):
        dropped = draw_positions(shape, p, device)
        keep = torch.ones(shape, device=device)
        keep.view(-1)[dropped.long()] = 0.0
        recorded.append(keep)
        return dropped

    monkeypatch.setattr(dropout, "draw_keep_masks", masks)
    monkeypatch.setattr(dropout, "draw_dropped_positions", positions)
    return recorded


def check_masks_against_loop(
    layer, x, loop, params, p, monkeypatch, routing_in_python=False, experts_sharing_one_mask=None, form=None
) -> None:
    """The fused layer equals `loop(x, *params, dropped_inputs=...)` on the dropout masks it drew, in output and
    in every gradient (so backward used the forward's masks): a mask per expert by default, or one mask for all
    with `experts_sharing_one_mask` = the number of experts. A loop that routes in plain Python
    (`routing_in_python`) has gradients for the expert weights (the first two params) only. `form` ("sparse" or
    "dense") forces that form of core/dropout.py, whatever the device would choose."""
    from moelora.core import dropout

    if form is not None:
        monkeypatch.setattr(dropout, "_is_sparse", lambda requested, x: form == "sparse")
    masks = recording_keep_masks(monkeypatch)
    x = x.clone().requires_grad_()
    got = layer(x)
    assert len(masks) == 1 and masks[0].shape[1:] == x.shape
    keep = masks[0]
    if experts_sharing_one_mask is None:
        assert not torch.equal(keep[0], keep[1]), "masks must be independent across experts"
    else:
        assert keep.shape[0] == 1, "one mask for all experts"
        keep = keep.expand(experts_sharing_one_mask, *x.shape)
    got.double().pow(2).sum().backward()
    # the dense form redraws its masks in backward, the sparse form keeps its positions: either way the same
    assert len(masks) in (1, 2) and torch.equal(masks[0], masks[-1]), "backward must use the forward's masks"

    x_ref = x.detach().clone().requires_grad_()
    ref_params = [t.detach().clone().requires_grad_() for t in params]
    dropped = [x_ref * keep[i] / (1 - p) for i in range(keep.shape[0])]
    expected = layer.base_layer(x_ref).double() + loop(x_ref, *ref_params, dropped_inputs=dropped)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    expected.pow(2).sum().backward()
    if not routing_in_python:
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    checked = params[:2] if routing_in_python else params
    for param, ref in zip(checked, ref_params[: len(checked)], strict=True):
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-4, rtol=1e-4)
