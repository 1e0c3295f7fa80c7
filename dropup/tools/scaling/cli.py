"""`python -m dropup.scaling`: memory per GPU, the largest micro-batch, communication and run time of a config
trained with FSDP2 on `gpus` GPUs, and where expert parallelism would start to pay.

(The first paragraph is `--help`'s; the model behind the plan is the package docstring, `dropup.tools.scaling`.)"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dropup.config import ConfigError
from dropup.paths import ROOT
from dropup.schema import Config, compose
from dropup.tools.scaling.plan import DOCS, KNOBS, plan, render, rewrite_docs, setup_from_config


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(scaling knobs, Hydra overrides). A top-level key that is neither a knob nor a config key or group is an
    error naming the knobs (Hydra would suggest `+key`, which is not the fix)."""
    top_level = {f.name for f in dataclasses.fields(Config)} | {"experiment", "hydra", "local", "defaults"}
    top_level |= {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    knobs, overrides = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in KNOBS:
            if not eq or value == "":
                raise ConfigError(f"{key} needs a value, e.g. {key}={KNOBS[key][1] or 1}")
            kind = KNOBS[key][0]
            try:
                knobs[key] = value.lower() if kind is str else kind(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a{'n' if kind is int else ''} {kind.__name__}: e.g. "
                                  f"{key}={KNOBS[key][1] or 1}") from None
            continue
        bare = key.lstrip("+~")
        if "." not in bare and bare not in top_level:
            close = difflib.get_close_matches(bare, [*KNOBS, *sorted(top_level)], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown argument {arg!r}{hint}: scaling knobs are {', '.join(KNOBS)}; anything "
                              "else is a config override such as experiment=paper_8x3.7b or train.batch_size=512")
        overrides.append(arg)
    return knobs, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("--docs", "--check"):
            same = rewrite_docs(check=argv[0] == "--check")
            if not same:
                print(f"error: {DOCS} differs from `python -m dropup.scaling --docs`'s output: run that",
                      file=sys.stderr)
                return 1
            print(DOCS)
            return 0
        if any(a in ("-h", "--help") for a in argv):
            print(__doc__.split("\n\n")[0] + "\n\nknobs:\n" + "\n".join(
                f"  {k}={v[1]}  {v[2]}" for k, v in KNOBS.items()))
            return 0
        knobs, overrides = split_args(argv)
        cfg = compose(overrides)
        experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "")
        result = plan(setup_from_config(cfg, experiment), knobs)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(result))
    print(json.dumps(result))
    return 0
