"""The one registry of init strategies: name -> class, for run.py (`init=<name>`, conf/init/<name>.yaml, whose
`_target_` is the class), the converter (`dropup-upcycle --init <name>`, options from each class's `options`)
and the analysis (a recorded name -> its table label). Callers ask the class what it does
(`dropup.init.base.Strategy`), never compare its name."""

from __future__ import annotations

from typing import Any

from dropup.config import ConfigError
from dropup.init.base import Option, Strategy
from dropup.init.btx import BranchTrainMix
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.init.noise import NoiseUpcycling
from dropup.init.pretrained import Pretrained
from dropup.init.scratch import Scratch

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Scratch, NaiveUpcycling, DropUpcycling, NoiseUpcycling, BranchTrainMix, Pretrained)
}


def target(cls: type[Strategy]) -> str:
    """The `_target_` of a strategy's conf/init YAML: its class's import path."""
    return f"{cls.__module__}.{cls.__qualname__}"


def name_of_target(target_path: str) -> str | None:
    """The registered name of the class a `_target_` names (by class name, so a moved module still matches);
    None for none."""
    cls_name = str(target_path).rsplit(".", 1)[-1]
    return next((name for name, cls in STRATEGIES.items() if cls.__name__ == cls_name), None)


def converter_strategies() -> dict[str, type[Strategy]]:
    """The strategies the converter offers: those that build weights."""
    return {name: cls for name, cls in STRATEGIES.items() if cls.builds_weights}


def cli_options() -> list[tuple[Option, list[str]]]:
    """Every converter option (by flag), with the converter strategies that take it, in registry order."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for name, cls in converter_strategies().items():
        for opt in cls.options:
            if opt.flag is not None:
                found.setdefault(opt.flag, (opt, []))[1].append(name)
    return list(found.values())


def normalize_options(init: str | None, options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`options` (keys `prefix + option`) with each of init `init`'s options in its current spelling: a run
    recorded with an alias (index_mode=shared) compares equal to one configured with the name (joint)."""
    cls = STRATEGIES.get(init) if isinstance(init, str) else None
    if cls is None:
        return dict(options)
    return {key: cls.normalize(key[len(prefix):], value) if key.startswith(prefix) else value
            for key, value in options.items()}


def make_strategy(init_cfg) -> Strategy:
    """Instantiate `init:` (its `_target_`), surfacing the strategy's own ConfigError rather than Hydra's wrapper."""
    # here, not at the top: Hydra costs the converter, which never instantiates a config, 0.25 s at start-up
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(init_cfg)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError(f"init: {err}") from None
