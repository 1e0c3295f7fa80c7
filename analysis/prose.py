"""Numbers in a report's prose, rendered from the runs like its tables.

A number in the prose is written with the computation it comes from, in an HTML comment that Markdown hides:

    BTX − DU(0.5) is <!--n:gap mini | BTX | DU (r=0.5) | val_loss | 3-->−0.051<!--/n-->

`analysis.report update` re-renders the text between the comments and `analysis.report check` fails where it
differs, exactly as for the tables. The computations read the scale's committed `runs.csv` (runs and seeds):

- `mean SCALE | LABEL | METRIC | DIGITS`: the mean over the label's runs (seeds) of `metrics.<METRIC>`;
- `gap SCALE | A | B | METRIC | DIGITS`: mean(A) − mean(B), from unrounded means, signed;
  a label may name another scale's runs: `BTX @ mini-btx-flops`;
- `value SCALE | LABEL | COLUMN`: a column every run of the label shares (a parameter count), as an integer with
  thousands separators.

Inside `<!-- prose: checked -->` ... `<!-- end prose -->`, a decimal number or a percentage that is not bound this
way (outside tables, code, links and method names such as DU(0.5) or r = 0.5) fails the check: a typed number
cannot be traced to the runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd

NUMBER = re.compile(r"<!--n:(?P<expr>.+?)-->(?P<text>.*?)<!--/n-->", re.S)
CHECKED = re.compile(r"<!-- prose: checked -->(?P<body>.*?)<!-- end prose -->", re.S)
UNTRACEABLE = re.compile(r"(?<![\w.])\d+\.\d+|\d+(\.\d+)?\s?%")
SETTING = re.compile(r"\b[A-Z]{2,4}\s*\(\s*(r\s*=\s*)?\d+(\.\d+)?\s*\)|\br\s*=\s*\d+(\.\d+)?")
MINUS = "\u2212"


class ProseError(ValueError):
    pass


def _mean(runs_of: Callable[[str], pd.DataFrame], scale: str, label: str, metric: str) -> float:
    """`label` may name another scale than the expression's: `BTX @ mini-btx-flops`."""
    label, _, other = (part.strip() for part in label.partition("@"))
    runs = runs_of(other or scale)
    rows = runs[(runs["label"] == label) & runs["role"].isin(["run", "seed"])]
    column = f"metrics.{metric}"
    if rows.empty or column not in rows or rows[column].isna().all():
        raise ProseError(f"no {label!r} run with {column}")
    return float(rows[column].mean())


def _signed(value: float, digits: int) -> str:
    text = f"{abs(value):.{digits}f}"
    return ("+" if value > 0 else MINUS if value < 0 else "") + text if float(text) else text


def compute(expr: str, runs_of: Callable[[str], pd.DataFrame]) -> str:
    """The text of one `<!--n:...-->` expression, from `runs_of(scale)`."""
    head, *args = [part.strip() for part in expr.split("|")]
    function, _, scale = head.partition(" ")
    scale = scale.strip()
    if function == "mean" and len(args) == 3:
        return f"{_mean(runs_of, scale, args[0], args[1]):.{int(args[2])}f}"
    if function == "gap" and len(args) == 4:
        gap = _mean(runs_of, scale, args[0], args[2]) - _mean(runs_of, scale, args[1], args[2])
        return _signed(gap, int(args[3]))
    if function == "value" and len(args) == 2:
        runs = runs_of(scale)
        values = runs[runs["label"] == args[0]][args[1]].dropna().unique()
        if len(values) != 1:
            raise ProseError(f"{args[0]!r} runs have {len(values)} values of {args[1]}, not one")
        return f"{int(values[0]):,}"
    raise ProseError(f"unknown computation {expr!r}: mean, gap or value (see analysis/prose.py)")


def scales(text: str) -> set[str]:
    """The scales the prose numbers read."""
    found = set()
    for m in NUMBER.finditer(text):
        head, *args = m["expr"].split("|")
        found.add(head.strip().partition(" ")[2].strip())
        found |= {arg.partition("@")[2].strip() for arg in args if "@" in arg}
    return found


def render(text: str, runs_of: Callable[[str], pd.DataFrame]) -> str:
    return NUMBER.sub(lambda m: f"<!--n:{m['expr']}-->{compute(m['expr'], runs_of)}<!--/n-->", text)


def untraced(text: str) -> list[str]:
    """Typed numbers in the checked prose: not bound to a computation, not in a table, code span or link."""
    found = []
    for region in CHECKED.finditer(text):
        body = NUMBER.sub("", region["body"])
        body = re.sub(r"<!-- table:.*?<!-- end table -->", "", body, flags=re.S)
        body = re.sub(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->", "", body, flags=re.S)
        body = SETTING.sub("", body)  # DU(0.5), r = 0.75: a method's name and setting, not a result
        found += [m.group(0) for m in UNTRACEABLE.finditer(body)]
    return found
