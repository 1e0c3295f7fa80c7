"""The SLURM path for real: a local single-node cluster, Hydra's submitit launcher, and a requeued job that resumes.

Run by `make test-slurm` (brings the cluster up and down); kept out of `make test`. Skips, with the reason, where
a local cluster cannot run (not root, not Debian).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dropup import cluster

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
        status = json.loads((target / "results.json").read_text())["status"] if (target / "results.json").exists() else None
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
