"""Keep a Markdown report's tables and figures equal to what the runs produce.

A report marks each generated table with a pair of comments naming the table and the scale it comes from:

    <!-- table: seeds @ mini-seeds -->
    ...generated, do not edit...
    <!-- end table -->

and shows figures as `![caption](<assets>/<scale>-<figure>.png)`. The runs behind it are committed beside the
report as `<assets>/<scale>-runs.csv` (the table analysis.collect writes), so the tables can be re-rendered and
compared without the run directories.

    python -m analysis.report update docs/mini-reproduction.md   # copy runs.csv and figures from results/, re-render
    python -m analysis.report check docs/mini-reproduction.md    # re-render from the committed CSVs; fail on drift

Numbers in the prose are bound to computations over the same CSVs and re-rendered with the tables
(`analysis.prose`); in regions marked as checked prose, a typed number fails the check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

from analysis import prose, tables

ROOT = Path(__file__).resolve().parents[1]
TABLE_BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) @ (?P<scale>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end table -->)",
                         re.S)
FIGURE_LINK = re.compile(r"!\[[^\]]*\]\((?P<path>[^)]+?/(?P<scale>[\w.-]+?)-(?P<figure>\w+)\.png)\)")


def assets_dir(report: Path) -> Path:
    return report.with_suffix("")


def runs_csv(report: Path, scale: str) -> Path:
    return assets_dir(report) / f"{scale}-runs.csv"


def _read_runs(csv: Path) -> pd.DataFrame:
    # copy() consolidates read_csv's one block per column: a report filters these wide tables hundreds of times
    return pd.read_csv(csv).copy()


def render_table(report: Path, name: str, runs: pd.DataFrame) -> str:
    if name not in tables.TABLES:
        raise SystemExit(f"error: {report} names table {name!r}; tables: {', '.join(tables.TABLES)}")
    return tables.TABLES[name](runs).markdown()


def rendered(report: Path) -> str:
    """The report with its tables and its prose numbers (`analysis.prose`) re-rendered from the committed CSVs."""
    text = report.read_text()
    read: dict[str, pd.DataFrame] = {}

    def runs_of(scale: str) -> pd.DataFrame:  # read once: a report binds hundreds of numbers to a few CSVs
        if scale not in read:
            csv = runs_csv(report, scale)
            if not csv.is_file():
                raise SystemExit(f"error: {csv} is missing: run `python -m analysis.report update {report}` after "
                                 f"the runs of SCALE={scale} exist")
            # copy() consolidates read_csv's one block per column: the report filters these wide tables many times
            read[scale] = pd.read_csv(csv).copy()
        return read[scale]

    text = TABLE_BLOCK.sub(lambda m: m.group(1) + render_table(report, m["name"], runs_of(m["scale"])) + m.group(5),
                           text)
    try:
        return prose.render(text, runs_of)
    except prose.ProseError as err:
        raise SystemExit(f"error: {report}: {err}") from err


def update(report: Path, results: Path) -> list[Path]:
    """Copy each scale's runs.csv and the figures the report shows from results/, then re-render its tables."""
    text = report.read_text()
    scales = {m["scale"] for m in TABLE_BLOCK.finditer(text)} | {m["scale"] for m in FIGURE_LINK.finditer(text)} \
        | prose.scales(text)
    written = []
    assets_dir(report).mkdir(parents=True, exist_ok=True)
    # a scale not run here (make mini-seeds needs hours) keeps its committed runs and figures
    present = {scale for scale in scales if (results / scale / "runs.csv").is_file()}
    for scale in sorted(scales - present):
        print(f"[report] no runs of SCALE={scale} in {results}: keeping the report's committed ones")
    for scale in sorted(present):
        shutil.copyfile(results / scale / "runs.csv", runs_csv(report, scale))
        written.append(runs_csv(report, scale))
    for m in FIGURE_LINK.finditer(text):
        source = results / m["scale"] / f"{m['figure']}.png"
        if m["scale"] not in present:
            continue
        if not source.is_file():
            raise SystemExit(f"error: {source} is missing: the report shows it; render it with make figures "
                             f"SCALE={m['scale']}")
        target = report.parent / m["path"]
        shutil.copyfile(source, target)
        written.append(target)
    new = rendered(report)
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(report)
    return [*written, report]


def check(report: Path) -> list[str]:
    """What differs between the report and its tables re-rendered from the committed CSVs (empty: in sync)."""
    problems = []
    text = report.read_text()
    for m in FIGURE_LINK.finditer(text):
        if not (report.parent / m["path"]).is_file():
            problems.append(f"figure {m['path']} is missing")
    expected = rendered(report)
    if expected != text:
        diff = difflib.unified_diff(text.splitlines(), expected.splitlines(), "report", "re-rendered", lineterm="", n=0)
        problems.append("tables or prose numbers differ from their runs:\n" + "\n".join(diff))
    for number in prose.untraced(text):
        problems.append(f"the checked prose types the number {number!r}: bind it to its computation "
                        "(<!--n:...-->, analysis/prose.py) or leave it out")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["update", "check"])
    parser.add_argument("report", type=Path)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        raise SystemExit(f"error: no report at {args.report}")
    if args.action == "update":
        for path in update(args.report, args.results):
            print(f"[report] wrote {path}")
        return 0
    problems = check(args.report)
    for problem in problems:
        print(f"error: {args.report}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
