"""The dropup-upcycle command line: its options, its errors as one line each, and the closing summary."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dropup import families
from dropup.config import ConfigError
from dropup.flops import human_count
from dropup.hf import LAYOUTS
from dropup.init.base import Option
from dropup.init.registry import cli_options, converter_strategies
from dropup.shards import PlanError
from dropup.upcycle.common import DTYPES, MANIFEST, UpcycleError, human_bytes
from dropup.upcycle.convert import Result, upcycle
from dropup.upcycle.plan import normalize_layout, option_dest


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        self.exit(2, f"error: {message} (see dropup-upcycle --help)\n")


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units as transformers' max_shard_size; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    if number * scale < 1:
        raise argparse.ArgumentTypeError(f"shard size {text!r} must be at least one byte")
    return int(number * scale)


def _layout(text: str) -> str:
    layout = normalize_layout(text)
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(LAYOUTS)}; fused = stacked)")
    return layout


def _defaults(option: Option, takers: list[str]) -> str:
    """'default X' (and 'Y for --init Z' where a strategy's default differs) from the strategies' own defaults."""
    strategies = converter_strategies()
    by_value: dict = {}
    for name in takers:
        by_value.setdefault(strategies[name].defaults()[option.name], []).append(name)
    (common, _), *others = sorted(by_value.items(), key=lambda item: -len(item[1]))
    return "; ".join([f"default {common}"] + [f"{value} for --init {' and '.join(names)}" for value, names in others])


def add_strategy_option(p: argparse.ArgumentParser, option: Option, takers: list[str]) -> None:
    """One registry option as a flag: unset (None) unless given, so the strategy's own default applies."""
    applies = "" if set(takers) == set(converter_strategies()) else f"{', '.join(takers)}: "
    if option.type is bool:
        p.add_argument(option.flag, dest=option_dest(option), action=argparse.BooleanOptionalAction, default=None,
                       help=f"{applies}{option.help}")
        return
    choices = None
    if option.choices is not None:
        choices = [c.replace("_", "-") for c in option.choices] + [alias for alias, _ in option.aliases]
    p.add_argument(option.flag, dest=option_dest(option), type=option.type, choices=choices, default=None,
                   help=f"{applies}{option.help} ({_defaults(option, takers)})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dropup-upcycle",
        description="Upcycle dense Hugging Face checkpoints (safetensors) into the matching MoE family: "
                    f"{families.supported()}.",
    )
    p.add_argument("--dense", action="append", required=True, type=Path, metavar="DIR",
                   help="HF directory of a supported family (config.json + safetensors) or dropup run directory; "
                        "repeat for btx")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output directory (the HF MoE family of the input)")
    p.add_argument("--init", required=True, choices=sorted(converter_strategies()), help="how experts are initialized")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--granularity", type=int, default=1,
                   help="split each dense FFN into G narrower experts (fine-grained; default 1)")
    for option, takers in cli_options():  # the init strategies' own options (dropup.init.registry)
        add_strategy_option(p, option, takers)
    p.add_argument("--shared-expert", action="store_true",
                   help="add a shared expert that every token passes through (Qwen2 -> Qwen2-MoE only): the dense FFN "
                        "behind a zero gate, with the routed experts' outputs halved, so naive upcycling still "
                        "computes the dense function")
    p.add_argument("--shared-expert-d-ff", type=int, metavar="N",
                   help="the shared expert's width (default: the dense d_ff; wider repeats neurons and keeps the "
                        "function, narrower keeps the first N neurons and does not); implies --shared-expert")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=("keep", *DTYPES), default="keep",
                   help="output dtype; keep = that of the dense weights (fp32 for scratch) (default keep)")
    p.add_argument("--layout", type=_layout, default="per-expert", metavar="{" + ",".join(LAYOUTS) + "}",
                   help="per-expert (save_pretrained's w1/w2/w3 names; default) or stacked (gate_up_proj/down_proj; "
                        "fused is accepted for stacked)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="largest output shard, e.g. 5GB (default), 500MB")
    p.add_argument("--force", action="store_true", help="replace an existing or unfinished output in --out")
    p.add_argument("--verify", action="store_true",
                   help="check the written model against the dense one(s) (logits at r=0, re-initialized shares)")
    return p


def summary(result: Result) -> str:
    m = result.manifest
    o, params = m["options"], m["params"]
    shared = (f", a shared expert of width {o['shared_expert_d_ff']} beside them (the dense FFN behind a zero gate, "
              "routed outputs halved)" if o.get("shared_expert_d_ff") else "")
    how = result.strategy.describe()
    sources = ", ".join(d["path"] for d in m["dense"])
    if o["granularity"] > 1 and o.get("virtual_groups"):
        shared += (f"; fine-grained experts in virtual groups of {o['granularity']} (one router row per group, "
                   f"W_down x{o['granularity']})")
    elif o["granularity"] > 1:
        shared += "; fine-grained experts WITHOUT virtual groups"
    if result.step0_error is not None and o["granularity"] > 1:
        exact = o.get("virtual_groups") and result.strategy.dense_order(m["moe"]["expert_d_ff"]) is not None
        shared += (f" (step 0: layer 0's MoE output differs from the dense FFN's by {result.step0_error:.2g}, relative"
                   + (": the dense function)" if exact else
                      "; NOT the dense function: the top-k parts are averaged, not summed)"
                      if not o.get("virtual_groups") else ")"))
    resumed = f", resuming {result.shards_resumed} shard(s) already written" if result.shards_resumed else ""
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    carried = (f" Carried over from the dense directory: {', '.join(m['carried'])}." if m["carried"] else
               " The dense directory had no tokenizer files to carry over.")
    return (
        f"Upcycled {sources} into a {m['moe_type']} with {o['experts']} experts (top-{o['top_k']}){shared} at "
        f"{result.out}, "
        f"init {how}, "
        f"router {o['router_init']}, seed {o['seed']}: {human_count(params['total_params'])} parameters in total, "
        f"{human_count(params['active_params'])} active per token, {len(m['tensors'])} {o['dtype']} tensors "
        f"({o['layout']} layout) in {len(m['files'])} shard(s). Wrote {human_bytes(result.bytes_written)} in "
        f"{result.seconds:.1f} s ({human_bytes(rate)}/s){resumed}. Every tensor's sha256"
        f"{' and the re-initialized neuron sets' if m['reinitialized'] else ''} are in {MANIFEST}; load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained('{result.out}').{carried}"
    )


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        result = upcycle(args, console)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (UpcycleError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}: fix the cause (disk space, permissions) and re-run the same command to resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted: re-run the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    for line in result.verify_lines:
        print(line)
    print(summary(result))
    return 1 if any(line.startswith("FAIL") for line in result.verify_lines) else 0
