"""Pretrained: start from an existing model of the same architecture, unchanged (e.g. continue training the
converter's Mixtral output, or grow a BTX domain branch from the dense seed). The weights come from
`seed_model` (a dropup run directory or a Hugging Face Llama/Mixtral directory), so the model computes exactly
its seed's function (`dense_order` = SAME) and re-draws nothing. It builds no weights: the converter does not
offer it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dropup.init.base import SAME, Strategy


@dataclass
class Pretrained(Strategy):
    name: ClassVar[str] = "pretrained"
    label: ClassVar[str] = "Pretrained"
    table_rank: ClassVar[int] = 5
    max_sources: ClassVar[int] = 1
    builds_weights: ClassVar[bool] = False

    def dense_order(self, d_f: int) -> str:
        return SAME
