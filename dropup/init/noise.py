"""Random noise upcycling (RNU, in the authors' release): the same index sets S as Drop-Upcycling, but the
selected sub-blocks keep their values and get N(0, std^2) noise added (std = 0.02 by default):
W~ = W + I_S . N, N ~ N(0, std^2). At r = 0 it is naive Upcycling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dropup.init import rng
from dropup.init.base import ExpertKey
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

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        gate_FD, up_FD, down_DF = self.permute(gate_FD, up_FD, down_DF, key)
        idx = self.indices(gate_FD.shape[0], key)
        gate_FD = add_noise_rows(gate_FD, idx["gate"], self.std, key("gate"))
        up_FD = add_noise_rows(up_FD, idx["up"], self.std, key("up"))
        down_DF = add_noise_rows(down_DF.t(), idx["down"], self.std, key("down")).t().contiguous()
        return gate_FD, up_FD, down_DF
