"""Naive Upcycling (NU, Komatsuzaki et al. 2023): every expert is an exact copy of the dense FFN,
W_gate^(i) = W_gate, W_up^(i) = W_up, W_down^(i) = W_down; every other tensor is copied; only the router is new.
With identical experts and renormalized top-k weights summing to 1, the MoE computes the dense function, neuron
for neuron (`dense_order` = SAME); it re-draws no neuron."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropup.init.base import SAME, InitStrategy


@dataclass
class NaiveUpcycling(InitStrategy):
    name: ClassVar[str] = "naive"
    label: ClassVar[str] = "NU"
    table_rank: ClassVar[int] = 3

    @property
    def ratio_value(self) -> float:
        return 0.0

    def dense_order(self, d_f: int) -> str:
        return SAME
