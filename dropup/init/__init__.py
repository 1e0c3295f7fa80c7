"""Init strategies: how an MoE's weights are made (from scratch or from dense models). One file each.

`STRATEGIES` maps the names used by `init=` and `dropup-upcycle --init` to their classes; `build_moe_state`
turns a strategy plus dense source state dicts into an MoE state dict (`moe_tensors` streams it)."""

from dropup.init.base import InitStrategy, build_moe_state, moe_tensors
from dropup.init.btx import BranchTrainMix
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.init.noise import NoiseUpcycling
from dropup.init.scratch import Scratch, dense_state

STRATEGIES: dict[str, type[InitStrategy]] = {
    cls.name: cls for cls in (Scratch, NaiveUpcycling, DropUpcycling, NoiseUpcycling, BranchTrainMix)
}

__all__ = ["STRATEGIES", "InitStrategy", "build_moe_state", "moe_tensors", "dense_state"]
