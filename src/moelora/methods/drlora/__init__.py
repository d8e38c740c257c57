"""DR-LoRA (Deng et al., arXiv 2601.04823): LoRA on the routed experts of an MoE LLM whose ranks start small and
grow where the expert saliency is highest, under a fixed total budget (spec: drlora.md; no official code exists,
so every default the spec had to choose, marked [INF], is a `DRLoRAConfig` field).

For every routed expert (ℓ, i) and adapted matrix W (SwiGLU gate, up, down):

    W' x = W x + c B diag(m) A drop(x),    A in R^{r_max x d_in}, B in R^{d_out x r_max}, m in {0,1}^{r_max}

with the first R_{ℓ,i} entries of m set, c = alpha / r_target, A drawn at init for all r_max rows and B = 0
(zero update at init; a newly activated slice has a zero B column, so growth is function-preserving).

Statistics, every optimizer step:

    f_{ℓ,i} <- β f_{ℓ,i} + (1 - β) w_{ℓ,i},   w_{ℓ,i} = mean_tokens p_{ℓ,i}(x) 1[i in TopK(x)]   (the model's router)
    I_k = Σ |A[k,:] * dL/dA[k,:]| + Σ |B[:,k] * dL/dB[:,k]|  (over the expert's matrices),  Ī <- β_I Ī + (1 - β_I) I
    g_{ℓ,i} = mean_{k < R_{ℓ,i}} Ī_k

Growth, at K events in (W, t_end], per layer: S_{ℓ,i} = f̃ g̃ / (R_{ℓ,i} / r_init)^γ (f̃, g̃ divided by their layer
mean); the quota ceil(remaining / events left) goes to the most salient experts below r_max, Δr at a time, so
Σ_i R_{ℓ,i} never exceeds N r_target and equals it after the last event.

Modules: `config` (the fields), `layout` (the expert layouts of transformers v5, per architecture), `layers`
(the batched expert forward and the router statistics), `growth` (the rule), `tuner` (injection, statistics,
growth, rank map), `callback` (the Trainer schedule, optimizer remedies, reports).
"""

from .callback import DRLoRACallback, write_rank_report
from .config import DRLoRAConfig
from .growth import GrowthSchedule
from .layers import DRLoRAExperts, DRLoRALayer, DRLoRARouter
from .layout import EXPERT_LAYOUTS, ExpertLayout
from .tuner import DRLoRATuner

__all__ = [
    "EXPERT_LAYOUTS",
    "DRLoRACallback",
    "DRLoRAConfig",
    "DRLoRAExperts",
    "DRLoRALayer",
    "DRLoRARouter",
    "DRLoRATuner",
    "ExpertLayout",
    "GrowthSchedule",
    "write_rank_report",
]
