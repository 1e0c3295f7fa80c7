"""The MoE layer, by job: `layer` (router, SwiGLU, MoELayer), `backends` (the experts' dispatch and GEMMs),
`losses` (the balance losses, `StepLoads`, the z-loss) and `similarity` (`expert_similarity`). The public
names are re-exported here."""

from dropup.moe.backends import (FALLBACK, SORTED_GEMMS, announce_backends_again, combine, effective_backend,
                                 experts_loop, experts_sorted, grouped_mm_works, swiglu)
from dropup.moe.layer import MoELayer, SwiGLU, route
from dropup.moe.losses import BalanceStats, StepLoads, load_balancing_loss, router_z_loss
from dropup.moe.similarity import expert_similarity

__all__ = ["FALLBACK", "SORTED_GEMMS", "announce_backends_again", "combine", "effective_backend", "experts_loop",
           "experts_sorted", "grouped_mm_works", "swiglu", "MoELayer", "SwiGLU", "route", "BalanceStats",
           "StepLoads", "load_balancing_loss", "router_z_loss", "expert_similarity"]
