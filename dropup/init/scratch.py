"""From scratch (FS): no dense model. Every weight matrix ~ N(0, std^2) with std = model.init_std (0.02 in the
paper, section 4: "the same initialization as the dense models" for all parameters), every RMSNorm gain = 1. The
router is a weight matrix like the others: N(0, 0.02^2) by default (`normal:0.02`), not the upcycling inits'
U(-0.0346, 0.0346), which has the same std but another distribution. Each tensor (and each expert's
W_gate, W_up, W_down) has its own seeded generator, so dense and MoE scratch models are reproducible by name.
Every neuron is drawn (`redrawn_neurons`: all of them); no dense function is kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dropup.config import ModelConfig
from dropup import rng
from dropup.init.base import ExpertKey, InitStrategy, Option
from dropup.init.shapes import dense_shapes

ROUTER = "normal:0.02"


def scratch_tensor(name: str, shape, std: float, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return rng.normal(tuple(shape), 0.0, std, seed, name)


def dense_state(model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A dense (Llama) model's scratch state dict."""
    return {name: scratch_tensor(name, shape, model.init_std, seed) for name, shape in dense_shapes(model).items()}


@dataclass
class Scratch(InitStrategy):
    std: float = 0.02
    router: str = ROUTER

    name: ClassVar[str] = "scratch"
    label: ClassVar[str] = "FS"
    table_rank: ClassVar[int] = 1
    min_sources: ClassVar[int] = 0
    max_sources: ClassVar[int | None] = 0
    options: ClassVar[tuple[Option, ...]] = InitStrategy.options + (
        Option("std", float, "standard deviation of every weight matrix (run.py only)"),)

    def redrawn_neurons(self, d_f: int, key: ExpertKey) -> dict[str, torch.Tensor]:
        every = torch.arange(d_f)
        return {"gate": every, "up": every, "down": every}

    def redrawn_count(self, d_f: int) -> int:
        return d_f

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        return tuple(
            rng.normal(tuple(w.shape), 0.0, self.std, *key(tensor))
            for w, tensor in ((gate_FD, "gate"), (up_FD, "up"), (down_DF, "down"))
        )

    def non_expert(self, name, tensors, shape, dtype, seed):
        return scratch_tensor(name, shape, self.std, seed)
