"""Numbers in a report's prose, rendered from the runs like its tables.

A number in the prose is written with the computation it comes from, in an HTML comment that Markdown hides:

    BTX − DU(0.5) is <!--n:gap mini | BTX | DU (r=0.5) | val_loss | 3-->−0.051<!--/n-->

`analysis.report update` re-renders the text between the comments and `analysis.report check` fails where it
differs, exactly as for the tables. The computations read the scale's committed `runs.csv` (runs and seeds). A
label may name another scale's runs: `BTX @ mini-btx-flops`. METRIC is a `metrics.<METRIC>` column, COLUMN any
column (`cfg.train.lr`, `train_flops`); DIGITS is the number of decimals.

- `mean SCALE | LABEL | METRIC | DIGITS`, `sd ...`: mean or sample standard deviation over the label's runs (seeds);
- `gap SCALE | A | B | METRIC | DIGITS`: mean(A) − mean(B), from unrounded means, signed;
- `paired SCALE | A | B | METRIC | DIGITS`: A − B seed by seed, as "mean ± sd" (signed mean);
- `t SCALE | A | B | METRIC`: the paired t statistic, one decimal; `tcrit SCALE | A | B`: the 5 % two-sided
  threshold for that many paired seeds; `signs SCALE | A | B | METRIC`: "k/n", the seeds whose difference has the
  sign of the mean; `perseed SCALE | A | B | METRIC | DIGITS`: the differences by seed, "a / b / c";
- `value SCALE | LABEL | COLUMN [| SPEC [| FACTOR]]`: a value every run of the label shares (a parameter count, a
  setting), times FACTOR, formatted with the Python format SPEC (default: an integer with thousands separators;
  `raw` prints the CSV's text);
- `ratio SCALE | A | B | COLUMN | DIGITS`: mean(A) / mean(B) of a column (FLOPs, wall time);
- `calc SCALE | SPEC | EXPRESSION`: anything else, as an arithmetic expression over `mean(label, metric)`,
  `sd(label, metric)`, `value(label, column)` and `gap(a, b, metric)`, formatted with SPEC; `low(label, column)` and
  `high(label, column)` are the least and greatest value of any column over the label's runs (wall time over seeds),
  and `min(x, y, ...)`, `max(x, y, ...)` the least and greatest of their arguments (a range over several labels);
  `count(label)` is how many completed runs (seeds) the label has.

In a Markdown table cell the separators are written `\\|` (an unescaped `|` would split the cell):
`<!--n:mean mini \\| NU \\| val_loss \\| 3-->`.

Inside `<!-- prose: checked -->` ... `<!-- end prose -->`, a decimal number or a percentage that is not bound this
way (outside tables, code, links and method names such as DU(0.5) or r = 0.5) fails the check: a typed number
cannot be traced to the runs. A number that is not a result (a paper's section, a significance level) says so:
`<!--k:the paper's section-->5.1<!--/k-->`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

import pandas as pd

from analysis.tables import paired_differences, paired_t, t_critical

NUMBER = re.compile(r"<!--n:(?P<expr>.+?)-->(?P<text>.*?)<!--/n-->", re.S)
CONSTANT = re.compile(r"<!--k:(?P<why>[^>]+?)-->(?P<text>.*?)<!--/k-->", re.S)
CHECKED = re.compile(r"<!-- prose: checked -->(?P<body>.*?)<!-- end prose -->", re.S)
UNTRACEABLE = re.compile(r"(?<![\w.])\d+\.\d+|\d+(\.\d+)?\s?%")
SETTING = re.compile(r"\b[A-Z]{2,4}\s*\(\s*(r\s*=\s*)?\d+(\.\d+)?\s*\)|\br\s*=\s*\d+(\.\d+)?")
MINUS = "\u2212"

RunsOf = Callable[[str], pd.DataFrame]


class ProseError(ValueError):
    pass


def _runs(runs_of: RunsOf, scale: str, label: str) -> pd.DataFrame:
    """The label's runs and seeds; `label @ other-scale` reads another scale's."""
    label, _, other = (part.strip() for part in label.partition("@"))
    runs = runs_of(other or scale)
    rows = runs[(runs["label"] == label) & runs["role"].isin(["run", "seed"])]
    if "status" in rows:
        rows = rows[rows["status"] == "completed"]
    if rows.empty:
        raise ProseError(f"no completed {label!r} run in SCALE={other or scale}")
    return rows


def _column(rows: pd.DataFrame, column: str) -> pd.Series:
    if column not in rows or rows[column].isna().all():
        raise ProseError(f"no {rows['label'].iloc[0]!r} run with {column}")
    return rows[column].dropna()


def _floats(runs_of: RunsOf, scale: str, label: str, column: str) -> pd.Series:
    """Any column of the label's runs (seeds), as numbers."""
    return _column(_runs(runs_of, scale, label), column).astype(float)


def _mean(runs_of: RunsOf, scale: str, label: str, metric: str) -> float:
    return float(_column(_runs(runs_of, scale, label), f"metrics.{metric}").astype(float).mean())


def _sd(runs_of: RunsOf, scale: str, label: str, metric: str) -> float:
    values = _column(_runs(runs_of, scale, label), f"metrics.{metric}").astype(float)
    if len(values) < 2:
        raise ProseError(f"{label!r} has {len(values)} run of {metric}: no standard deviation")
    return float(values.std(ddof=1))


def _paired(runs_of: RunsOf, scale: str, a: str, b: str, metric: str) -> pd.Series:
    """A − B seed by seed (`tables.paired_differences`), refused where the two read different data streams."""
    rows_a, rows_b = _runs(runs_of, scale, a), _runs(runs_of, scale, b)
    version = "data_stream_version"
    if version in rows_a and version in rows_b:
        va, vb = set(rows_a[version].fillna(1)), set(rows_b[version].fillna(1))
        if va != vb or len(va) != 1:
            raise ProseError(f"{a!r} (streams {sorted(va)}) and {b!r} (streams {sorted(vb)}) read different data "
                             "streams: their seeds are not paired")
    # the two may come from different scales (`label @ scale`): paired as one table under two names
    both = pd.concat([rows_a.assign(label="A"), rows_b.assign(label="B")], ignore_index=True)
    diff = paired_differences(both, "A", "B", f"metrics.{metric}")
    if len(diff) < 2:
        raise ProseError(f"{a!r} and {b!r} share {len(diff)} seed(s) with {metric}: nothing to pair")
    return diff.sort_index()


def _value(runs_of: RunsOf, scale: str, label: str, column: str):
    values = _column(_runs(runs_of, scale, label), column).unique()
    if len(values) != 1:
        raise ProseError(f"{label!r} runs have {len(values)} values of {column}, not one")
    return values[0]


def _signed(value: float, digits: int) -> str:
    text = f"{abs(value):.{digits}f}"
    return ("+" if value > 0 else MINUS if value < 0 else "") + text if float(text) else text


def _unsigned(value: float, digits: int) -> str:
    return f"{value:.{digits}f}".replace("-", MINUS)


def _format(value, spec: str) -> str:
    if spec == "raw":
        return str(value)
    if spec.startswith("+"):
        return _signed(float(value), int(spec[1:].rstrip("f").lstrip(".")))
    text = format(float(value) if spec.endswith(("f", "%", "e", "g")) else value, spec)
    return text.replace("-", MINUS)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.Pow: operator.pow}


def _calc(expression: str, functions: dict[str, Callable]) -> float:
    """Arithmetic over the named functions with string and number literals; nothing else is evaluated."""
    def visit(node):
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](visit(node.left), visit(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](visit(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions \
                and not node.keywords:
            return functions[node.func.id](*[visit(arg) for arg in node.args])
        raise ProseError(f"calc understands arithmetic over {', '.join(functions)}, not {ast.unparse(node)!r}")
    try:
        return visit(ast.parse(expression, mode="eval"))
    except SyntaxError as err:
        raise ProseError(f"calc: {expression!r} is not an expression") from err


def _parts(expr: str) -> list[str]:
    """The expression's fields; `\\|` (a table cell's escaped pipe) separates them like `|`."""
    return [part.strip() for part in expr.replace("\\|", "|").split("|")]


def compute(expr: str, runs_of: RunsOf) -> str:
    """The text of one `<!--n:...-->` expression, from `runs_of(scale)`."""
    head, *args = _parts(expr)
    function, _, scale = head.partition(" ")
    scale = scale.strip()
    n = len(args)
    if function in ("mean", "sd") and n == 3:
        value = (_mean if function == "mean" else _sd)(runs_of, scale, args[0], args[1])
        return _unsigned(value, int(args[2]))
    if function == "gap" and n == 4:
        gap = _mean(runs_of, scale, args[0], args[2]) - _mean(runs_of, scale, args[1], args[2])
        return _signed(gap, int(args[3]))
    if function in ("paired", "perseed") and n == 4:
        diff, digits = _paired(runs_of, scale, *args[:3]), int(args[3])
        if function == "perseed":
            return " / ".join(_signed(d, digits) for d in diff)
        return f"{_signed(diff.mean(), digits)} ± {diff.std(ddof=1):.{digits}f}"
    if function == "t" and n == 3:
        t = paired_t(_paired(runs_of, scale, *args))
        return _unsigned(t, 1) if math.isfinite(t) else "∞"
    if function == "tcrit" and n == 2:
        pairs = len(set(_runs(runs_of, scale, args[0])["seed"]) & set(_runs(runs_of, scale, args[1])["seed"]))
        return f"{t_critical(pairs):.2f}"
    if function == "signs" and n == 3:
        diff = _paired(runs_of, scale, *args)
        return f"{int(((diff > 0) if diff.mean() > 0 else (diff < 0)).sum())}/{len(diff)}"
    if function == "value" and 2 <= n <= 4:
        value = _value(runs_of, scale, args[0], args[1])
        if n == 2:
            return f"{int(value):,}"
        return _format(float(value) * float(args[3]) if n == 4 else value, args[2])
    if function == "ratio" and n == 4:
        column = args[2]
        a = _column(_runs(runs_of, scale, args[0]), column).astype(float).mean()
        b = _column(_runs(runs_of, scale, args[1]), column).astype(float).mean()
        return f"{a / b:.{int(args[3])}f}"
    if function == "calc" and n >= 2:
        functions = {"mean": lambda label, metric: _mean(runs_of, scale, label, metric),
                     "sd": lambda label, metric: _sd(runs_of, scale, label, metric),
                     "value": lambda label, column: float(_value(runs_of, scale, label, column)),
                     "gap": lambda a, b, metric: _mean(runs_of, scale, a, metric) - _mean(runs_of, scale, b, metric),
                     "low": lambda label, column: float(_floats(runs_of, scale, label, column).min()),
                     "high": lambda label, column: float(_floats(runs_of, scale, label, column).max()),
                     "min": lambda *xs: min(xs), "max": lambda *xs: max(xs),
                     "count": lambda label: float(len(_runs(runs_of, scale, label)))}
        return _format(_calc("|".join(args[1:]), functions), args[0])
    raise ProseError(f"unknown computation {expr!r}: mean, sd, gap, paired, t, tcrit, signs, perseed, value, ratio "
                     "or calc, with their arguments (see analysis/prose.py)")


def scales(text: str) -> set[str]:
    """The scales the prose numbers read."""
    found = set()
    for m in NUMBER.finditer(text):
        head, *args = _parts(m["expr"])
        found.add(head.partition(" ")[2].strip())
        found |= {scale for arg in args for scale in re.findall(r"@\s*([\w.-]+)", arg)}  # calc names several
    return found


def render(text: str, runs_of: RunsOf) -> str:
    def one(m):
        try:
            return f"<!--n:{m['expr']}-->{compute(m['expr'], runs_of)}<!--/n-->"
        except ProseError as err:
            raise ProseError(f"<!--n:{m['expr']}-->: {err}") from err
    return NUMBER.sub(one, text)


def untraced(text: str) -> list[str]:
    """Typed numbers in the checked prose: not bound to a computation, not in a table, code span or link."""
    found = []
    for region in CHECKED.finditer(text):
        body = CONSTANT.sub("", NUMBER.sub("", region["body"]))
        body = re.sub(r"<!-- table:.*?<!-- end table -->", "", body, flags=re.S)
        body = re.sub(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->", "", body, flags=re.S)
        body = SETTING.sub("", body)  # DU(0.5), r = 0.75: a method's name and setting, not a result
        found += [m.group(0) for m in UNTRACEABLE.finditer(body)]
    return found
