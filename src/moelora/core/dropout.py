"""Per-expert dropout before per-expert projections, without keeping E dropped copies of x for backward.

D2MoRA, MoLoRA (and the CoMoL code it follows) and HydraLoRA draw an independent dropout mask per expert by
default, as their official code does:

    y[t, e] = A_e (m_e[t] ⊙ x[t]) / (1 - p)            m_e[t] ~ Bernoulli(1 - p)^d_in, independent over e and t
    dA_e    = Σ_t g[t, e] (m_e[t] ⊙ x[t])ᵀ / (1 - p)
    dx[t]   = Σ_e m_e[t] ⊙ (A_eᵀ g[t, e]) / (1 - p)

The plain form builds the E dropped copies of x and autograd keeps them: E·T·d_in values per module (3.3x PEFT
LoRA's saved bytes for D2MoRA's M = 3). `expert_dropout_projection` keeps only x (which the router keeps anyway)
and the weights, and has two forms of the same function. With E = 1 it is the one-mask dropout of LoRA and the
other methods that drop x once before their first projection (`dropped_projection`, CoMoL's drop1), which then
keep no dropped copy either:

- **sparse** (the default on a CPU): only the ~p·E·T·d_in dropped entries are drawn, as the gaps of a Bernoulli
  process (geometric, so each entry is dropped independently with probability p, exactly), and the dropout is a
  correction to the undropped projection: y = (A x - A_dropped(x)) / (1 - p), where the correction is a sparse
  matrix product over the dropped entries; backward corrects the dense gradients the same way. Work on the masks
  falls from E·T·d_in to p·E·T·d_in. Three int32 indices and x's value per dropped entry are saved for backward
  (for D2MoRA's M = 3 at p = 0.05 about 0.6 bytes per entry of x, against the 4 of x itself); with one mask
  only the entries' places in x, as backward then zeroes them instead of subtracting their terms.
- **dense** (the default on accelerators): E keep-masks from 32-bit integer draws, redrawn in backward from the
  saved RNG state. Its sizes are fixed, so it never waits for the device; the sparse form's position count is
  only known once drawn, which would stall a GPU's queue at every module.

Under autocast the GEMMs run in the autocast dtype (as a plain bmm would), forward and backward alike; the sparse
corrections are computed in fp32. `routed_expert_dropout_projection` adds the logits of a router that sees x
undropped, which the sparse form computes in the same (then fp32) GEMM as the projections.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch

from .layer import compute_dtype

if TYPE_CHECKING:
    from .layer import MoeLoraLayer

DropoutForm = Literal["auto", "sparse", "dense"]


def _random_int32(count: int, device: torch.device) -> torch.Tensor:
    """`count` independent uniform 32-bit integers from the default generator of `device`, two per 64-bit draw
    (`randint` costs the same per draw whatever its width)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 1) // 2,), dtype=torch.int64, device=device)
    return words.view(torch.int32)[:count]


def draw_keep_masks(shape: tuple[int, ...], p: float, like: torch.Tensor, kept: float = 1.0) -> torch.Tensor:
    """Keep-masks with P(keep) = 1 - p, from the generator of `like`'s device: `kept` where kept, 0 elsewhere.

    Each entry is an independent 32-bit integer compared with p's threshold, so p is exact to 2^-33;
    `bernoulli_` draws a double per entry, and E masks of a [T, d_in] input took as long as the frozen layer's GEMM
    on a CPU. Passing the dropout scale as `kept` makes the mask and the scaling one pass.
    """
    draws = _random_int32(math.prod(shape), like.device).view(shape)
    threshold = round(p * 2**32) - 2**31  # P(draw >= threshold) = 1 - p
    # torch.full, not torch.tensor: on a GPU a tensor built from a Python number is a host-to-device copy
    kept_value = torch.full((), kept, dtype=like.dtype, device=like.device)
    return torch.where(draws >= threshold, kept_value, 0.0)


def draw_dropped_positions(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """The sorted flat indices of the dropped entries of a mask of `shape`, each entry dropped independently with
    probability p: a Bernoulli process drawn by its gaps, which are geometric (about p·count draws, not count).

    A gap is floor(log V / log(1 - p)) + 1, so P(gap > k) = P(V <= (1 - p)^k) = (1 - p)^k, for V uniform on the
    2^32 midpoints of (0, 1) (one 32-bit integer per gap: exact to 2^-33, as `draw_keep_masks`' p; 1.6x faster
    than float64 uniforms and 3x faster than `geometric_` on a CPU). The positions, the gaps' running sum, come
    back as float64, exact integers below 2^53: their consumers divide them, and float64 division is 5x faster
    than int64's on a CPU. In the rare case the first batch of gaps ends before the last entry it tops up; the
    loop reads one number per batch, so it is for host-side use (the CPU form)."""
    count = math.prod(shape)
    batches, last = [torch.empty(0, dtype=torch.float64, device=device)], -1
    while last < count - 1:
        expected = (count - 1 - last) * p
        draws = _random_int32(math.ceil(expected + 6 * math.sqrt(expected) + 16), device)
        log_v = draws.double().add_(2**31 + 0.5).mul_(-(2**-32)).log1p_()  # log(1 - U), U on the midpoints
        positions = log_v.div_(math.log1p(-p)).floor_().add_(1.0).cumsum_(0).add_(last)
        batches.append(positions)
        last = int(positions[-1])
    positions = torch.cat(batches) if len(batches) > 2 else batches[-1]
    return positions[: int(torch.searchsorted(positions, float(count)))]


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


class _DenseExpertDropoutProjection(torch.autograd.Function):
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


class _DroppedEntries:
    """The dropped entries of the [E, T, d_in] masks, as the sparse [E·T, E·d_in] matrix of x's values there
    (block e holds expert e's; rows e·T + t, columns e·d_in + k), whose product with the experts stacked as
    [E·d_in, r] gives every expert's lost projection at once. `row` and `column` index the entries (`row` also a
    row of the output gradient as [E·T, r]), `x_index` = t·d_in + k their place in flat x, `row_starts` the CSR
    row pointers, `values` x there (fp32). The indices are int32 where the masks have fewer than 2^31 entries:
    backward keeps them (16 bytes per dropped entry with the values: for D2MoRA's M = 3 at p = 0.05 about 0.6
    bytes per entry of x), and MKL's sparse product is faster with them; `widened` gives the int64 ones that
    index_add_ and scatter_add_ need (several times slower with int32 indices on a CPU)."""

    def __init__(self, row, column, x_index, row_starts, values, shape: tuple[int, int, int]) -> None:
        self.row, self.column, self.x_index, self.row_starts = row, column, x_index, row_starts
        self.values, self.shape = values, shape

    @classmethod
    def at(cls, positions: torch.Tensor, x: torch.Tensor, experts: int) -> _DroppedEntries:
        """From the flat float64 positions in the [E, T, d_in] masks of x ([T, d_in]), which it overwrites.

        The index arithmetic runs in float64, in place where it can: exact, as every value is an integer below
        2^53 and floor(a / b) of such integers rounds to the true quotient; 5x faster than int64 division on a
        CPU; and each fresh [K] buffer costs page faults on a CPU (as much as the arithmetic, measured)."""
        tokens, features = x.shape
        index = torch.int32 if experts * x.numel() < 2**31 else torch.int64
        row = torch.div(positions, features).floor_()  # e·T + t
        expert = torch.div(row, tokens).floor_()
        row_index = row.to(index)
        feature = positions.add_(row, alpha=-features)  # k
        x_index = row.add_(expert, alpha=-tokens).mul_(features).add_(feature).to(index)  # t·d_in + k
        column = expert.mul_(features).add_(feature).to(index)  # e·d_in + k
        row_starts = row_starts_of(row_index, experts * tokens)
        values = x.float().reshape(-1).index_select(0, x_index)
        return cls(row_index, column, x_index, row_starts, values, (experts, tokens, features))

    def for_backward(self) -> tuple[torch.Tensor, ...]:
        return self.row, self.column, self.x_index, self.row_starts, self.values

    def widened(self) -> _DroppedEntries:
        """The same entries with int64 column, x_index and row pointers (row stays: index_select takes int32)."""
        column, x_index, row_starts = (index.long() for index in (self.column, self.x_index, self.row_starts))
        return _DroppedEntries(self.row, column, x_index, row_starts, self.values, self.shape)

    def matrix(self) -> torch.Tensor:
        experts, tokens, features = self.shape
        return csr_matrix(self.row_starts, self.column, self.values, (experts * tokens, experts * features))


def csr_matrix(row_starts: torch.Tensor, column: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
    """A sparse CSR matrix from indices its callers build valid (so unchecked), without torch's beta warning
    ("sparse CSR support is in beta": nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts, column, values, shape, check_invariants=False)


def row_starts_of(row: torch.Tensor, rows: int) -> torch.Tensor:
    """The CSR row pointers (rows + 1, `row`'s dtype) of the sorted row indices `row` of a matrix of `rows` rows."""
    row_starts = torch.zeros(rows + 1, dtype=row.dtype, device=row.device)
    torch.cumsum(torch.bincount(row, minlength=rows), 0, dtype=row.dtype, out=row_starts[1:])
    return row_starts


def _projection_rows(weight: torch.Tensor, router: torch.Tensor, dtype: torch.dtype, width: int = 0) -> torch.Tensor:
    """[E, r, d_in] experts and [m, d_in] router as the rows of one GEMM in `dtype`, zero rows up to `width`."""
    rows = [weight.to(dtype).reshape(-1, weight.shape[-1]), router.to(dtype)]
    padding = width - len(rows[0]) - len(router)
    if padding > 0:
        rows.append(weight.new_zeros(padding, weight.shape[-1], dtype=dtype))
    return torch.cat(rows)


def _stacked(weight: torch.Tensor) -> torch.Tensor:
    """[E, r, d_in] experts as fp32 rows [E·d_in, r]: row e·d_in + k is expert e's column k."""
    experts, rank, features = weight.shape
    return weight.float().transpose(1, 2).reshape(experts * features, rank)


def _padded_width(width: int) -> int:
    """The output width the forward GEMM is zero-padded to: the next multiple of 8 for widths 9 to 63. A [T, n]
    output of x @ Wᵀ took MKL 1.6-2x as long at n = 27 (D2MoRA's M·r + M) or 31 (CoMoL's r at the SmolLM2
    budget) as at 32 on the 2-core VM; the rows are concatenated anyway, so the zeros cost nothing extra."""
    return -(-width // 8) * 8 if 8 < width < 64 else width


#: sampled_addmm on a CPU takes a scalar path for inner sizes 2 to 7, about 10x slower than for 8 (MoLoRA's r 4
#: at the matched budget); zero-padding the rank to this many costs a copy of two small matrices.
_SAMPLED_MIN_RANK = 8


def dot_products_at(pattern: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left[row] · right[:, column] at every entry of the CSR `pattern`, in its order ([rows, r], [r, columns])."""
    rank = left.shape[1]
    if 1 < rank < _SAMPLED_MIN_RANK:
        left = torch.nn.functional.pad(left, (0, _SAMPLED_MIN_RANK - rank))
        right = torch.nn.functional.pad(right, (0, 0, 0, _SAMPLED_MIN_RANK - rank))
    return torch.sparse.sampled_addmm(pattern, left, right, beta=0.0).values()


class _SparseExpertDropoutProjection(torch.autograd.Function):
    """The sparse form; `router` ([m, d_in], m = 0 for none) projects the undropped x in the same GEMM."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, router: torch.Tensor, p: float):
        (experts, rank, features), tokens = weight.shape, x.shape[0]
        # a router's logits are fp32 under autocast too, so a GEMM shared with one runs in fp32 (or wider)
        dtype = compute_dtype(x, x.dtype)
        dtype = torch.promote_types(dtype, torch.float32) if len(router) else dtype
        dropped = _DroppedEntries.at(draw_dropped_positions((experts, tokens, features), p, x.device), x, experts)
        ctx.p, ctx.dtype = p, dtype
        # one mask: backward needs only where x was dropped (`_one_mask_gradients`)
        ctx.save_for_backward(x, weight, router, *(dropped.x_index,) if experts == 1 else dropped.for_backward())
        with torch.autocast(x.device.type, enabled=False):
            width = experts * rank + len(router)
            rows = _projection_rows(weight, router, dtype, _padded_width(width))
            whole = x.to(dtype) @ rows.T  # [T, E·r + m (+ padding)], nothing dropped
            lost = dropped.matrix() @ _stacked(weight)
            kept = whole[:, : experts * rank].float().view(tokens, experts, rank)
            kept = kept - lost.view(experts, tokens, rank).transpose(0, 1)
            logits = whole[:, experts * rank : width].float()
            return (kept * (1.0 / (1.0 - p))).to(dtype), logits  # [T, E, r], [T, m]

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_logits: torch.Tensor):
        x, weight, router, *saved = ctx.saved_tensors
        (experts, rank, features), tokens = weight.shape, x.shape[0]
        grad_x = grad_weight = grad_router = None
        with torch.autocast(x.device.type, enabled=False):
            grad = grad.to(ctx.dtype) * (1.0 / (1.0 - ctx.p))  # [T, E, r]
            if experts == 1:
                return *_one_mask_gradients(ctx, x, weight, router, saved[0], grad.squeeze(1), grad_logits), None
            dropped = _DroppedEntries(*saved, (experts, tokens, features)).widened()
            grad_whole = torch.cat([grad.reshape(tokens, experts * rank), grad_logits.to(ctx.dtype)], dim=1)
            # negated, so the terms of the dropped entries come out ready to add: no pass over them to negate
            neg_grad_by_rank = grad.float().permute(2, 1, 0).neg().reshape(rank, experts * tokens)  # cols e·T + t
            if ctx.needs_input_grad[0]:
                whole = (grad_whole @ _projection_rows(weight, router, ctx.dtype)).float()  # [T, d_in]
                # the whole gradient's terms at the dropped entries: one sampled product, in the matrix's order
                pattern = dropped.matrix()
                neg_lost = dot_products_at(pattern, neg_grad_by_rank.T, _stacked(weight).T)
                # a negated source, not alpha=-1 (a slow path on a CPU); scatter_add_ is 1.3x index_add_'s speed
                grad_x = whole.view(-1).scatter_add_(0, dropped.x_index, neg_lost).view_as(x).to(x.dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                whole = (grad_whole.T @ x.to(ctx.dtype)).float()  # [E·r + m, d_in]
                grad_router = whole[experts * rank :].to(router.dtype)
                by_rank = whole[: experts * rank].view(experts, rank, features).transpose(0, 1)
                by_rank = by_rank.reshape(rank, experts * features)
                neg_lost = neg_grad_by_rank.index_select(1, dropped.row).mul_(dropped.values)  # [r, K]
                # along dim 1 of [r, E·d_in]: 2-3x faster on a CPU than rows of [E·d_in, r]
                by_rank.index_add_(1, dropped.column, neg_lost)
                grad_weight = by_rank.view(rank, experts, features).transpose(0, 1).to(weight.dtype)
        return grad_x, grad_weight, grad_router, None


def _one_mask_gradients(ctx, x, weight, router, x_index, grad, grad_logits) -> tuple[torch.Tensor | None, ...]:
    """The gradients of x, the weight ([1, r, d_in]) and the router under one mask (E = 1), from the dropped
    entries' places in x alone: m ⊙ (G A) is G A with those entries zeroed, and Gᵀ (m ⊙ x) one GEMM with a copy
    of x zeroed there. That is K writes where the experts' form (a mask each) corrects by K·r products, gathers
    and scatters, 2-3x the time at LoRA's r 40 on a CPU, and 4 bytes kept per dropped entry instead of 16."""
    x_index, dtype = x_index.long(), ctx.dtype
    grad_x = grad_weight = grad_router = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight[0].to(dtype)  # [T, d_in]
        grad_x.view(-1).index_fill_(0, x_index, 0.0)
        if len(router):  # the router saw x undropped
            grad_x.addmm_(grad_logits.to(dtype), router.to(dtype))
        grad_x = grad_x.to(x.dtype)
    if ctx.needs_input_grad[1]:
        dropped = x.to(dtype, copy=True).view(-1).index_fill_(0, x_index, 0.0).view_as(x)
        grad_weight = (grad.T @ dropped).unsqueeze(0).to(weight.dtype)
    if ctx.needs_input_grad[2] and len(router):
        grad_router = (grad_logits.to(dtype).T @ x.to(dtype)).to(router.dtype)
    return grad_x, grad_weight, grad_router


def _check(p: float, form: str) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"expert_dropout_projection needs 0 < p < 1, got {p!r}")
    if form not in ("auto", "sparse", "dense"):
        raise ValueError(f"expert_dropout_projection: form must be 'auto', 'sparse' or 'dense', got {form!r}")


def sparse_dropout_on(device: torch.device) -> bool:
    """Whether dropout takes its sparse form (drawn dropped entries, subtracted terms) on `device`: on a CPU, where
    it saves the passes over the masks; not on an accelerator, where its data-dependent sizes would make the host
    wait for the device at every module. CoMoL's core dropout follows the same rule."""
    return device.type == "cpu"


def _is_sparse(form: DropoutForm, x: torch.Tensor) -> bool:
    return form == "sparse" or (form == "auto" and sparse_dropout_on(x.device))


def expert_dropout_projection(
    x: torch.Tensor, weight: torch.Tensor, p: float, form: DropoutForm = "auto"
) -> torch.Tensor:
    """[T, d_in] x, [E, r, d_in] weight -> [T, E, r]: each expert projects x under its own dropout mask.

    `form` "auto" takes the sparse form on a CPU and the dense one elsewhere (module docstring); both compute the
    same function with masks of the same distribution. A weight shared by all experts (HydraLoRA's single A) can
    be passed as `A.expand(E, r, d_in)`."""
    _check(p, form)
    if _is_sparse(form, x):
        return _SparseExpertDropoutProjection.apply(x, weight, weight.new_zeros(0, x.shape[-1]), p)[0]
    return _DenseExpertDropoutProjection.apply(x, weight, p)


def dropped_projection(x: torch.Tensor, weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.linear(F.dropout(x, p, training), weight) ([T, d_in] x, [r, d_in] weight -> [T, r]) without a dropped
    copy of x: in training with p > 0 one mask through `expert_dropout_projection` (on a CPU only the dropped
    entries are drawn and their terms subtracted; elsewhere the mask is redrawn in backward). The single-mask
    methods (LoRA, MoSLoRA, MALoRA's shared subspace, SMoRA) project through it."""
    if training and p > 0:
        return expert_dropout_projection(x, weight.unsqueeze(0), p).squeeze(1)
    return torch.nn.functional.linear(x, weight)


def routed_expert_dropout_projection(
    x: torch.Tensor, weight: torch.Tensor, router: torch.Tensor, p: float, form: DropoutForm = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_dropout_projection` and the logits x routerᵀ ([m, d_in] router, [T, m] fp32 logits, autocast or
    not) of a router that sees x undropped. The sparse form projects x once for both, in one fp32 GEMM (its
    projections come out fp32): one pass over x forward and two backward instead of two and four plus a sum."""
    _check(p, form)
    if _is_sparse(form, x):
        return _SparseExpertDropoutProjection.apply(x, weight, router, p)
    with torch.autocast(x.device.type, enabled=False):
        logits = torch.nn.functional.linear(x.float(), router.float())
    return _DenseExpertDropoutProjection.apply(x, weight, p), logits


def routed_projections(
    layer: MoeLoraLayer, x: torch.Tensor, experts: torch.Tensor, router: torch.Tensor, key: str, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The A side D2MoRA, MoLoRA, HydraLoRA and MALoRA share: a softmax router over x undropped ([m, d_in]
    router; fp32 probabilities [T, m], recorded under `key`) and E experts ([E, r, d_in]) projecting x under
    dropout p, each under its own mask (E = 1: one mask for everything stacked in it) -> (probabilities,
    projections [T, E, r]). In training with p > 0 both come from `routed_expert_dropout_projection`; otherwise
    from the router and one GEMM."""
    if layer.training and p > 0:
        projections, logits = routed_expert_dropout_projection(x, experts, router, p)
        return layer.router_probabilities(logits, key), projections
    projections = torch.nn.functional.linear(x, experts.reshape(-1, x.shape[-1]))
    return layer.softmax_router(x, router, key), projections.view(x.shape[0], experts.shape[0], -1)
