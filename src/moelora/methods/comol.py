"""CoMoL, Core Space Mixture of LoRA (arXiv 2603.00573, ACL 2026 Findings; official code name `mocorelora`).

Specs: comol.md (§2 forward, §3 variants, §5 counts, §11 choices) and baselines.md §5 (dropout placement).

Per module, shared LoRA factors A in R^{r x d_in} and B in R^{d_out x r}, E core experts C_i in R^{r x r} and a
bias-free router W_g (E x r with the core router, E x d_in without it); s = alpha / r. Per token x (row vector):

    h    = drop1(x) A^T                              the shared down-projection, in R^r (drop1 as core/dropout.py
                                                     draws it: no dropped copy of x is kept)
    g    = softmax(h W_g^T)  (core router)           dense, fp32; the router inherits the input dropout
         = softmax(x W_g^T)  (core_router=False)     "CoMoL w/o CR": raw x, no dropout
    C(x) = sum_i g_i C_i                             soft-merged core, r x r
    z    = drop3(h drop2(C(x)))                      h is a row vector right-multiplied by the core
    dy   = s z B^T                                   so ΔW(x) = s B C(x)^T A: token-dependent, never mergeable

The three dropouts draw independent masks; the official code gives them all p = lora_dropout (0.1).

Two paths for the core (`core_path`), neither with a Python loop over experts:
- "exact" (the official computation): drop2 acts element-wise on the merged core C(x) of each token. On an
  accelerator C(x) is materialised as a [tokens, r, r] tensor by one (tokens x E)(E x r^2) matmul, masked, and
  z = h C(x) by a batched matmul; on a CPU the same function without materialising it: the fast form below
  minus the terms of the dropped entries (`core_product_with_dropout`). Only while drop2 is active (training
  with core dropout > 0); otherwise it runs the fast form, which is then the same function.
- "fast": z = sum_i g_i (h C_i) = vec(g ⊗ h) C_cat with C_cat = [C_1; ...; C_E] (E r x r): one matmul, E r^2
  per token, no per-token core. drop2 cannot be moved onto the h C_i, so this path omits it (drop1 and drop3
  stay): a documented deviation, exact when the core dropout is 0.
- "auto" (default) = "exact" for r <= 32 and "fast" above, the spec's rule (comol.md §2): the [tokens, r, r]
  activations grow with r^2 and get heavy at r = 64 or 128.
Routers, softmaxes and the core-space products run in fp32 even under bf16/fp16 autocast; the A and B GEMMs
follow autocast.

Init (§2): A and every C_i ~ U(±1/sqrt(fan_in)) (nn.Linear's kaiming_uniform(a=sqrt(5)); fan_in = d_in for A,
r for C_i), the router ~ the default nn.Linear init, B = 0: dy = 0 at init and only B gets a gradient at step 0.

Choices the source does not settle ([INF] in comol.md; each is an option):
- `core_path`, above (§2).
- `top_k`: the code routes densely over all E (the default); the abstract speaks of "activated" experts, so an
  optional top-k renormalised over the selected experts is offered for ablations (§11).
- `core_orthogonal_loss_weight`: commit b9aac3d has no auxiliary loss for CoMoL (default 0); the newer README
  mentions "core losses", so an optional penalty λ Σ_{i<j} |cos(vec C_i, vec C_j)| per module is offered (§11).
- `layer_shared` ("mocorelorash", §3): one A and one B per projection type (the module name's last component,
  e.g. q_proj) shared by all layers; cores and routers stay per layer. The tuner ties the per-layer tensors
  after injection (PEFT's `_post_injection_hook`), so checkpoints hold one identical copy per layer and loading
  re-ties them; a checkpoint whose copies differ is refused. The official variant has no core dropout, so
  `core_dropout=None` means 0 there.
- Transpose convention (§2): z = h C_i with h a row vector; it only matters when porting official checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MoeLoraConfig, check_positive
from ..core.dropout import (
    csr_matrix,
    dot_products_at,
    draw_dropped_positions,
    routed_expert_dropout_projection,
    row_starts_of,
    sparse_dropout_on,
)
from ..core.layer import MoeLoraLayer
from ..core.losses import pairwise_abs_cosine
from ..core.routing import expert_softmax, top_k_renormalized
from ..core.tuner import CheckpointMismatchError, MoeLoraTuner

CORE_PATHS = ("auto", "exact", "fast")
#: Largest rank at which `core_path="auto"` keeps the exact (materialised-core) path (comol.md §2).
AUTO_EXACT_MAX_RANK = 32


@dataclass
class CoMoLConfig(MoeLoraConfig):
    """CoMoL adapter config. Defaults follow the official recipe (comol.md §6): r = alpha = 16, E = 8, core
    router, dropout 0.1. The paper adapts q_proj, k_proj, v_proj, o_proj and down_proj: set `target_modules` to
    those (the library-wide default is q/k/v)."""

    PEFT_TYPE = "COMOL"

    r: int = field(
        default=16, metadata={"help": "Rank of the shared A and B, and size of each r x r core (official: 16)."}
    )
    lora_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator: the update is scaled by alpha / r (official: alpha = r)."}
    )
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout p on the adapter input (official: 0.1); also the core dropout when that is None."},
    )
    num_experts: int = field(default=8, metadata={"help": "E, the number of r x r core experts (official: 8)."})
    core_router: bool = field(
        default=True,
        metadata={
            "help": "Route on the low-rank h = A drop(x) with an E x r router (the paper's CoMoL). False routes on "
            "the raw x with an E x d_in router (the 'CoMoL w/o CR' ablation)."
        },
    )
    core_path: str = field(
        default="auto",
        metadata={
            "help": "'exact': dropout on the merged per-token core, materialised as [tokens, r, r] while that "
            "dropout is active (official). 'fast': never materialises per-token cores and omits that dropout "
            f"(exact when the core dropout is 0). 'auto': exact for r <= {AUTO_EXACT_MAX_RANK}, fast above."
        },
    )
    core_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout p on the merged core and on the core output h C(x). None: as the official code, "
            "lora_dropout for CoMoL and 0 for the layer-shared variant."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "None: dense softmax over all experts (official). k: keep the k largest gates per token and "
            "renormalise them to sum to 1 (an ablation, not in the official code)."
        },
    )
    core_orthogonal_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ of λ Σ_{i<j} |cos(vec C_i, vec C_j)| per module, added to the loss. 0 (official: no "
            "auxiliary loss) turns it off; not from the source, around 1e-3 is a starting point."
        },
    )
    layer_shared: bool = field(
        default=False,
        metadata={
            "help": "Share A and B across layers per projection type, keeping cores and routers per layer (the "
            "official 'mocorelorash' variant). Checkpoints store one copy per layer, re-tied on load."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(self, "num_experts")
        if self.core_path not in CORE_PATHS:
            raise ValueError(f"{name}.core_path must be one of {CORE_PATHS}, got {self.core_path!r}")
        if self.core_dropout is not None and not 0.0 <= self.core_dropout < 1.0:
            raise ValueError(f"{name}.core_dropout must be None or in [0, 1), got {self.core_dropout!r}")
        if self.top_k is not None:
            check_positive(self, "top_k")
            if self.top_k > self.num_experts:
                raise ValueError(f"{name}.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.core_orthogonal_loss_weight < 0:
            raise ValueError(
                f"{name}.core_orthogonal_loss_weight must be >= 0, got {self.core_orthogonal_loss_weight!r}"
            )
        for flag in ("core_router", "layer_shared"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def resolved_core_path(self) -> str:
        """'exact' or 'fast' ('auto' resolved by the rank)."""
        if self.core_path == "auto":
            return "exact" if self.r <= AUTO_EXACT_MAX_RANK else "fast"
        return self.core_path

    @property
    def resolved_core_dropout(self) -> float:
        if self.core_dropout is not None:
            return self.core_dropout
        return 0.0 if self.layer_shared else self.lora_dropout


class _DroppedCoreTerms(torch.autograd.Function):
    """D[t, b] = Σ over the dropped entries (a, b) of token t of h[t, a] C(x)[t, a, b], C(x)[t] = Σ_i g[t, i] C_i,
    from the entries' flat positions t·r² + a·r + b. The merged cores are never formed: C(x) at the dropped
    entries is one sampled product of g and the cores over the entries' CSR pattern in [T, r²] (K·E products, not
    T·E·r²); backward takes the gates' gradient from that pattern's sparse product with the cores, and the cores'
    gradient from g's columns gathered at the entries. Forming C(x) ([T, r²]: 961 values a token at r 31, in
    forward and again in backward, with a dense [T, r²] gradient) cost as much as the rest of the layer."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, h: torch.Tensor, flat_cores: torch.Tensor, positions: torch.Tensor):
        pattern = _core_pattern(positions, *h.shape)
        _, z_at, h_values, merged = _terms_at(g, h, flat_cores, *pattern)
        ctx.save_for_backward(g, h, flat_cores, *pattern)
        return torch.zeros(h.numel(), dtype=h.dtype, device=h.device).scatter_add_(0, z_at, h_values.mul_(merged))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, h, flat_cores, row, column, row_starts = ctx.saved_tensors
        tokens, rank = h.shape
        h_at, z_at, h_values, merged = _terms_at(g, h, flat_cores, row, column, row_starts)
        grad_lost = grad.reshape(-1).index_select(0, z_at)  # [K]
        grad_h = torch.zeros(h.numel(), dtype=h.dtype, device=h.device).scatter_add_(0, h_at, grad_lost * merged)
        grad_merged = grad_lost.mul_(h_values)  # the gradient of C(x) at the dropped entries
        grad_g = csr_matrix(row_starts, column, grad_merged, (tokens, rank**2)) @ flat_cores.T.contiguous()
        # along dim 1 of [E, r²] (as core/dropout.py's expert gradients): faster on a CPU than rows of [r², E]
        gathered = g.T.contiguous().index_select(1, row).mul_(grad_merged)  # [E, K]
        grad_cores = torch.zeros_like(flat_cores).index_add_(1, column.long(), gathered)
        return grad_g, grad_h.view_as(h), grad_cores, None


def _core_pattern(positions: torch.Tensor, tokens: int, rank: int) -> tuple[torch.Tensor, ...]:
    """For flat float64 positions t·r² + a·r + b (as core/dropout.py draws them): their CSR pattern in [T, r²],
    rows t, columns a·r + b and row pointers, int32 (int64 from 2^31 entries). Float64 arithmetic as there: exact
    for integers below 2^53, and 5x faster than int64 division on a CPU."""
    index = torch.int32 if tokens * rank * rank < 2**31 else torch.int64
    row = torch.div(positions, rank * rank).floor_()
    column = torch.add(positions, row, alpha=-(rank * rank)).to(index)
    row = row.to(index)
    return row, column, row_starts_of(row, tokens)


def _core_entries(row: torch.Tensor, column: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h's entry t·r + a and z's entry t·r + b (int64) of the core entries at row t, column a·r + b."""
    a = torch.div(column, rank).floor_()  # float32 true division: exact floors below 2^24
    b = column.double().add_(a, alpha=-rank)
    token_start = row.double().mul_(rank)
    return a.double().add_(token_start).long(), b.add_(token_start).long()


def _terms_at(g, h, flat_cores, row, column, row_starts) -> tuple[torch.Tensor, ...]:
    """At the dropped core entries of the pattern (row t, column a·r + b): h's and z's entries (int64), h[t, a]
    and C(x)[t, a, b] by one sampled product of the gates and the cores."""
    tokens, rank = h.shape
    h_at, z_at = _core_entries(row, column, rank)
    h_values = h.reshape(-1).index_select(0, h_at)
    merged = dot_products_at(csr_matrix(row_starts, column, h_values, (tokens, rank**2)), g, flat_cores)
    return h_at, z_at, h_values, merged


def core_product_with_dropout(g: torch.Tensor, h: torch.Tensor, cores: torch.Tensor, p: float) -> torch.Tensor:
    """z[t] = h[t] (C(x)[t] ⊙ m[t]) / (1 - p), C(x)[t] = Σ_i g[t, i] C_i, m[t] ~ Bernoulli(1 - p) on each entry of
    the r x r merged core (the exact path's drop2), in fp32: g [T, E], h [T, r], cores [E, r, r] -> [T, r].

    On a CPU C(x) is not materialised: the fast form's h C(x) minus the terms of the ~p·T·r² dropped entries,
    h[t, a] Σ_i g[t, i] C_i[a, b] taken from z[t, b], the entries drawn as core/dropout.py draws them (each
    independently with probability p) and only their positions kept for backward. At r 31 a token's core (961
    values) outweighs SmolLM2's input (576), so masking it cost more than the rest of the layer. Elsewhere C(x) is
    materialised ([T, r, r], one GEMM) and masked: fixed sizes, where the sparse draw would wait for the device."""
    (experts, rank, _), tokens = cores.shape, h.shape[0]
    flat_cores = cores.reshape(experts, rank * rank)
    if not sparse_dropout_on(h.device):
        merged = (g @ flat_cores).view(tokens, rank, rank)
        return torch.bmm(h.unsqueeze(1), F.dropout(merged, p, training=True)).squeeze(1)
    whole = (g.unsqueeze(-1) * h.unsqueeze(1)).reshape(tokens, experts * rank) @ cores.reshape(experts * rank, rank)
    positions = draw_dropped_positions((tokens, rank, rank), p, h.device)  # t·r² + a·r + b
    lost = _DroppedCoreTerms.apply(g, h, flat_cores, positions).view_as(whole)
    return (whole - lost) * (1.0 / (1.0 - p))


class CoMoLLinear(MoeLoraLayer):
    adapter_layer_names = ("comol_A", "comol_B", "comol_cores", "comol_router")
    merge_unsupported_reason = "with more than one core, its merged core C(x) depends on each token through the router"

    def create_parameters(self, config: CoMoLConfig) -> dict[str, torch.Tensor]:
        e, r, d_in = config.num_experts, config.r, self.in_features
        up = self.up_init(self.out_features, r, config=config)
        router_in = r if config.core_router else d_in
        return {
            "comol_A": self.linear_init(r, d_in, fan_in=d_in),
            "comol_B": up,
            "comol_cores": self.linear_init(e, r, r, fan_in=r),
            "comol_router": self.linear_init(e, router_in, fan_in=router_in),
        }

    @staticmethod
    def gates(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
        """fp32 softmax over the experts; with top_k, the k largest renormalised to sum to 1 (dense, masked)."""
        probs = expert_softmax(logits.float())
        if top_k is None or top_k >= probs.shape[-1]:
            return probs
        return top_k_renormalized(probs, top_k)[0]

    def compute_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        config: CoMoLConfig = self.adapter_config[adapter_name]
        A, B = self.comol_A[adapter_name], self.comol_B[adapter_name]  # [r, d_in], [d_out, r]
        cores = self.comol_cores[adapter_name].float()  # [E, r, r]
        (e, r, _), tokens = cores.shape, x.shape[0]
        p_core = config.resolved_core_dropout if self.training else 0.0

        router = self.comol_router[adapter_name]
        raw_logits = None  # the logits of a router on the raw x ("w/o CR"), when drop1 computes them too
        if self.training and config.lora_dropout > 0:
            # drop1, then the shared A, without a dropped copy of x (core/dropout.py); a router on the raw x
            # shares that GEMM
            raw_router = router.new_zeros(0, x.shape[-1]) if config.core_router else router
            h, raw_logits = routed_expert_dropout_projection(x, A.unsqueeze(0), raw_router, config.lora_dropout)
            h = h.squeeze(1)
        else:
            h = F.linear(x, A)
        with torch.autocast(x.device.type, enabled=False):
            h = h.float()
            if config.core_router:
                logits = F.linear(h, router.float())
            else:
                logits = raw_logits if raw_logits is not None else F.linear(x.float(), router.float())
            g = self.gates(logits, config.top_k)  # [T, E]
            self.routing.record(f"{adapter_name}/router", g)
            if p_core > 0 and config.resolved_core_path == "exact":
                z = core_product_with_dropout(g, h, cores, p_core)  # drop2, element-wise on the merged core
            else:
                z = (g.unsqueeze(-1) * h.unsqueeze(1)).reshape(tokens, e * r) @ cores.reshape(e * r, r)
            z = F.dropout(z, p_core, self.training)  # drop3
        return F.linear((z * config.scaling).to(x.dtype), B)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """With one core (CoRe / MoSLoRA) the gate is 1 for every token: ΔW = s B C_1^T A merges exactly."""
        config: CoMoLConfig = self.adapter_config[adapter_name]
        if config.num_experts != 1:
            return super().get_delta_weight(adapter_name)
        core = self.comol_cores[adapter_name][0]
        return config.scaling * self.comol_B[adapter_name] @ core.T @ self.comol_A[adapter_name]

    def auxiliary_losses(self, adapter_name: str) -> dict[str, torch.Tensor]:
        weight = self.adapter_config[adapter_name].core_orthogonal_loss_weight
        if weight == 0:
            return {}
        return {"core_orthogonality": weight * pairwise_abs_cosine(self.comol_cores[adapter_name])}


#: The tensors the layer-shared variant ties across layers.
SHARED_FACTORS = ("comol_A", "comol_B")


def _shared_groups(model: nn.Module, adapter_name: str) -> dict[str, list[tuple[str, CoMoLLinear]]]:
    """The modules adapted by `adapter_name`, grouped by projection type (the last component of their name)."""
    groups: dict[str, list[tuple[str, CoMoLLinear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, CoMoLLinear) and adapter_name in module.comol_A:
            groups.setdefault(name.rsplit(".", 1)[-1], []).append((name, module))
    return groups


class CoMoLTuner(MoeLoraTuner):
    prefix = "comol_"
    tuner_layer_cls = CoMoLLinear

    def _post_injection_hook(self, model: nn.Module, config: CoMoLConfig, adapter_name: str) -> None:
        """Layer-shared variant: every module of a projection type takes the first one's A and B."""
        super()._post_injection_hook(model, config, adapter_name)
        if not config.layer_shared:
            return
        for kind, ((first_name, first), *others) in _shared_groups(model, adapter_name).items():
            for name, module in others:
                for factor in SHARED_FACTORS:
                    leader, own = getattr(first, factor)[adapter_name], getattr(module, factor)[adapter_name]
                    if leader.shape != own.shape or leader.device != own.device:
                        raise ValueError(
                            f"CoMoLConfig.layer_shared: {name!r} and {first_name!r} are both {kind!r} but their "
                            f"{factor} differ ({tuple(own.shape)} on {own.device} vs {tuple(leader.shape)} on "
                            f"{leader.device}); target modules of one shape and device per name"
                        )
                    if own.is_meta and not module.get_base_layer().weight.is_meta:
                        raise ValueError(
                            "CoMoLConfig.layer_shared adapters cannot be loaded with low_cpu_mem_usage=True: "
                            "assign-loading would untie the shared A and B"
                        )
                    getattr(module, factor)[adapter_name] = leader

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: CoMoLConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Besides the strict key checks: a layer-shared checkpoint must hold identical copies per projection
        type, since loading writes them all into one tensor and would silently keep only the last."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if not getattr(config, "layer_shared", False):
            return remapped
        for kind in _shared_groups(model, adapter_name):
            for factor in SHARED_FACTORS:
                suffix = f".{kind}.{factor}.{adapter_name}"
                copies = [value for key, value in remapped.items() if key.endswith(suffix)]
                if any(not torch.equal(copies[0], value) for value in copies[1:]):
                    raise CheckpointMismatchError(
                        f"layer-shared CoMoL checkpoint ({adapter_name!r}) holds differing {factor} copies for "
                        f"{kind!r}; they must be identical"
                    )
        return remapped
