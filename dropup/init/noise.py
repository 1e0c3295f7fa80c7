"""Random noise upcycling (RNU, in the authors' release): the same index sets S as Drop-Upcycling, but the
selected sub-blocks keep their values and get N(0, std^2) noise added (std = 0.02 by default):
W~ = W + I_S . N, N ~ N(0, std^2). At r = 0 it is naive Upcycling (the dense function, like drop's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dropup import rng
from dropup.init.base import ExpertKey, Option
from dropup.init.drop import DropUpcycling


def add_noise_rows(w_FX: torch.Tensor, rows: torch.Tensor, std: float, key: tuple) -> torch.Tensor:
    if rows.numel() == 0:
        return w_FX
    out = w_FX.clone()
    noise = rng.normal((rows.numel(), w_FX.shape[1]), 0.0, std, *key)
    out[rows] = (w_FX[rows].float() + noise).to(w_FX.dtype)
    return out


@dataclass
class NoiseUpcycling(DropUpcycling):
    std: float = 0.02

    name: ClassVar[str] = "noise"
    label: ClassVar[str] = "RNU"
    table_rank: ClassVar[int] = 5
    zero_ratio_label: ClassVar[str | None] = None  # labelled "RNU (r=0)" at r = 0 too, as it always was
    options: ClassVar[tuple[Option, ...]] = DropUpcycling.options + (
        Option("std", float, "standard deviation of the noise added to the neurons in S (run.py only)"),)

    @property
    def neuron_rule(self) -> str:
        return f"given added N(0, {self.std}^2) noise"

    def describe(self) -> str:
        return f"{self.name} r={self.ratio_value} (std {self.std}, {self.index_mode} index sets)"

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        gate_FD, up_FD, down_DF = self.permute(gate_FD, up_FD, down_DF, key)
        idx = self.redrawn_neurons(gate_FD.shape[0], key)
        gate_FD = add_noise_rows(gate_FD, idx["gate"], self.std, key("gate"))
        up_FD = add_noise_rows(up_FD, idx["up"], self.std, key("up"))
        down_DF = add_noise_rows(down_DF.t(), idx["down"], self.std, key("down")).t().contiguous()
        return gate_FD, up_FD, down_DF
