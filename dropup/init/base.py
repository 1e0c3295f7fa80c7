"""What every init strategy is and says about itself: the registry's questions, answered per class.

A strategy answers, without any caller comparing its name:
- `dense_order(d_f)`: whether the MoE computes the dense function at step 0 when built from one dense model
  (each routed expert computes its source FFN slice, and every other tensor is the dense one), and in which neuron
  order: `SAME` (the expert equals its slice neuron by neuron), `PERMUTED` (the same neurons, relabelled: the
  function is the same, the weights compared neuron by neuron are not) or None (not the dense function). The
  layer as a whole also needs virtual groups for fine-grained experts (`dropup.init.virtual_groups`);
- `redrawn_neurons(d_f, key)`: the neurons of one expert it changes, per matrix (the index sets S; none for
  copies, all for scratch), `redrawn_count(d_f)` their number, and `records_neuron_sets` whether the sets are
  drawn per expert and worth recording (the converter's manifest);
- `options`: the settings it takes (`Option`: type, default, help, the converter's flag), the same for the
  converter's command line (`dropup.upcycle.cli`) and for run.py (`conf/init/<name>.yaml`, checked against them by
  tests/test_registry.py);
- `label` / `table_label(ratio)`: its name in the paper's tables (`analysis.collect`, `analysis.tables`).

`InitStrategy` builds an MoE's weights from 0..N dense sources (`dropup.init.streaming`): a subclass only decides
- how one expert's (W_gate, W_up, W_down) is derived from its source slice (`expert`), and
- how a non-expert tensor (attention, norms, embeddings) is derived from the sources' copies of it (`non_expert`;
  default: the mean, i.e. a copy for one source and BTX's average for several).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from dropup.config import ConfigError, MoEConfig
from dropup.init import router as router_init
from dropup.init.virtual_groups import parse_virtual_groups

SAME = "same"  # the dense function, each expert neuron by neuron its source slice
PERMUTED = "permuted"  # the dense function, each expert's neurons relabelled


@dataclass(frozen=True)
class Option:
    """One setting a strategy takes: the YAML key in conf/init/<name>.yaml (the dataclass field) and, where the
    converter offers it, its flag. `choices` are the accepted values, `aliases` older spellings mapped to one of
    them when the strategy is built (and when a recorded run is compared: `normalize`)."""

    name: str
    type: type
    help: str
    flag: str | None = None  # None: run.py only
    choices: tuple[str, ...] | None = None
    aliases: tuple[tuple[str, str], ...] = ()

    def normalize(self, value: Any) -> Any:
        """`value` in its current spelling (an alias replaced; '-' read as '_' in a choice)."""
        if self.choices is None or not isinstance(value, str):
            return value
        value = dict(self.aliases).get(value, value)
        return value if value in self.choices else value.replace("-", "_")


@dataclass(frozen=True)
class ExpertKey:
    """Identifies one expert's tensors for the per-tensor generators: (seed, layer, expert, tensor)."""

    seed: int
    layer: int
    expert: int

    def __call__(self, tensor: str) -> tuple:
        return (self.seed, self.layer, self.expert, tensor)


class Strategy:
    """The self-description every registered strategy gives (class attributes; see the module docstring)."""

    name: ClassVar[str] = "base"
    label: ClassVar[str] = "?"  # the paper's method name in tables
    table_rank: ClassVar[int] = 99  # the paper's row order (Dense is 0)
    labels_ratio: ClassVar[bool] = False  # the label carries " (r=...)"
    options: ClassVar[tuple[Option, ...]] = ()
    min_sources: ClassVar[int] = 1
    max_sources: ClassVar[int | None] = 1
    builds_weights: ClassVar[bool] = True  # False: starts from a model's weights as they are (no converter use)
    records_neuron_sets: ClassVar[bool] = False

    @classmethod
    def table_label(cls, ratio=None) -> str:
        """The label of a run with this init and re-initialization `ratio` (before variant suffixes)."""
        return f"{cls.label} (r={float(ratio):g})" if cls.labels_ratio and ratio is not None else cls.label

    @classmethod
    def option(cls, name: str) -> Option | None:
        return next((o for o in cls.options if o.name == name), None)

    @classmethod
    def normalize(cls, name: str, value: Any) -> Any:
        """A recorded setting `name` of this init in its current spelling (older runs wrote aliases)."""
        opt = cls.option(name)
        return value if opt is None else opt.normalize(value)

    @property
    def reads_dense(self) -> bool:
        """Whether the weights come from dense models' tensors (scratch reads only the architecture)."""
        return self.max_sources != 0

    @property
    def upcycles(self) -> bool:
        """Whether it builds an MoE from dense models (so a run's cost includes the dense seed's training)."""
        return self.reads_dense and self.builds_weights

    @property
    def ratio_value(self) -> float | None:
        """The re-initialization ratio this strategy reports in results (None where it has none)."""
        return None

    def option_values(self) -> dict[str, Any]:
        """Every option's value as built (normalized)."""
        return {o.name: getattr(self, o.name) for o in self.options}

    def dense_order(self, d_f: int) -> str | None:
        """`SAME`, `PERMUTED` or None (module docstring), for experts of `d_f` neurons."""
        return None

    def redrawn_neurons(self, d_f: int, key: ExpertKey) -> dict[str, torch.Tensor]:
        """The sorted neuron indices of expert `key` that this init changes, per matrix (gate, up, down)."""
        none = torch.empty(0, dtype=torch.long)
        return {"gate": none, "up": none, "down": none}

    def redrawn_count(self, d_f: int) -> int:
        return 0

    @property
    def one_neuron_set(self) -> bool:
        """Whether `redrawn_neurons` is one set for all three matrices (whole neurons), not one per matrix."""
        return True

    def neuron_permutation(self, d_f: int, key: ExpertKey) -> torch.Tensor | None:
        """The relabelling of expert `key`'s neurons (its neuron i is its source's neuron perm[i]); None: none."""
        return None

    @property
    def neuron_rule(self) -> str | None:
        """What happens to the neurons in `redrawn_neurons`, in words (for strategies that record the sets)."""
        return None

    def describe(self) -> str:
        """How the converter's summary names this init."""
        return self.name

    def uses_virtual_groups(self, moe: MoEConfig) -> bool:
        return False

    def validate(self, n_sources: int, moe: MoEConfig) -> None:
        upper = self.max_sources if self.max_sources is not None else n_sources
        if not self.min_sources <= n_sources <= upper:
            want = (
                f"at least {self.min_sources}" if self.max_sources is None
                else f"exactly {self.min_sources}" if self.min_sources == self.max_sources
                else f"{self.min_sources} to {self.max_sources}"
            )
            raise ConfigError(f"init={self.name} needs {want} dense model(s), got {n_sources}")
        self.check_moe(moe)

    def check_moe(self, moe: MoEConfig) -> None:
        """What this init needs of the MoE's shape (checked before any work, then again when it builds)."""


@dataclass
class InitStrategy(Strategy):
    """Base of every strategy that builds weights. Subclasses set `name`, the allowed source count, and override
    `expert` (and `non_expert` where the mean of the sources is not the answer)."""

    router: str = router_init.DEFAULT
    # fine-grained experts (G > 1) only: auto | true | false (dropup.init.virtual_groups); no effect at G = 1
    virtual_groups: bool | str = "auto"

    options: ClassVar[tuple[Option, ...]] = (
        Option("router", str, "router init: uniform:A = U(-A, A), uniform01 = U(0, 1), normal:S = N(0, S^2)",
               flag="--router-init"),
        Option("virtual_groups", bool,
               "with --granularity G > 1 (on by default there): the G experts holding one FFN's parts share a "
               "router row and W_down is scaled by G, so naive upcycling computes the dense function (needs "
               "--top-k a multiple of G); --no-virtual-groups keeps independent rows, which average the parts "
               "instead of summing them", flag="--virtual-groups"),
    )

    def __post_init__(self) -> None:
        router_init.parse(self.router)
        self.virtual_groups = parse_virtual_groups(self.virtual_groups)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default (the dataclass field's)."""
        return {f.name: f.default for f in fields(cls)}

    def uses_virtual_groups(self, moe: MoEConfig) -> bool:
        """Whether this init builds `moe`'s fine-grained experts in virtual groups (never for G = 1, where a group
        is one expert and nothing changes)."""
        if moe.granularity == 1 or self.max_sources == 0:
            return False
        return True if self.virtual_groups == "auto" else bool(self.virtual_groups)

    def check_moe(self, moe: MoEConfig) -> None:
        if self.virtual_groups is True and self.max_sources == 0:
            raise ConfigError(f"init.virtual_groups=true groups the parts of a dense FFN, and init={self.name} reads "
                              "no dense model: drop it")
        if self.virtual_groups is True and moe.granularity == 1:
            raise ConfigError("init.virtual_groups=true groups the parts of fine-grained experts, and "
                              "moe.granularity=1 has none: set moe.granularity > 1 (moe=fine_grained), or drop it")
        if self.uses_virtual_groups(moe) and moe.top_k % moe.granularity:
            raise ConfigError(
                f"virtual groups need moe.top_k={moe.top_k} to be a multiple of moe.granularity={moe.granularity}: a "
                "token must choose whole groups of one FFN's parts to compute the dense function; use moe.top_k="
                f"{max(1, moe.top_k // moe.granularity) * moe.granularity}, or init.virtual_groups=false (then the "
                "step-0 function is not the dense one)")

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        """Return one expert's (W_gate, W_up, W_down) from its source slice; default: an exact copy."""
        return gate_FD, up_FD, down_DF

    def non_expert(self, name: str, tensors: Sequence[torch.Tensor], shape, dtype, seed: int) -> torch.Tensor:
        """A tensor outside the experts (attention, norms, embeddings) from the sources' copies `tensors`."""
        return average(tensors)


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sources' copies of one tensor averaged in fp32 (a copy for one source)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    return torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)


def reinit_count(ratio: float, d_ff: int) -> int:
    """|S| = floor(r d_f); the epsilon keeps e.g. 0.29 * 100 = 28.999... from flooring to 28."""
    return min(d_ff, math.floor(ratio * d_ff + 1e-9))


def check_ratio(ratio: float) -> None:
    if not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"ratio={ratio} is outside [0, 1]: the re-initialized share of d_ff must be in [0, 1]")
