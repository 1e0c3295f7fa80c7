"""Launch the runs a paper artefact needs (only those not yet completed), then render it.

    python -m analysis.sweep table1 --scale smoke --launcher local
    python -m analysis.sweep --status --scale smoke
    python -m analysis.sweep seeds --scale mini-seeds --jobs 9 --override trainer=gpu   # one GPU, 9 processes

Each artefact is a file in `sweeps/`: the runs it needs as override lists, and what it renders. Every run has a
stable directory, `results/<scale>/runs/<name>-s<seed>`, shared by all artefacts that need it, so running an
artefact again launches nothing that already completed, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
import copy
from functools import lru_cache
from pathlib import Path

import yaml
from omegaconf import open_dict

from analysis import figures, tables
from analysis.collect import at_budget, collect, curves, missing_kept
from dropup import liveness, resume
from dropup.config import ConfigError, architecture
from dropup.data import DATA_STREAM_VERSION
from dropup.flops import train_flops
from dropup.paths import ROOT
from dropup.schema import compose as compose_config, model_overridden, recipe_choices
from dropup.train import plan_run as resolve_run

SWEEPS = ROOT / "sweeps"
ARTEFACTS = tuple(sorted(p.stem for p in SWEEPS.glob("*.yaml") if p.stem != "scales"))


@lru_cache(maxsize=None)
def load(artefact: str) -> dict:
    """(Read once per process; callers do not modify it.) An artefact's runs ({name: overrides}), the budget each needs (a fraction of its schedule: the largest
    over the files that list it), and its renders with the budget each reads its runs at."""
    path = SWEEPS / f"{artefact}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no sweep definition {path}; artefacts: {', '.join(ARTEFACTS)}")
    spec = yaml.safe_load(path.read_text())
    own_budget = float(spec.get("budget", 1.0))
    if not 0.0 < own_budget <= 1.0:
        raise SystemExit(f"error: {path}: budget {own_budget} must be a fraction of the schedule in (0, 1]")
    runs = dict(spec.get("runs") or {})
    budgets = {name: own_budget for name in runs}
    for included in spec.get("include", []):
        sub = load(included)
        runs.update(sub["runs"])
        for name, budget in sub["budgets"].items():
            budgets[name] = max(budget, budgets.get(name, 0.0))
    read_at = dict(spec.get("read_at") or {})
    renders = {name: float(read_at.get(name, own_budget)) for name in spec.get("renders", [])}
    return {"renders": renders, "runs": runs, "budgets": budgets}


def read_points(name: str) -> list[float]:
    """Every budget below 1 at which some artefact reads run `name`: the run validates at each of them."""
    points = set()
    for artefact in ARTEFACTS:
        spec = load(artefact)
        if name in spec["runs"]:
            points.add(spec["budgets"][name])
            points.update(spec["renders"].values())
    return sorted(p for p in points if p < 1.0)


def scale_spec(scale: str) -> dict:
    scales = yaml.safe_load((SWEEPS / "scales.yaml").read_text())
    if scale not in scales:
        raise SystemExit(f"error: unknown SCALE={scale}; choose one of {', '.join(scales)}")
    return scales[scale]


@lru_cache(maxsize=None)
def compose(overrides: tuple[str, ...]):
    """The config run.py would compose from `overrides` (composed once per process: `--status` plans the same
    run for every artefact that lists it; callers only read it)."""
    return compose_config(overrides)


@dataclass
class Run:
    name: str
    seed: int
    run_dir: Path
    overrides: list[str]  # everything run.py is given, budget included
    tokens: int  # what this artefact needs the run to reach
    schedule_tokens: int
    train_flops: float
    tokens_per_step: int
    status: str = "missing"
    key: dict | None = None  # the resume key run.py will compute (None where the config cannot be planned)


def plan_run(name: str, seed: int, run_dir: Path, base: list[str], budget: float) -> Run:
    """Compose the run to place its budget on its schedule: the schedule (and the run directory) are the same
    whichever artefact asks, only how far the run goes differs, so a longer budget extends the same run."""
    cfg = compose(tuple(base))
    schedule = int(cfg.train.schedule_tokens or cfg.train.tokens)
    per_step = int(cfg.train.batch_size) * int(cfg.data.seq_len)
    tokens = int(budget * schedule) // per_step * per_step
    extra = [f"train.schedule_tokens={schedule}", f"train.tokens={tokens}"]
    points = [int(p * schedule) // per_step * per_step for p in read_points(name)]
    if points:
        extra.append(f"train.eval_tokens=[{','.join(map(str, points))}]")
    model, moe = architecture(cfg)
    flops = train_flops(model, moe, tokens, int(cfg.data.seq_len))
    resolved = copy.deepcopy(cfg)  # the composed config is cached and shared: resolve a copy as run.py would
    with open_dict(resolved):
        resolved.train.schedule_tokens, resolved.train.tokens = schedule, max(tokens, per_step)
    try:
        key = resolve_run(resolved, model_overridden(base), recipe_choices(base)).key
    except ConfigError:
        key = None  # the run itself will say what is wrong
    return Run(name, seed, run_dir, [*base, *extra], tokens, schedule, flops, per_step, key=key)


def planned_runs(artefact: str, scale: str, results: Path, extra: list[str] = ()) -> list[Run]:
    spec, scale_cfg = load(artefact), scale_spec(scale)
    plan = []
    for seed in scale_cfg["seeds"]:
        for name, overrides in spec["runs"].items():
            run_dir = results / scale / "runs" / f"{name}-s{seed}"
            run = plan_run(name, seed, run_dir, [*scale_cfg["overrides"], *overrides, f"seed={seed}", *extra],
                           spec["budgets"][name])
            run.status = status_of(run_dir, run)
            plan.append(run)
    return plan


def status_of(run_dir: Path, run: Run | None = None) -> str:
    """completed (as far as `run` needs) | short (completed, but to fewer tokens: extend it) | stale (another
    data-stream version, or a resume key that differs from the planned run's: rerun from scratch, never mix in)
    | running | died (its process is gone: resume it) | failed | missing."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
        status = liveness.state(results, path)
    except (OSError, ValueError, KeyError):
        return "missing"
    if results.get("provenance", {}).get("data_stream") != DATA_STREAM_VERSION:
        return "stale"
    if run is not None:
        recorded = results.get("resume_key")
        if recorded is not None and run.key is not None:  # exactly what `resume=true` would refuse
            if resume.conflicts(recorded, run.key):
                return "stale"
        else:  # a run recorded before resume keys: its schedule, compared in optimizer steps
            scheduled = int(results.get("schedule_tokens") or results.get("tokens") or 0)
            if scheduled // run.tokens_per_step != run.schedule_tokens // run.tokens_per_step:
                return "stale"
        if status == "completed" and int(results.get("tokens") or 0) < run.tokens:
            return "short"
    return status


def set_aside(run_dir: Path) -> Path:
    """Move a stale run out of runs/ (kept, not deleted) so that neither the rerun nor the tables mix it in."""
    stale = run_dir.parent.parent / "stale"
    stale.mkdir(parents=True, exist_ok=True)
    target = stale / run_dir.name
    n = 1
    while target.exists():
        target, n = stale / f"{run_dir.name}.{n}", n + 1
    run_dir.rename(target)
    print(f"[sweep] {run_dir.name}: stale (another data stream, or settings its resume key does not match), moved "
          f"to {target}", flush=True)
    return target


def launch(run_dir: Path, overrides: list[str], launcher: str, quiet: bool = False) -> int:
    if launcher == "local":
        cmd = [sys.executable, "run.py", *overrides, "resume=true", f"hydra.run.dir={run_dir}"]
    else:  # one submitit job per run; its folder is the run directory itself
        cmd = [sys.executable, "run.py", "-m", f"hydra/launcher={launcher}", *overrides, "resume=true",
               f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=."]
    print(f"[sweep] {run_dir.name}: python {' '.join(cmd[1:])}", flush=True)
    if not quiet:
        return subprocess.run(cmd, cwd=ROOT).returncode
    # concurrent runs would interleave their progress bars: each writes its own log beside its results
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "launch.log", "ab") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    outcome = "done" if code == 0 else f"failed (exit {code}), see {run_dir / 'launch.log'}"
    print(f"[sweep] {run_dir.name}: {outcome}", flush=True)
    return code


def render(artefact: str, scale: str, results: Path, keep=()) -> list[Path]:
    out = results / scale
    runs = collect([out / "runs"], out / "runs.csv", keep=keep)
    all_curves = curves(runs)
    paths = []
    for name, budget in load(artefact)["renders"].items():
        runs_b, curves_b = at_budget(runs, all_curves, budget)
        if name in tables.TABLES:
            paths += tables.render(name, runs_b, out).values()
        else:
            paths += figures.render([name], runs_b, curves_b, out)
    return paths


def print_status(scale: str, results: Path) -> None:
    for artefact in ARTEFACTS:
        plan = planned_runs(artefact, scale, results)
        states = {run.run_dir.name: run.status for run in plan}
        counts = {s: sum(1 for v in states.values() if v == s)
                  for s in ("completed", "short", "stale", "failed", "running", "died", "missing")}
        print(f"{artefact:8s} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
        for name, state in states.items():
            if state != "completed":
                print(f"    {state:9s} {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artefact", nargs="?", choices=ARTEFACTS)
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--launcher", default="local", help="local, or a conf/hydra/launcher option (slurm)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--status", action="store_true", help="list done / failed / missing runs per artefact")
    parser.add_argument("--dry-run", action="store_true",
                        help="launch nothing: print each run as one JSON line (name, run_dir, status, overrides, "
                             "tokens, schedule_tokens, train_flops)")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--keep", type=Path, action="append", default=[], metavar="RUNS_CSV",
                        help="an earlier runs.csv (a report's committed one) whose runs that are not under results/ "
                             "stay in the tables, labelled with their data-stream version where it is older")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every run, e.g. trainer=gpu (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="launch only these runs of the artefact (its names, e.g. DU-0.5; repeatable)")
    parser.add_argument("--seed", action="append", type=int, default=[], metavar="N",
                        help="launch only these seeds of the scale's (repeatable); with --only, both must match")
    parser.add_argument("--jobs", type=int, default=1,
                        help="local runs at once (several small runs share one GPU; runs that need the same dense "
                             "seed wait for the one that trains it)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: give 1 or more")
    unknown = set(args.only) - set(load(args.artefact)["runs"]) if args.artefact else set()
    if unknown:
        raise SystemExit(f"error: --only {', '.join(sorted(unknown))}: not a run of {args.artefact}; its runs: "
                         f"{', '.join(load(args.artefact)['runs'])}")
    seeds = scale_spec(args.scale)["seeds"]
    if unknown_seeds := sorted(set(args.seed) - set(seeds)):
        raise SystemExit(f"error: --seed {', '.join(map(str, unknown_seeds))}: not a seed of SCALE={args.scale}; "
                         f"its seeds: {', '.join(map(str, seeds))}")
    if missing_kept(args.keep):  # before any run is launched, not at the render hours later
        raise SystemExit(missing_kept(args.keep))
    if args.jobs > 1 and args.launcher != "local":
        raise SystemExit("error: --jobs applies to --launcher local; a cluster runs submitted jobs at once already")
    if args.status or args.artefact is None:
        print_status(args.scale, args.results)
        return 0
    plan = planned_runs(args.artefact, args.scale, args.results, args.override)
    if args.dry_run:
        for run in plan:
            print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(run).items()
                              if k != "seed"}))
        return 0
    failed = []
    if not args.render_only:
        for run in plan:
            if run.status == "running":  # alive (its process, or a fresh heartbeat): never a second writer
                print(f"[sweep] {run.run_dir.name}: running elsewhere, left alone", flush=True)
        todo = [run for run in plan if run.status not in ("completed", "running")
                and (not args.only or run.name in args.only) and (not args.seed or run.seed in args.seed)]
        for run in todo:
            if run.status == "stale":
                set_aside(run.run_dir)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda run: launch(run.run_dir, run.overrides, args.launcher, quiet=args.jobs > 1),
                                  todo))
        failed = [run.run_dir.name for run, code in zip(todo, codes) if code != 0]
    for path in render(args.artefact, args.scale, args.results, keep=args.keep):
        print(f"[sweep] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if failed:
        print(f"[sweep] failed runs (rendered as failed): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
