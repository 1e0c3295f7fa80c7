"""Pretrained: start from an existing model of the same architecture, unchanged (e.g. continue training the
converter's Mixtral output, or grow a BTX domain branch from the dense seed). The weights come from
`seed_model` (a dropup run directory or a Hugging Face Llama/Mixtral directory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class Pretrained:
    name: ClassVar[str] = "pretrained"
    max_sources: ClassVar[int] = 1
