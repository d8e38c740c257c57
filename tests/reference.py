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
