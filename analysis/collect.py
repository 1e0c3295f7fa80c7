"""Run directories -> one tidy pandas DataFrame (one row per run) and the learning curves (one row per log row).

A run directory is any folder with `results.json` or `.hydra/config.yaml` (from the local launcher, SLURM, or
copied from a cluster). Runs that failed or never finished stay in the table with their status -- never silently
dropped. Dense seed models and BTX branches that MoE runs name in their provenance are collected too
(`role` = "seed" / "branch"), so Table 1's Dense row is the seed the MoE runs started from.

    python -m analysis.collect results/smoke/runs --out results/smoke/runs.csv
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd
import yaml

from dropup import balancing, liveness
from dropup.init.registry import STRATEGIES, name_of_target
from dropup.routing import summarize

STATUS_ORDER = ("completed", "running", "died", "failed", "incomplete")
DENSE_LABEL = "Dense"
SHARED_SUFFIX = " + shared"
# the paper's method names at the start of a label: Dense, and each init's (with its ratio where it has one)
_BASE_LABEL = re.compile("|".join(
    [rf"{re.escape(cls.label)} \(r=[0-9.e-]+\)" for cls in STRATEGIES.values() if cls.labels_ratio]
    + [re.escape(DENSE_LABEL)] + [re.escape(cls.label) for cls in STRATEGIES.values() if not cls.labels_ratio]))


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = obj if not isinstance(obj, list) else json.dumps(obj)


def label(init: str | None, ratio, moe_enabled: bool, shared_expert: bool = False, granularity: int = 1,
          virtual_groups: bool = False, lb_mode: str | None = None, ranks: int = 1) -> str:
    """The paper's method names (each init's `table_label`): Dense, FS, NU (naive, or drop at r = 0), DU (r=...),
    BTX, RNU (r=...). What the paper does not have makes a method of its own in every table, named by suffixes:
    " + shared" (a shared expert), ", G=4" or ", G=4 VG" (fine-grained experts, in virtual groups), ", aux-free"
    etc. (a load-balancing mode other than pooled in one process: ", per-rank LB" is pooled on each of several
    data-parallel ranks; `dropup.balancing`)."""
    if not moe_enabled:
        return DENSE_LABEL
    variant = SHARED_SUFFIX if shared_expert else ""
    if granularity > 1:
        variant += f", G={granularity}" + (" VG" if virtual_groups else "")
    if lb_mode is not None:
        spec = balancing.MODES.get(lb_mode)
        variant += spec.table_suffix(ranks) if spec is not None else f", {lb_mode}"
    cls = STRATEGIES.get(init) if isinstance(init, str) else None
    base = cls.table_label(ratio) if cls is not None else str(init)
    return base + variant


def split_label(label: str) -> tuple[str, str]:
    """(the paper's method name, the variant suffixes) of a label."""
    match = _BASE_LABEL.match(str(label))
    return (match.group(0), str(label)[match.end():]) if match else (str(label), "")


def _config(run_dir: Path) -> dict:
    for path in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def _init_name(cfg: dict) -> str | None:
    """The init's name from its `_target_` (for runs that died before writing results.json)."""
    return name_of_target(str((cfg.get("init") or {}).get("_target_", "")))


def _takes_ratio(init: str | None) -> bool:
    cls = STRATEGIES.get(init) if isinstance(init, str) else None
    return cls is not None and cls.option("ratio") is not None


def read_run(run_dir: Path, role: str = "run") -> dict:
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    except json.JSONDecodeError:
        results = {}
    status = liveness.state(results, results_path) if results else "incomplete"  # "died": killed mid-run
    init = results.get("init") or _init_name(cfg)
    moe_enabled = bool((cfg.get("moe") or {}).get("enabled", results.get("moe", "none") != "none"))
    ratio = results.get("ratio", (cfg.get("init") or {}).get("ratio"))
    shared_d_ff = int(results.get("shared_expert_d_ff") or 0)
    moe_cfg = cfg.get("moe") or {}
    granularity = int(moe_cfg.get("granularity") or 1)
    virtual_groups = bool(results.get("virtual_groups", False))
    lb_mode = results.get("lb_mode") or moe_cfg.get("lb_mode")
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices")  # an int, or e.g. "auto" on a GPU machine: counted as one rank
    ranks = devices * int(trainer.get("num_nodes") or 1) if isinstance(devices, int) else 1
    row = {
        "run_id": run_dir.name if role == "run" else f"{role}:{run_dir.name}",
        "path": str(run_dir.resolve()), "role": role, "status": status,
        "label": label(init, ratio, moe_enabled, shared_d_ff > 0, granularity, virtual_groups, lb_mode, ranks), "init": init, "ratio": ratio if _takes_ratio(init) else None,
        "seed": results.get("seed", cfg.get("seed")), "model": results.get("model", (cfg.get("model") or {}).get("name")),
        "moe": results.get("moe", "mixtral" if moe_enabled else "none"),
        "router": (cfg.get("init") or {}).get("router"), "shared_expert_d_ff": shared_d_ff,
        "granularity": granularity, "virtual_groups": virtual_groups, "lb_mode": lb_mode, "ranks": ranks,
        "tokens": results.get("tokens"), "steps": results.get("steps"), "train_flops": results.get("train_flops"),
        "schedule_tokens": results.get("schedule_tokens", results.get("tokens")),
        "total_params": results.get("total_params"), "active_params": results.get("active_params"),
        "error": results.get("error"),
        "wall_time_s": (results.get("provenance") or {}).get("wall_time_s"),
        # which version of the data streams trained it (dropup.data.DATA_STREAM_VERSION); runs that predate the
        # field recorded none and trained on version 1; a run that wrote no results.json yet: unknown
        "data_stream_version": int((results.get("provenance") or {}).get("data_stream") or 1) if results else None,
        "seed_model": json.dumps((results.get("provenance") or {}).get("seed_model")),
    }
    for key, value in (results.get("metrics") or {}).items():
        row[f"metrics.{key}"] = value
    step0, last_lb, scoring_cost = _from_metrics_csv(run_dir / "metrics.csv")
    row.update({f"metrics.{k}": v for k, v in scoring_cost.items()})
    if step0 is not None:  # before any update: whether the init kept the dense function
        row["metrics.val_loss_step0"] = step0
    if last_lb is not None and "metrics.lb_loss" not in row:  # runs from before lb_loss was a final metric
        row["metrics.lb_loss"] = last_lb
    routing = run_dir / "routing.json"
    if routing.is_file() and "metrics.routing/specialization" not in row:  # runs from before the summaries
        counts = json.loads(routing.read_text())["tokens_per_expert"]
        row.update({f"metrics.{k}": v for k, v in summarize(counts).items()})
    flat: dict = {}
    _flatten("cfg", {k: v for k, v in cfg.items() if k not in ("hydra",)}, flat)
    row.update(flat)
    return row


def _from_metrics_csv(path: Path) -> tuple[float | None, float | None, dict]:
    """(validation loss at step 0, the last logged training balance loss, the scoring's cost) of a run's
    metrics.csv. The cost: `eval_total_s`, the seconds all its downstream scorings took, and `eval_share`, their share
    of the run's wall time. That wall time is read off the log: each launch's last `elapsed_s` (its clock runs from
    its first training step and includes the validations and scorings in between; a resumed run has several launches,
    each a drop of the clock), plus the scorings at step 0 and at the last step, which fall outside those clocks."""
    if not path.is_file() or not path.stat().st_size:
        return None, None, {}
    table = pd.read_csv(path)
    step0 = lb = None
    if "val_loss" in table:
        first = table[(table["step"] == 0) & table["val_loss"].notna()]
        step0 = float(first["val_loss"].iloc[0]) if not first.empty else None
    if "lb_loss" in table and table["lb_loss"].notna().any():
        lb = float(table["lb_loss"].dropna().iloc[-1])
    cost = {}
    if "eval_s" in table and table["eval_s"].notna().any() and "elapsed_s" in table:
        scorings = table.dropna(subset=["eval_s"])
        cost = {"eval_total_s": float(scorings["eval_s"].sum())}
        clock = table["elapsed_s"].dropna()
        if not clock.empty:  # a run that has not logged a training step yet has no wall time to share
            launches = (clock.diff() < 0).cumsum()  # the clock restarts with each launch
            outside = scorings.loc[scorings["step"].isin([0, table["step"].max()]), "eval_s"].sum()
            cost["eval_share"] = cost["eval_total_s"] / float(clock.groupby(launches).max().sum() + outside)
    return step0, lb, cost


def find_run_dirs(roots) -> list[Path]:
    found = set()
    for root in map(Path, roots):
        if not root.exists():
            continue
        for marker in list(root.rglob("results.json")) + list(root.rglob(".hydra/config.yaml")):
            run_dir = marker.parent if marker.name == "results.json" else marker.parent.parent
            if "checkpoints" not in run_dir.parts:
                found.add(run_dir.resolve())
    return sorted(found)


def _referenced(rows: list[dict]) -> list[tuple[Path, str]]:
    refs = []
    for row in rows:
        ref = json.loads(row["seed_model"]) if row.get("seed_model") else None
        paths = ref if isinstance(ref, list) else [ref] if ref else []
        for i, path in enumerate(paths):
            if path and (Path(path) / "results.json").is_file():
                refs.append((Path(path).resolve(), "seed" if i == 0 else "branch"))
    return refs


STREAM_SUFFIX = " [v{} streams]"
STREAM_MARK = re.compile(r" \[v\d+ streams\]$")


def mark_older_streams(frame: pd.DataFrame) -> pd.DataFrame:
    """Where runs of one scale trained on different versions of the data streams (a partial rerun), the older ones
    keep their rows, labelled with their version: no mean mixes versions, and no seed pairs across them (a seed
    fixes data order only within one version)."""
    if frame.empty or "data_stream_version" not in frame:
        return frame
    newest = frame["data_stream_version"].max()
    versions = frame["data_stream_version"].fillna(newest).astype(int)  # unknown (no results yet): not marked
    unmarked = ~frame["label"].astype(str).str.contains(STREAM_MARK)  # a kept row may carry its mark already
    older = (versions < newest) & unmarked
    suffixes = versions[older].map(STREAM_SUFFIX.format).astype(str)
    frame.loc[older, "label"] = frame.loc[older, "label"].astype(str) + suffixes
    return frame


def missing_kept(paths) -> str | None:
    """The one error line for `--keep` files that do not exist (None when all do)."""
    missing = [str(path) for path in paths if not Path(path).is_file()]
    return (f"error: --keep {', '.join(missing)}: no such runs.csv (a report's committed one, e.g. "
            "docs/mini-reproduction/mini-seeds-v1-runs.csv)") if missing else None


def collect(roots, out: Path | None = None, keep=()) -> pd.DataFrame:
    """One row per run under `roots`, plus the seed and branch models those runs name. Cached to `out` (CSV).

    `keep`: earlier collected tables (runs.csv) whose rows stay where no run directory here has their run_id: runs
    that were not rerun, and whose directories live elsewhere (a committed report's CSV)."""
    rows = [read_run(d) for d in find_run_dirs(roots)]
    seen = {r["path"] for r in rows}
    for path, role in _referenced(rows):
        if str(path) not in seen:
            seen.add(str(path))
            rows.append(read_run(path, role))
    # BTX pays for its branches: count their training in its compute (Fig. 3's FLOPs axis)
    flops_of = {r["path"]: r.get("train_flops") or 0.0 for r in rows}
    for row in rows:
        ref = json.loads(row["seed_model"]) if row.get("seed_model") else None
        branches = ref[1:] if isinstance(ref, list) else []
        row["total_flops"] = (row.get("train_flops") or 0.0) + sum(
            flops_of.get(str(Path(b).resolve()), 0.0) for b in branches)
    frame = pd.DataFrame(rows)
    fresh = set(frame["run_id"]) if not frame.empty else set()
    for path in keep:
        kept = pd.read_csv(path)
        kept = kept[~kept["run_id"].isin(fresh)]
        if "data_stream_version" not in kept:
            kept = kept.assign(data_stream_version=1)  # collected before the column: version 1 by definition
        print(f"[collect] kept from {path}: {', '.join(kept['run_id'])}" if len(kept) else
              f"[collect] {path}: every run was collected afresh", file=sys.stderr)
        frame = pd.concat([frame, kept], ignore_index=True)
        fresh |= set(kept["run_id"])
    frame = mark_older_streams(frame)
    if not frame.empty:
        frame = frame.sort_values(["role", "label", "seed", "run_id"], na_position="last").reset_index(drop=True)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(out) + ".tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(out)
    return frame


def curves(runs: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv of every run, stacked, with the run's label and seed (train rows and validation rows)."""
    parts = []
    for _, run in runs.iterrows():
        path = Path(run["path"]) / "metrics.csv"
        if path.is_file() and path.stat().st_size:
            table = pd.read_csv(path)
            table["run_id"], table["label"], table["seed"], table["role"] = run["run_id"], run["label"], run["seed"], run["role"]
            table["data_stream_version"] = run.get("data_stream_version", 1)
            parts.append(table)
    if not parts:  # no run directory here (only a report's kept rows): the columns readers select on, no rows
        return pd.DataFrame(columns=["run_id", "label", "seed", "role", "data_stream_version", "step", "tokens",
                                     "train_loss", "val_loss"])
    return pd.concat(parts, ignore_index=True)


def at_budget(runs: pd.DataFrame, curves: pd.DataFrame, budget: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs as they stood after `budget` x their schedule's tokens (Table 8 reads runs on the 500B schedule at
    50B tokens, Fig. 4 at 150B): the validation metrics of the row logged at that step replace the final ones,
    tokens and FLOPs are those spent until then, and curves stop there. A run with no validation at that step
    (it has not got there, or did not validate there) becomes status "short". Seeds and branches stay whole."""
    if budget >= 1.0 or runs.empty:
        return runs, curves
    runs = runs.copy()
    metric_cols = [c for c in runs.columns if c.startswith("metrics.")]  # final-only ones (eval/...) go too
    validated = curves[curves["val_loss"].notna()] if not curves.empty else curves
    cut_at = {}  # run_id -> the step its curve stops at
    for i, run in runs[runs["role"] == "run"].iterrows():
        if not run.get("steps") or not run.get("tokens"):
            continue
        per_step = int(run["tokens"]) // int(run["steps"])
        step = int(budget * float(run.get("schedule_tokens") or run["tokens"])) // per_step
        runs.loc[i, metric_cols] = float("nan")
        rows = validated[(validated["run_id"] == run["run_id"]) & (validated["step"] == step)] \
            if not validated.empty else validated
        if rows.empty:
            runs.loc[i, "status"] = "short" if run["status"] == "completed" else run["status"]
            continue
        row = rows.iloc[-1]
        runs.loc[i, metric_cols] = [row.get(c[len("metrics."):], float("nan")) for c in metric_cols]
        train_flops = float(run["train_flops"] or 0.0) * step * per_step / float(run["tokens"])
        runs.loc[i, "total_flops"] = float(run.get("total_flops") or 0.0) - float(run["train_flops"] or 0.0) + train_flops
        runs.loc[i, ["tokens", "steps", "train_flops"]] = [step * per_step, step, train_flops]
        cut_at[run["run_id"]] = step
    if curves.empty or not cut_at:
        return runs, curves
    limit = curves["run_id"].map(cut_at)
    return runs, curves[limit.isna() | (curves["step"] <= limit)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Collect run directories into one table")
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, action="append", default=[],
                        help="an earlier runs.csv whose runs not collected here stay in the table (repeatable)")
    args = parser.parse_args(argv)
    if missing_kept(args.keep):
        print(missing_kept(args.keep), file=sys.stderr)
        return 1
    frame = collect(args.roots, args.out, keep=args.keep)
    if frame.empty:
        print(f"error: no run directories (with results.json or .hydra/) under {', '.join(args.roots)}",
              file=sys.stderr)
        return 1
    with pd.option_context("display.width", 160, "display.max_columns", 12):
        print(frame[["run_id", "role", "status", "label", "seed", "metrics.val_loss"]
                    if "metrics.val_loss" in frame else ["run_id", "role", "status", "label"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
