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
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"
ARTEFACTS = tuple(sorted(p.stem for p in SWEEPS.glob("*.yaml") if p.stem != "scales"))


def load(artefact: str) -> dict:
    path = SWEEPS / f"{artefact}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no sweep definition {path}; artefacts: {', '.join(ARTEFACTS)}")
    spec = yaml.safe_load(path.read_text())
    runs = dict(spec.get("runs") or {})
    for included in spec.get("include", []):
        runs.update(load(included)["runs"])
    return {"renders": spec.get("renders", []), "runs": runs}


def scale_spec(scale: str) -> dict:
    scales = yaml.safe_load((SWEEPS / "scales.yaml").read_text())
    if scale not in scales:
        raise SystemExit(f"error: unknown SCALE={scale}; choose one of {', '.join(scales)}")
    return scales[scale]


def planned_runs(artefact: str, scale: str, results: Path) -> list[tuple[Path, list[str]]]:
    spec, scale_cfg = load(artefact), scale_spec(scale)
    plan = []
    for seed in scale_cfg["seeds"]:
        for name, overrides in spec["runs"].items():
            run_dir = results / scale / "runs" / f"{name}-s{seed}"
            plan.append((run_dir, [*scale_cfg["overrides"], *overrides, f"seed={seed}"]))
    return plan


def status_of(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "results.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "missing"


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


def render(artefact: str, scale: str, results: Path) -> list[Path]:
    from analysis import figures, tables
    from analysis.collect import collect, curves

    out = results / scale
    runs = collect([out / "runs"], out / "runs.csv")
    paths = []
    for name in load(artefact)["renders"]:
        if name in tables.TABLES:
            paths += tables.render(name, runs, out).values()
        else:
            paths += figures.render([name], runs, curves(runs), out)
    return paths


def print_status(scale: str, results: Path) -> None:
    for artefact in ARTEFACTS:
        plan = planned_runs(artefact, scale, results)
        states = {run_dir.name: status_of(run_dir) for run_dir, _ in plan}
        counts = {s: sum(1 for v in states.values() if v == s) for s in ("completed", "failed", "running", "missing")}
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
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every run, e.g. trainer=gpu (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="launch only these runs of the artefact (its names, e.g. DU-0.5; repeatable)")
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
    if args.jobs > 1 and args.launcher != "local":
        raise SystemExit("error: --jobs applies to --launcher local; a cluster runs submitted jobs at once already")
    if args.status or args.artefact is None:
        print_status(args.scale, args.results)
        return 0
    failed = []
    if not args.render_only:
        todo = [(run_dir, [*overrides, *args.override])
                for run_dir, overrides in planned_runs(args.artefact, args.scale, args.results)
                if status_of(run_dir) != "completed" and (not args.only or run_dir.name.rsplit("-s", 1)[0] in args.only)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda job: launch(*job, args.launcher, quiet=args.jobs > 1), todo))
        failed = [run_dir.name for (run_dir, _), code in zip(todo, codes) if code != 0]
    for path in render(args.artefact, args.scale, args.results):
        print(f"[sweep] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if failed:
        print(f"[sweep] failed runs (rendered as failed): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
