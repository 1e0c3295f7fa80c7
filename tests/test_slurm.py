"""The SLURM path for real: a local cluster, Hydra's submitit launcher, a requeued job that resumes, and
data-parallel jobs whose ranks are SLURM's tasks (Lightning's SLURMEnvironment, no launcher of ours).

Run by `make test-slurm` (brings the cluster up and down); kept out of `make test`. Skips, with the reason, where
a local cluster cannot run (not root, not Debian).

The cluster (`dropup.tools.slurm_cluster`) is this one machine. Debian's slurmd is built with --enable-multiple-slurmd
(`scontrol show config`: MULTIPLE_SLURMD = Yes), so it presents two nodes, each its own slurmd on its own port: the
jobs of 2 tasks run as 1 node x 2 tasks and as 2 nodes x 1 task. Where slurmd lacks that build option the cluster
has one node and the 2-node case skips, saying so.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dropup.tools import slurm_cluster as cluster
from dropup.lit import MEASURED
from test_train import rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm
TINY = [
    "data=fixture", "model.vocab_size=512", "train.batch_size=8", "train.log_every=5", "train.val_every=20",
    "train.ckpt_every=5", "train.val_tokens=2048", "seed_recipe.train.batch_size=8", "seed_recipe.train.tokens=20480",
    "seed_recipe.train.val_every=20", "seed_recipe.train.val_tokens=2048", "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    reason = cluster.can_run()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    cluster.up()
    env = {**os.environ, "SLURM_CONF": str(cluster.STATE / "slurm.conf")}
    store = tmp_path_factory.mktemp("slurm-store")
    return env, [f"paths.data_dir={store / 'data'}", f"paths.seed_store={store / 'seeds'}"]


def sh(env, *cmd) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout


def test_sweep_on_slurm_and_a_requeued_job_resumes(slurm_env, tmp_path):
    env, store = slurm_env
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=slurm_local", "init=drop", "ratio=0.0,0.5",
           "train.tokens=61440", *TINY, *store, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until job 1 (r = 0.5) has saved a checkpoint mid-run, then requeue it as a preemption would
    deadline = time.time() + 400
    target = sweep / "1"
    while time.time() < deadline:
        results_path = target / "results.json"
        status = json.loads(results_path.read_text())["status"] if results_path.exists() else None
        if status == "running" and (target / "checkpoints" / "last.ckpt").exists():
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    else:
        pytest.fail("job 1 never reached a checkpoint")
    jobs = dict(line.split() for line in sh(env, "squeue", "-h", "-o", "%i %T").splitlines())
    job_id = next(j for j in jobs if j.endswith("_1"))
    sh(env, "scontrol", "requeue", job_id)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "completed", results["error"]
    resumed = json.loads((target / "results.json").read_text())["provenance"]["resumed_from_step"]
    assert resumed is not None and resumed > 0  # continued from its checkpoint, not from step 0
    steps = [int(line.split(",")[0]) for line in (target / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 61440 // (8 * 64)  # one clean record, no repeated steps
    array = job_id.split("_")[0]
    for _ in range(60):  # accounting lags the job's end by a few seconds
        accounting = sh(env, "sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", array)
        states = dict(line.split("|") for line in accounting.splitlines())
        if all(s == "COMPLETED" for s in states.values()):
            break
        time.sleep(1)
    assert states and all(s == "COMPLETED" for s in states.values()), states


# DDP over gloo, fp32: a tiny MoE trained from scratch (no dense seed: a job of several tasks refuses to train one)
DDP = ["trainer=ddp", "trainer.precision=32-true", "init=scratch", "train.tokens=10240", *TINY]


@pytest.fixture(scope="module")
def local_ddp(slurm_env, tmp_path_factory):
    """The reference: trainer=ddp on this machine with our own launcher, no SLURM in the environment."""
    env, store = slurm_env
    run_dir = tmp_path_factory.mktemp("local-ddp") / "run"
    clean = {k: v for k, v in env.items() if not k.startswith("SLURM")}
    proc = subprocess.run([sys.executable, "run.py", *DDP, *store, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "ddp_config.yaml").exists()  # our launcher started rank 1
    return run_dir


@pytest.mark.parametrize("nodes, tasks_per_node", [(1, 2), (2, 1)], ids=["1node-2tasks", "2nodes-1task"])
def test_ddp_job_of_slurm_tasks_matches_a_local_ddp_run(slurm_env, local_ddp, tmp_path, nodes, tasks_per_node):
    env, store = slurm_env
    if nodes > len(cluster.nodes()):
        pytest.skip(f"the local cluster has {len(cluster.nodes())} node(s): this slurmd is not built with "
                    f"--enable-multiple-slurmd, so one machine cannot present {nodes} nodes")
    sweep = tmp_path / "sweep"
    # hydra/launcher=slurm_local asks for trainer.num_nodes nodes x trainer.devices tasks, 1 CPU each
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=slurm_local", *DDP, f"trainer.num_nodes={nodes}",
           f"trainer.devices={tasks_per_node}", *store, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = sweep / "0"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed", results["error"]
    # both ranks were SLURM's tasks: submitit saw a world of 2, Lightning joined a world of 2, rank 0 announced
    # the start to rank 1 through the run directory, and our own launcher started nobody
    world = nodes * tasks_per_node
    logs = sorted((sweep / ".submitit").glob("*/*_[0-9]_log.out"))  # <job>_<task>_log.out
    assert len(logs) == world, logs
    run_log = (run_dir / "run.log").read_text()  # Hydra's job log: every rank appends to it
    for rank, log in enumerate(logs):
        text = log.read_text()
        assert f"global_rank={rank}({world}))" in text and f"node={rank // tasks_per_node}({nodes})" in text, text
        # Lightning's "Initializing distributed: GLOBAL_RANK: r, MEMBER: r+1/2", in the task's log and the run's
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{world}" in text, text[-3000:]
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{world}" in run_log, run_log[-3000:]
    assert list(run_dir.glob(".ranks-slurm-*-0.json")), sorted(p.name for p in run_dir.iterdir())
    assert not (run_dir / "ddp_config.yaml").exists()
    # the same training as the local run: every metrics.csv row, and the final validation loss
    reference = json.loads((local_ddp / "results.json").read_text())
    assert results["metrics"]["val_loss"] == pytest.approx(reference["metrics"]["val_loss"], abs=1e-5)
    ours, theirs = rows(run_dir), rows(local_ddp)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    compared = [c for c in theirs[0] if c not in MEASURED]
    for mine, ref in zip(ours, theirs):
        for column in compared:
            if ref[column] == "":
                assert mine[column] == "", (mine["step"], column)
            else:
                assert float(mine[column]) == pytest.approx(float(ref[column]), abs=1e-5), (mine["step"], column)
