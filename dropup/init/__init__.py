"""Init strategies: how an MoE's weights are made (from scratch or from dense models). One file each.

`STRATEGIES` maps the names used by `init=` and `dropup-upcycle --init` to their classes; `build_moe_state`
turns a strategy plus dense source state dicts into an MoE state dict (`moe_tensors` streams it)."""

from dropup.config import ConfigError
from dropup.init.base import InitStrategy, build_moe_state, moe_tensors
from dropup.init.btx import BranchTrainMix
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.init.noise import NoiseUpcycling
from dropup.init.scratch import Scratch, dense_state

STRATEGIES: dict[str, type[InitStrategy]] = {
    cls.name: cls for cls in (Scratch, NaiveUpcycling, DropUpcycling, NoiseUpcycling, BranchTrainMix)
}


def make_strategy(init_cfg):
    """Instantiate `init:` (its `_target_`), surfacing the strategy's own ConfigError rather than Hydra's wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(init_cfg)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError(f"init: {err}") from None


__all__ = ["STRATEGIES", "make_strategy", "InitStrategy", "build_moe_state", "moe_tensors", "dense_state"]
