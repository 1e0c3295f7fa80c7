"""The paper's tables from the collected runs: Markdown, CSV and LaTeX.

Seeds are a sweep dimension: a cell shows the mean, and with several seeds "mean ± sd (n)". A value is bold as the
best of its column only when it is better than the runner-up by more than their seed spreads (mean ± sd
intervals do not overlap); with a single seed there is no spread to beat, so nothing is bold and the footnote says
so. Failed or unfinished settings appear with their status instead of numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.collect import DENSE_LABEL, SHARED_SUFFIX, STREAM_MARK, split_label
from dropup.init.registry import STRATEGIES
from dropup.init.router import TABLE8

TABLE1_ROWS = ("Dense", "FS", "BTX", "NU", "DU (r=0.5)", "DU (r=1)")
SHARED_ROWS = ("NU", "NU" + SHARED_SUFFIX, "DU (r=0.5)", "DU (r=0.5)" + SHARED_SUFFIX)
GRANULAR_ROWS = ("NU", "DU (r=0.5)", "NU, G=4", "NU, G=4 VG", "DU (r=0.5), G=4 VG")
BALANCING_ROWS = ("NU", "NU, per-rank LB", "NU, global-batch LB", "NU, aux-free", "DU (r=0.5)",
                  "DU (r=0.5), per-rank LB", "DU (r=0.5), global-batch LB", "DU (r=0.5), aux-free")


UNKNOWN_RANK = 5  # a label no init gives: after the paper's methods


def method_order(label: str) -> tuple:
    """Dense, FS, BTX, NU, then DU and RNU by ratio: the paper's row order (each init's `table_rank`); a variant (a
    shared expert, fine-grained experts, another balancing mode) right after the same method without it."""
    label, variant = split_label(label)
    if label == DENSE_LABEL:
        return (0, 0.0, variant)
    kind, _, rest = label.partition(" (r=")
    rank = next((cls.table_rank for cls in STRATEGIES.values() if cls.label == kind), UNKNOWN_RANK)
    return (rank, float(rest.rstrip(")")) if rest else 0.0, variant)


@dataclass
class Cell:
    mean: float | None
    sd: float | None
    n: int
    status: str = "completed"

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return self.status
        fmt = (lambda v: f"{v:.3g}") if abs(self.mean) >= 1e5 else (lambda v: f"{v:.{digits}f}")
        if self.n == 1:
            return fmt(self.mean)
        return f"{fmt(self.mean)} ± {fmt(self.sd)} ({self.n})"


def _summary(values: pd.Series) -> Cell:
    """mean ± sd (n) of some values; n = 0 when there are none."""
    if values.empty:
        return Cell(None, None, 0, "–")
    return Cell(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None, len(values))


def cell(runs: pd.DataFrame, column: str) -> Cell:
    done = runs[runs["status"] == "completed"]
    if not done.empty and (column not in done or done[column].isna().all()):
        return Cell(None, None, 0, "–")  # completed, but the metric does not apply (e.g. routing of a dense model)
    if done.empty:
        statuses = sorted(set(runs["status"])) if not runs.empty else ["missing"]
        return Cell(None, None, 0, "/".join(statuses))
    return _summary(done[column].dropna().astype(float))


def best_rows(cells: dict[str, Cell], lower_is_better: bool = True) -> set[str]:
    """Rows whose value beats every other row by more than the seed spread (empty if undecidable)."""
    scored = [(k, c) for k, c in cells.items() if c.n > 0]
    if len(scored) < 2:
        return set()
    scored.sort(key=lambda kc: kc[1].mean if lower_is_better else -kc[1].mean)
    (best, b), (_, r) = scored[0], scored[1]
    if b.n < 2 or r.n < 2:
        return set()
    gap = (r.mean - b.mean) if lower_is_better else (b.mean - r.mean)
    return {best} if gap > b.sd + r.sd else set()


@dataclass
class Table:
    name: str
    caption: str
    rows: list[str]
    columns: list[tuple[str, str, bool]]  # (header, DataFrame column, lower is better)
    cells: dict[tuple[str, str], Cell]
    bold: dict[str, set[str]]
    notes: list[str]

    def frame(self) -> pd.DataFrame:
        """Numbers for CSV: one row per table row, mean/sd/n per column."""
        records = []
        for row in self.rows:
            record = {"row": row}
            for header, _, _ in self.columns:
                c = self.cells[(row, header)]
                record.update({header: c.mean, f"{header} sd": c.sd, f"{header} n": c.n,
                               f"{header} status": c.status if c.n == 0 else "completed"})
            records.append(record)
        return pd.DataFrame(records)

    def markdown(self) -> str:
        headers = ["", *[h for h, _, _ in self.columns]]
        lines = [f"**{self.caption}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for row in self.rows:
            values = []
            for header, _, _ in self.columns:
                text = self.cells[(row, header)].text()
                values.append(f"**{text}**" if row in self.bold[header] else text)
            lines.append(f"| {row} | " + " | ".join(values) + " |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def latex(self) -> str:
        cols = "l" + "r" * len(self.columns)
        out = [r"\begin{table}[t]", r"\centering", f"\\caption{{{self.caption}}}", f"\\begin{{tabular}}{{{cols}}}",
               r"\toprule", " & ".join(["", *[h.replace("_", r"\_") for h, _, _ in self.columns]]) + r" \\",
               r"\midrule"]
        for row in self.rows:
            values = []
            for header, _, _ in self.columns:
                text = self.cells[(row, header)].text().replace("±", r"$\pm$")
                values.append(f"\\textbf{{{text}}}" if row in self.bold[header] else text)
            out.append(" & ".join([row, *values]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(out) + "\n"

    def write(self, directory: Path) -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = {ext: directory / f"{self.name}.{ext}" for ext in ("md", "csv", "tex")}
        for ext, content in (("md", self.markdown()), ("tex", self.latex())):
            tmp = paths[ext].with_suffix(f".{ext}.tmp")
            tmp.write_text(content)
            tmp.replace(paths[ext])
        tmp = paths["csv"].with_suffix(".csv.tmp")
        self.frame().to_csv(tmp, index=False)
        tmp.replace(paths["csv"])
        return paths


def _domains(runs: pd.DataFrame) -> list[str]:
    return sorted({c.split("/", 1)[1] for c in runs.columns if c.startswith("metrics.val_loss/")},
                  key=lambda d: ["ja", "en", "code"].index(d) if d in ("ja", "en", "code") else 9)


def _score_columns(runs: pd.DataFrame) -> list[str]:
    """Each task's score column, then their average last (as the paper's Table 1); eval/n_tasks is a count."""
    tasks = sorted(c for c in runs.columns if c.startswith("metrics.eval/")
                   and c not in ("metrics.eval/avg", "metrics.eval/n_tasks"))
    return tasks + (["metrics.eval/avg"] if "metrics.eval/avg" in runs.columns else [])


def _narrow(runs: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Only the columns a table reads, before it filters rows many times (a runs.csv has hundreds of settings)."""
    wanted = dict.fromkeys(("label", "role", "status", "seed", "tokens", "data_stream_version", *columns))
    return runs[[c for c in wanted if c in runs]]


def build(name: str, caption: str, runs: pd.DataFrame, rows: list[str], key: str,
          columns: list[tuple[str, str, bool]]) -> Table:
    cells, bold = {}, {}
    runs = _narrow(runs, key, *(column for _, column, _ in columns))
    for header, column, lower in columns:
        column_cells = {row: cell(runs[runs[key] == row], column) for row in rows}
        cells.update({(row, header): c for row, c in column_cells.items()})
        bold[header] = best_rows(column_cells, lower)
    seeds = [c.n for c in cells.values() if c.n]
    notes = [f"Runs: {len(runs)} collected; cells show mean ± sd (seeds) where a setting has several seeds."]
    if seeds and max(seeds) < 2:
        notes.append("One seed per setting: no seed spread, so no value is marked best.")
    return Table(name, caption, list(rows), columns, cells, bold, notes)


def table1(runs: pd.DataFrame) -> Table:
    """Per-domain validation loss and their mean for Dense, FS, BTX, NU, DU r=0.5, DU r=1.0 (+ task scores)."""
    runs = runs[runs["role"].isin(["run", "seed"])]
    columns = [(f"val {d}", f"metrics.val_loss/{d}", True) for d in _domains(runs)]
    columns.append(("val avg", "metrics.val_loss", True))
    columns += [(c.split("/", 1)[1], c, False) for c in _score_columns(runs)]
    columns.append(("routing JSD", "metrics.routing/specialization", False))
    older = [l for l in sorted(set(runs["label"].dropna()), key=method_order) if STREAM_MARK.search(l)
             and STREAM_MARK.sub("", l) in TABLE1_ROWS]
    rows = sorted([*TABLE1_ROWS, *older], key=lambda l: (TABLE1_ROWS.index(STREAM_MARK.sub("", l)), l))
    table = build("table1", "Table 1: validation loss by MoE initialization", runs, rows, "label", columns)
    table.bold["routing JSD"] = set()  # descriptive, not a score to win
    return table


def table2(runs: pd.DataFrame) -> Table:
    """Parameters, tokens, training FLOPs and results per method (paper Table 2's columns)."""
    runs = runs[runs["role"].isin(["run", "seed"])].copy()
    runs["setting"] = runs["label"] + " " + runs["model"].astype(str)
    order = list(dict.fromkeys(runs.assign(key=runs["label"].map(method_order)).sort_values(["key", "model"])["setting"]))
    columns = [("active params (M)", "active_m", True), ("total params (M)", "total_m", True),
               ("tokens (M)", "tokens_m", True), ("FLOPs", "train_flops", True), ("val avg", "metrics.val_loss", True)]
    runs["active_m"] = runs["active_params"] / 1e6
    runs["total_m"] = runs["total_params"] / 1e6
    runs["tokens_m"] = runs["tokens"] / 1e6
    table = build("table2", "Table 2: compute and results per model", runs, order, "setting", columns)
    for header in ("active params (M)", "total params (M)", "tokens (M)", "FLOPs"):
        table.bold[header] = set()
    return table


def table8(runs: pd.DataFrame) -> Table:
    """Naive Upcycling with each router initialization of Table 8."""
    runs = runs[(runs["role"] == "run") & (runs["label"] == "NU")]
    columns = [(f"val {d}", f"metrics.val_loss/{d}", True) for d in _domains(runs)]
    columns.append(("val avg", "metrics.val_loss", True))
    return build("table8", "Table 8: router initialization for naive Upcycling", runs, list(TABLE8), "router", columns)


def shared(runs: pd.DataFrame) -> Table:
    """NU and DU r=0.5 with and without a shared expert (sweeps/shared.yaml), with the parameter counts that show
    how they are matched, and the routing of the routed experts."""
    runs = runs[runs["role"] == "run"].copy()
    runs["active_m"], runs["total_m"] = runs["active_params"] / 1e6, runs["total_params"] / 1e6
    columns = [(f"val {d}", f"metrics.val_loss/{d}", True) for d in _domains(runs)]
    columns += [("val avg", "metrics.val_loss", True), ("active params (M)", "active_m", True),
                ("total params (M)", "total_m", True), ("max expert share ×E", "metrics.routing/imbalance", True),
                ("routing JSD", "metrics.routing/specialization", False)]
    table = build("shared", "Shared expert: NU and DU r=0.5 with and without one", runs, list(SHARED_ROWS), "label",
                  columns)
    for header in ("active params (M)", "total params (M)", "max expert share ×E", "routing JSD"):
        table.bold[header] = set()  # descriptive, not scores to win
    return table


def _ablation(name: str, caption: str, runs: pd.DataFrame, rows: tuple[str, ...], extra: list) -> Table:
    runs = runs[runs["role"] == "run"]
    columns = [(f"val {d}", f"metrics.val_loss/{d}", True) for d in _domains(runs)]
    columns += [("val avg", "metrics.val_loss", True), ("val at step 0", "metrics.val_loss_step0", True), *extra,
                ("expert similarity", "metrics.expert_similarity", False),
                ("max expert share ×E", "metrics.routing/imbalance", True),
                ("routing JSD", "metrics.routing/specialization", False)]
    table = build(name, caption, runs, list(rows), "label", columns)
    for header, _, _ in columns[len(_domains(runs)) + 1:]:
        table.bold[header] = set()  # descriptive, not scores to win
    return table


def granular(runs: pd.DataFrame) -> Table:
    """Fine-grained experts (G = 4: 32 experts of d_ff/4, top-8) upcycled with and without virtual groups, against
    the G = 1 runs (sweeps/granular.yaml)."""
    return _ablation("granular", "Granular upcycling: G = 4 with and without virtual groups, against G = 1", runs,
                     GRANULAR_ROWS, [])


def balancing(runs: pd.DataFrame) -> Table:
    """NU and DU r=0.5 under the three load-balancing modes (sweeps/balancing.yaml)."""
    return _ablation("balancing", "Load balancing: pooled (the paper's), global-batch and auxiliary-loss-free",
                     runs, BALANCING_ROWS, [("train LB loss", "metrics.lb_loss", True)])


# Student's t, 97.5th percentile, by degrees of freedom (seeds - 1): the paired t-test's 5 % two-sided threshold
T_CRITICAL_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def paired_differences(done: pd.DataFrame, label: str, reference: str, column: str) -> pd.Series:
    """label minus reference in `column` of completed runs, seed by seed (a seed fixes data order and MoE init, within
    one version of the data streams: runs of another version are not paired)."""
    keys = ["seed", "data_stream_version"] if "data_stream_version" in done else ["seed"]
    a = done[done["label"] == label].set_index(keys)[column].dropna()
    b = done[done["label"] == reference].set_index(keys)[column].dropna()
    return (a - b).dropna().astype(float).reset_index(level=keys[1:], drop=True)


def paired_t(differences: pd.Series) -> float:
    """The paired t statistic of per-seed differences (infinite when they do not vary)."""
    sd = differences.std(ddof=1)
    return float(differences.mean() / (sd / len(differences) ** 0.5)) if sd else float("inf")


def t_critical(pairs: int) -> float:
    return T_CRITICAL_95.get(pairs - 1, 2.0)


def stream_versions(runs: pd.DataFrame, label: str) -> set[int]:
    """The data-stream versions the label's runs trained on (empty: not known, no run wrote its results yet)."""
    if "data_stream_version" not in runs:
        return {1}
    return set(runs.loc[runs["label"] == label, "data_stream_version"].dropna().astype(int))


def seeds(runs: pd.DataFrame, reference: str = "NU", name: str = "seeds", differences_only: bool = False) -> Table:
    """Every method over several seeds, then each method's paired difference to NU and whether it beats the spread.

    A difference "beats the seed spread" by the same rule that bolds a table cell: |mean difference| is larger than
    the two methods' seed standard deviations added. The note also counts the seeds in which the sign agrees.
    """
    runs = runs[runs["role"].isin(["run", "seed"])]
    # paired differences compare runs that went equally far: leave out runs stopped at another budget (the r
    # sweep's extra ratios stop at 0.3 of the schedule, as Fig. 4 does)
    budget = runs.loc[(runs["label"] == reference) & (runs["role"] == "run"), "tokens"].dropna()
    other_budget = pd.Series(False, index=runs.index)
    if not budget.empty:
        other_budget = (runs["role"] == "run") & runs["tokens"].notna() & (runs["tokens"] != budget.max())
    left_out = sorted(set(runs.loc[other_budget, "label"]), key=method_order)
    runs = runs[~other_budget]
    labels = sorted(set(runs["label"].dropna()), key=method_order)
    columns = [(f"val {d}", f"metrics.val_loss/{d}", True) for d in _domains(runs)]
    columns.append(("val avg", "metrics.val_loss", True))
    routing = [("max expert share ×E", "metrics.routing/imbalance", True), ("routing JSD", "metrics.routing/specialization", False)]
    columns += [c for c in routing if c[1] in runs]
    runs = _narrow(runs, *(column for _, column, _ in columns))
    caption = (f"Paired differences to {reference} over seeds" if differences_only else
               f"Seeds: validation loss over seeds, and paired differences to {reference}")
    table = build(name, caption, runs, labels, "label", columns)
    for header, _, _ in routing:
        table.bold[header] = set()  # descriptive, not a score to win
    done = runs[runs["status"] == "completed"]
    compared = [l for l in labels if split_label(l)[0] != DENSE_LABEL and l != reference]
    versions = {label: stream_versions(runs, label) for label in [*compared, reference]}
    unpaired = [l for l in compared if versions[reference] and versions[l] and versions[l] != versions[reference]]
    for label in (l for l in compared if l not in unpaired):
        row = f"{label} − {reference}"
        table.rows.append(row)
        for header, column, _ in columns:
            table.cells[(row, header)] = _summary(paired_differences(done, label, reference, column))
        diff, a = table.cells[(row, "val avg")], table.cells[(label, "val avg")]
        b = table.cells.get((reference, "val avg"), Cell(None, None, 0, "missing"))
        if diff.n < 2 or a.sd is None or b.sd is None:
            table.notes.append(f"{row} (val avg): fewer than two paired seeds, no verdict.")
            continue
        per_seed = paired_differences(done, label, reference, "metrics.val_loss")
        same_sign = int((per_seed < 0).sum()) if diff.mean < 0 else int((per_seed > 0).sum())
        beats = abs(diff.mean) > a.sd + b.sd
        t = paired_t(per_seed)
        critical = t_critical(diff.n)
        table.notes.append(
            f"{row} (val avg): {diff.mean:+.4f} ± {diff.sd:.4f} over {diff.n} seeds, same sign in {same_sign}/"
            f"{diff.n}; {'beats' if beats else 'does not beat'} the seed spread "
            f"(|Δ| {abs(diff.mean):.4f} vs sd {a.sd:.4f} + {b.sd:.4f} = {a.sd + b.sd:.4f}); paired t = {t:.1f} "
            f"({'significant' if abs(t) > critical else 'not significant'} at 5 %, two-sided: |t| > {critical:.2f}).")
    if unpaired:
        table.notes.append(f"Not paired with {reference} (trained on another version of the data streams, where a "
                           f"seed orders the data differently): {', '.join(unpaired)}.")
    if left_out:
        table.notes.append(f"Left out, trained to another budget than {reference}'s {budget.max() / 1e6:.2f} M "
                           f"tokens: {', '.join(left_out)}.")
    if differences_only:
        table.rows = [row for row in table.rows if row.endswith(f" − {reference}")]
    return table


TABLES = {"table1": table1, "table2": table2, "table8": table8, "seeds": seeds, "shared": shared,
          "granular": granular, "balancing": balancing,
          "seeds_vs_du": lambda runs: seeds(runs, "DU (r=0.5)", "seeds_vs_du", differences_only=True)}


def render(name: str, runs: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    return TABLES[name](runs).write(Path(out_dir))
