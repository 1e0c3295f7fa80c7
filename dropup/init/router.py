"""Router initializations (paper Table 8), written as a spec string.

`uniform:A` -> U(-A, A); `uniform01` -> U(0, 1); `normal:S` -> N(0, S^2). The paper's default (Table 8 row 3) is
`uniform:0.0346`, whose standard deviation is 0.02. The authors' conversion script defaulted to `uniform01`
(all-positive logits weights), which the paper's runs overrode.
"""

from __future__ import annotations

from dropup.config import ConfigError
from dropup import rng

DEFAULT = "uniform:0.0346"
# Table 8's five variants, in the paper's row order.
TABLE8 = ("normal:0.02", "normal:0.2887", "uniform:0.0346", "uniform:0.5", "uniform01")


def parse(spec: str) -> tuple[str, float]:
    kind, _, arg = str(spec).partition(":")
    try:
        if kind == "uniform01" and not arg:
            return kind, 1.0
        if kind in ("uniform", "normal") and float(arg) > 0:
            return kind, float(arg)
    except ValueError:
        pass
    raise ConfigError(
        f"router init {spec!r} is not understood: use uniform:A for U(-A, A), uniform01 for U(0, 1) "
        "or normal:S for N(0, S^2), with A, S > 0"
    )


def draw(spec: str, shape, *key: object):
    kind, scale = parse(spec)
    if kind == "uniform":
        return rng.uniform(shape, -scale, scale, *key)
    if kind == "uniform01":
        return rng.uniform(shape, 0.0, 1.0, *key)
    return rng.normal(shape, 0.0, scale, *key)
