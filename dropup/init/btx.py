"""Branch-Train-MiX (BTX, Sukhbaatar et al. 2024) from N dense models (the paper: the seed and three domain
branches, N = 4, E = 8). Expert e copies the FFN of model floor(e N / E) (each FFN appears E/N times); every
non-FFN tensor is the unweighted mean of the N models' tensors; the router is new. Its experts are copies (no
neuron re-drawn), but of several models, with averaged attention: not any one dense function (`dense_order` None)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropup.config import ConfigError, MoEConfig
from dropup.init.base import InitStrategy


@dataclass
class BranchTrainMix(InitStrategy):
    name: ClassVar[str] = "btx"
    label: ClassVar[str] = "BTX"
    table_rank: ClassVar[int] = 2
    min_sources: ClassVar[int] = 2
    max_sources: ClassVar[int | None] = None

    def validate(self, n_sources: int, moe: MoEConfig) -> None:
        super().validate(n_sources, moe)
        copies = moe.num_experts // moe.granularity
        if copies % n_sources:
            raise ConfigError(
                f"init=btx with {n_sources} dense models cannot fill {copies} expert copies evenly: "
                f"use a model count that divides {copies} (the paper: 4 models, 8 experts)"
            )
