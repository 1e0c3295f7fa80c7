"""Drop-Upcycling (DU, paper section 3.2.1): copy, then partially re-initialize each expert.

For every layer and expert, sample S subset of {1..d_f} with |S| = floor(r d_f) (r = `ratio`). For each of
W_gate, W_up (rows S, all d_h columns in torch's (d_f, d_h) layout) and W_down (columns S), compute one mean mu and
one standard deviation sigma (N-1 corrected) over that selected sub-block of the *original dense* matrix, and
replace the sub-block by draws from N(mu, sigma^2) (eq. 4):  W~ = I_S . R + (1 - I_S) . W.

`index_mode: joint` uses one S for all three matrices (the paper: whole neurons are dropped, so a pair of experts
shares about (1-r)^2 of them; `shared`, its older name, is read as `joint`); `per_matrix` draws S independently
per matrix (the authors' released script; only about r^3 of neurons are then fully new). `shuffle` permutes each
expert's neurons first (a relabelling that leaves the function unchanged, as the released script does). r = 0 is
naive Upcycling: the dense function, neuron for neuron (`dense_order` SAME), or relabelled with `shuffle`
(PERMUTED); r > 0 is not the dense function. r = 1 re-initializes every FFN weight from whole-matrix statistics
and keeps attention, norms and embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dropup.config import ConfigError
from dropup import rng
from dropup.init.base import PERMUTED, SAME, ExpertKey, InitStrategy, Option, check_ratio, reinit_count
from dropup.init.naive import NaiveUpcycling

JOINT, PER_MATRIX = "joint", "per_matrix"
INDEX_MODES = (JOINT, PER_MATRIX)


def replace_rows(w_FX: torch.Tensor, rows: torch.Tensor, key: tuple) -> torch.Tensor:
    """Rows `rows` of w redrawn from N(mean, std^2) of those rows' original values."""
    if rows.numel() == 0:
        return w_FX
    block = w_FX[rows].float()
    out = w_FX.clone()
    std = block.std().item() if block.numel() > 1 else 0.0
    out[rows] = rng.normal(tuple(block.shape), block.mean().item(), std, *key).to(w_FX.dtype)
    return out


def select_indices(d_f: int, count: int, index_mode: str, key: ExpertKey) -> dict[str, torch.Tensor]:
    if index_mode == JOINT:
        # the generator's key predates the mode's name: it stays "index" so the same seed gives the same sets
        joint = rng.subset(d_f, count, *key("index"))
        return {"gate": joint, "up": joint, "down": joint}
    return {m: rng.subset(d_f, count, *key(f"index/{m}")) for m in ("gate", "up", "down")}


@dataclass
class DropUpcycling(InitStrategy):
    ratio: float = 0.5
    index_mode: str = JOINT
    shuffle: bool = False

    name: ClassVar[str] = "drop"
    label: ClassVar[str] = "DU"
    table_rank: ClassVar[int] = 4
    labels_ratio: ClassVar[bool] = True
    zero_ratio_label: ClassVar[str | None] = NaiveUpcycling.label  # r = 0 is naive Upcycling: the same table row
    records_neuron_sets: ClassVar[bool] = True
    options: ClassVar[tuple[Option, ...]] = InitStrategy.options + (
        Option("ratio", float, "re-initialized share of d_ff per expert", flag="--ratio"),
        Option("index_mode", str, "one neuron set for gate/up/down (joint, the paper) or one each (per-matrix); "
               "shared = joint", flag="--index-mode", choices=INDEX_MODES, aliases=(("shared", JOINT),)),
        Option("shuffle", bool, "permute each expert's neurons first (keeps the function; the authors' script)",
               flag="--shuffle"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.ratio)
        self.index_mode = self.option("index_mode").normalize(self.index_mode)
        if self.index_mode not in INDEX_MODES:
            raise ConfigError(f"init.index_mode={self.index_mode!r} is unknown; choose one of {INDEX_MODES} "
                              "(shared = joint)")

    @classmethod
    def table_label(cls, ratio=None) -> str:
        if cls.zero_ratio_label is not None and ratio is not None and float(ratio) == 0.0:
            return cls.zero_ratio_label
        return super().table_label(ratio)

    @property
    def ratio_value(self) -> float:
        return float(self.ratio)

    def dense_order(self, d_f: int) -> str | None:
        if reinit_count(self.ratio, d_f):
            return None
        return PERMUTED if self.shuffle else SAME

    def redrawn_count(self, d_f: int) -> int:
        return reinit_count(self.ratio, d_f)

    def redrawn_neurons(self, d_f: int, key: ExpertKey) -> dict[str, torch.Tensor]:
        """S per matrix, as neuron indices after the shuffle (the expert's own order)."""
        return select_indices(d_f, reinit_count(self.ratio, d_f), self.index_mode, key)

    @property
    def one_neuron_set(self) -> bool:
        return self.index_mode == JOINT

    def neuron_permutation(self, d_f: int, key: ExpertKey) -> torch.Tensor | None:
        return rng.permutation(d_f, *key("shuffle")) if self.shuffle else None

    @property
    def neuron_rule(self) -> str:
        return "redrawn from N(mean, std^2) of the dense sub-block"

    def describe(self) -> str:
        return f"{self.name} r={self.ratio_value} ({self.index_mode} index sets)"

    def permute(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        perm = self.neuron_permutation(gate_FD.shape[0], key)
        if perm is None:
            return gate_FD, up_FD, down_DF
        return gate_FD[perm], up_FD[perm], down_DF[:, perm]

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        gate_FD, up_FD, down_DF = self.permute(gate_FD, up_FD, down_DF, key)
        idx = self.redrawn_neurons(gate_FD.shape[0], key)
        gate_FD = replace_rows(gate_FD, idx["gate"], key("gate"))
        up_FD = replace_rows(up_FD, idx["up"], key("up"))
        # W_down is (d_h, d_f): its neurons are columns, so work on the transpose (eq. 4's note).
        down_DF = replace_rows(down_DF.t(), idx["down"], key("down")).t().contiguous()
        return gate_FD, up_FD, down_DF
