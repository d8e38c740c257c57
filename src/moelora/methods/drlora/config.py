"""DR-LoRA configuration: every default the spec had to choose ([INF], specs: drlora.md §8) is a field here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import MoeLoraConfig, check_positive

EXPERT_MATRICES = ("gate", "up", "down")
SCHEDULES = ("grow", "uniform")
SALIENCIES = ("full", "frequency", "importance")
RANK_UNITS = ("expert", "matrix")
SCALING_RANKS = ("target", "active")
AWARDS = ("greedy", "one_pass")
FREQUENCY_WEIGHTS = ("top_k", "softmax")
IMPORTANCE_AGGREGATIONS = ("mean", "sum")
A_INITS = ("uniform", "gaussian")
NEW_SLICE_UPDATES = ("bias_correction", "lr_ramp", "none")


@dataclass
class DRLoRAConfig(MoeLoraConfig):
    """DR-LoRA: LoRA on the routed experts of an MoE model, ranks grown by expert saliency under a budget.

    `DRLoRAConfig()` applies to any supported MoE model (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, PhiMoE in
    transformers v5): the routed-experts modules are found from the architecture. Growth needs the training
    loop to call the tuner between steps; the moelora pipeline attaches `DRLoRACallback` for that.
    """

    PEFT_TYPE = "DRLORA"

    r: int = field(
        default=8,
        metadata={
            "help": "r_target: the average rank per expert (the uniform-LoRA baseline's rank). Every MoE layer ends "
            "with N * r_target ranks in total, N being its number of routed experts (per matrix with "
            "rank_unit='matrix')."
        },
    )
    lora_alpha: float = field(
        default=16,
        metadata={
            "help": "Scaling numerator. With scaling_rank='target' the update is scaled by alpha / r_target whatever "
            "the active rank, so activating ranks never rescales trained directions."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex of the routed-experts modules to adapt. Default: every "
            "'experts' module of a supported MoE block. Attention and shared experts are not adapted [INF]."
        },
    )
    expert_matrices: list[str] = field(
        default_factory=lambda: list(EXPERT_MATRICES),
        metadata={"help": "Which SwiGLU matrices of each expert get LoRA: any of gate, up, down [BG]."},
    )
    r_init: int | None = field(
        default=None,
        metadata={"help": "[INF] Starting rank of every expert (default r_target // 2, at least 1; r for uniform)."},
    )
    r_max: int | None = field(
        default=None,
        metadata={
            "help": "[INF] Preallocated rank of every expert, the growth cap (default 4 * r_target; r for uniform)."
        },
    )
    schedule: str = field(
        default="grow",
        metadata={
            "help": "'grow' (DR-LoRA) or 'uniform': the baseline, every expert at fixed rank r_target (r_init and "
            "r_max default to r_target, so it costs what a plain expert LoRA costs)."
        },
    )
    saliency: str = field(
        default="full",
        metadata={
            "help": "Saliency signal: 'full' = frequency x importance / penalty; ablations 'frequency' "
            "(frequency / penalty) and 'importance' (importance / penalty)."
        },
    )
    rank_unit: str = field(
        default="expert",
        metadata={
            "help": "[INF] Unit of rank: 'expert' (one rank shared by the expert's adapted matrices) or 'matrix' "
            "(each adapted matrix of each expert grows on its own; the layer budget is then N * r per matrix)."
        },
    )
    scaling_rank: str = field(
        default="target",
        metadata={
            "help": "[INF] Scaling c: 'target' = alpha / r_target (growth is function-preserving) or 'active' = "
            "alpha / R (the output jumps at every growth event)."
        },
    )
    unfreeze_router: bool = field(
        default=True,
        metadata={
            "help": "Train the base router after the warmup (a saved delta on its weight). False keeps it frozen "
            "for the whole run (the 'router always frozen' ablation)."
        },
    )
    warmup_ratio: float = field(
        default=0.1,
        metadata={
            "help": "[INF] W as a fraction of the training steps: router frozen, statistics accumulate, no growth "
            "(spec: 5-10%). Growth starts at W."
        },
    )
    growth_end_ratio: float = field(
        default=0.75,
        metadata={
            "help": "[INF] t_end as a fraction of the training steps: the last growth event; ranks frozen after."
        },
    )
    num_growth_events: int = field(
        default=8, metadata={"help": "[INF] K, growth events evenly spaced in (W, t_end], the last one at t_end."}
    )
    rank_increment: int = field(
        default=1, metadata={"help": "[INF] Δr, the ranks one award gives an expert (spec: 1 or 2)."}
    )
    award: str = field(
        default="greedy",
        metadata={
            "help": "[INF] 'greedy': after each award the capacity penalty of the winner is updated and the next "
            "award goes to the new maximum; 'one_pass': experts ranked once per event, Δr each down the list."
        },
    )
    frequency_beta: float = field(
        default=0.9,
        metadata={"help": "[INF] β of the routing-frequency EMA, updated every optimizer step (spec: 0.9-0.99)."},
    )
    frequency_weight: str = field(
        default="top_k",
        metadata={
            "help": "[INF] w in the frequency EMA: 'top_k' = router softmax probability of the selected experts "
            "(zero elsewhere), averaged over tokens; 'softmax' = the plain softmax probability over all tokens."
        },
    )
    frequency_mask_padding: bool = field(
        default=True,
        metadata={"help": "[INF] Leave padding (the model call's attention_mask) out of the routing frequency."},
    )
    importance_beta: float = field(
        default=0.85,
        metadata={"help": "[INF] β_I of the rank-importance EMA (AdaLoRA's 0.85); 0 = unsmoothed."},
    )
    importance_aggregation: str = field(
        default="mean",
        metadata={"help": "[INF] Rank importance of an expert: 'mean' or 'sum' over its active rank components."},
    )
    penalty_gamma: float = field(
        default=1.0,
        metadata={"help": "[INF] γ of the capacity penalty P(R) = (R / r_init)^γ; 0 turns the penalty off."},
    )
    a_init: str = field(
        default="uniform",
        metadata={
            "help": "[INF] Init of all r_max rows of A: 'uniform' = U(±1/sqrt(d_in)) (Kaiming-uniform, as nn.Linear) "
            "or 'gaussian' = N(0, 1/r_max^2) (PEFT's gaussian LoRA init). B is zero."
        },
    )
    new_slice_update: str = field(
        default="bias_correction",
        metadata={
            "help": "[INF] Remedy for the oversized Adam steps of newly activated slices (zero moments, global bias "
            "correction): 'bias_correction' rescales their update as if Adam had a step counter per slice; "
            "'lr_ramp' ramps their learning rate linearly over new_slice_ramp_steps; 'none' accepts it."
        },
    )
    new_slice_ramp_steps: int = field(
        default=100, metadata={"help": "[INF] Steps of the 'lr_ramp' remedy (spec: about 100)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for option, allowed in (
            ("schedule", SCHEDULES),
            ("saliency", SALIENCIES),
            ("rank_unit", RANK_UNITS),
            ("scaling_rank", SCALING_RANKS),
            ("award", AWARDS),
            ("frequency_weight", FREQUENCY_WEIGHTS),
            ("importance_aggregation", IMPORTANCE_AGGREGATIONS),
            ("a_init", A_INITS),
            ("new_slice_update", NEW_SLICE_UPDATES),
        ):
            if getattr(self, option) not in allowed:
                raise ValueError(f"{name}.{option} must be one of {allowed}, got {getattr(self, option)!r}")
        matrices = list(self.expert_matrices) if isinstance(self.expert_matrices, (list, tuple)) else None
        if not matrices or len(set(matrices)) != len(matrices) or not set(matrices) <= set(EXPERT_MATRICES):
            raise ValueError(
                f"{name}.expert_matrices must be distinct names from {EXPERT_MATRICES}, got {self.expert_matrices!r}"
            )
        # A fixed order, so the unit index of rank_unit='matrix' does not depend on how the user listed them.
        self.expert_matrices = [m for m in EXPERT_MATRICES if m in matrices]
        uniform = self.schedule == "uniform"
        if self.r_init is None:
            self.r_init = self.r if uniform else max(1, self.r // 2)
        if self.r_max is None:
            self.r_max = self.r if uniform else 4 * self.r
        check_positive(self, "r_init")
        check_positive(self, "r_max")
        if uniform and self.r_init != self.r:
            raise ValueError(f"{name}.r_init must equal r={self.r} with schedule='uniform', got {self.r_init!r}")
        if self.r_init > self.r:
            raise ValueError(f"{name}.r_init must be <= r (r_target)={self.r}, got {self.r_init!r}")
        if self.r_max < self.r:
            raise ValueError(f"{name}.r_max must be >= r (r_target)={self.r}, got {self.r_max!r}")
        for ratio in ("warmup_ratio", "growth_end_ratio"):
            value = getattr(self, ratio)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}.{ratio} must be in [0, 1], got {value!r}")
        if self.growth_end_ratio < self.warmup_ratio:
            raise ValueError(
                f"{name}.growth_end_ratio must be >= warmup_ratio={self.warmup_ratio}, got {self.growth_end_ratio!r}"
            )
        check_positive(self, "num_growth_events")
        check_positive(self, "rank_increment")
        check_positive(self, "new_slice_ramp_steps")
        for beta in ("frequency_beta", "importance_beta"):
            value = getattr(self, beta)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name}.{beta} must be in [0, 1), got {value!r}")
        if not (isinstance(self.penalty_gamma, (int, float)) and self.penalty_gamma >= 0):
            raise ValueError(f"{name}.penalty_gamma must be >= 0, got {self.penalty_gamma!r}")

    @property
    def grows(self) -> bool:
        return self.schedule == "grow" and self.r_init < self.r

    def check_module_shape(self, module_name: str, in_features: int, out_features: int) -> None:
        """The preallocated rank r_max must fit every adapted matrix."""
        if self.r_max > min(in_features, out_features):
            raise ValueError(
                f"{type(self).__name__}.r_max={self.r_max} exceeds min(d_in={in_features}, d_out={out_features}) "
                f"of {module_name!r}"
            )
