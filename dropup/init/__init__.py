"""Init strategies: how an MoE's weights are made (from scratch or from dense models). One file each.

`STRATEGIES` (`dropup.init.registry`) maps the names used by `init=` and `dropup-upcycle --init` to their classes,
each of which says what it does (`dropup.init.base.Strategy`); `build_moe_state` turns a strategy plus dense
source state dicts into an MoE state dict (`moe_tensors` streams it: `dropup.init.streaming`)."""

from dropup.init.base import InitStrategy, Strategy
from dropup.init.registry import STRATEGIES, make_strategy
from dropup.init.scratch import dense_state
from dropup.init.streaming import build_moe_state, moe_tensors

__all__ = ["STRATEGIES", "make_strategy", "InitStrategy", "Strategy", "build_moe_state", "moe_tensors",
           "dense_state"]
