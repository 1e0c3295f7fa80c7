"""Data-parallel ranks: started by us on one node, or by SLURM / torchrun, without Lightning re-running `run.py`.

Lightning's own launcher restarts the script with its original arguments, which under a Hydra multirun would
start the whole sweep again in every rank. Instead, on one node, rank 0 saves the resolved config and starts
ranks 1..N-1 as `python -m dropup.train <config>` with the torch.distributed environment set; Lightning then sees
processes created externally (LOCAL_RANK set) and only joins them.

Under SLURM (a job of several tasks: `hydra/launcher=slurm` sets tasks_per_node to trainer.devices and nodes to
trainer.num_nodes) or torchrun, every rank runs the same Hydra job. Rank 0 decides what the run starts from (its
initial weights, or the checkpoint to resume) and announces it in `<run dir>/.ranks-<launch id>.json`; the other
ranks wait for that file, then train alongside it and write nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dropup.files import write_json_atomic


def external_launch() -> str | None:
    """An id of this launch when SLURM or torchrun started several ranks (not us); None otherwise. A requeued or
    restarted job gets a new id, so its ranks never read the previous attempt's announcement."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0') or 0}"
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return None


def needs_launch(devices: int, num_nodes: int) -> bool:
    """Whether this process must start the other ranks itself (one node, nobody else started them)."""
    started = "LOCAL_RANK" in os.environ or external_launch() is not None
    return devices > 1 and num_nodes == 1 and not started


def cluster_environment():
    """Lightning's view of who started the ranks, said explicitly: left to detect it, Lightning takes any SLURM
    job for one whose tasks are its ranks, also where we start the ranks ourselves in a single-task allocation."""
    from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment, \
        TorchElasticEnvironment

    launch = external_launch() or ""
    if launch.startswith("torchrun") or ("TORCHELASTIC_RUN_ID" in os.environ and "SLURM_NTASKS" not in os.environ):
        return TorchElasticEnvironment()
    if launch.startswith("slurm") or ("SLURM_NTASKS" in os.environ and "LOCAL_RANK" not in os.environ):
        # requeueing is submitit's job (hydra/launcher=slurm, max_num_timeout); Lightning's own would be a second one
        return SLURMEnvironment(auto_requeue=False)
    return LightningEnvironment()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(cfg: DictConfig, run_dir: Path, devices: int, resume: bool,
                   extra: dict | None = None) -> list[subprocess.Popen]:
    """Start ranks 1..devices-1 on `cfg` plus the `extra` keys (rank 0 is this process) and set this process's
    rank-0 environment."""
    config_path = run_dir / "ddp_config.yaml"
    worker_cfg = OmegaConf.to_container(cfg, resolve=True)
    worker_cfg.update(run_dir=str(run_dir), resume=resume, **(extra or {}))
    OmegaConf.save(OmegaConf.create(worker_cfg), config_path)
    env = rank_environment(devices)
    os.environ.update(env, LOCAL_RANK="0", RANK="0")
    return start_ranks([sys.executable, "-m", "dropup.train", str(config_path)], env, range(1, devices))


def rank_environment(devices: int) -> dict[str, str]:
    """The torch.distributed environment of `devices` ranks on this node (a free port on the loopback)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(devices),
            "NODE_RANK": "0"}


def start_ranks(command: list[str], env: dict[str, str], ranks, **popen) -> list[subprocess.Popen]:
    """Run `command` once per rank in `ranks`, each with `env` and its RANK / LOCAL_RANK."""
    return [subprocess.Popen(command, env={**os.environ, **env, "LOCAL_RANK": str(rank), "RANK": str(rank)}, **popen)
            for rank in ranks]


def wait_workers(workers: list[subprocess.Popen]) -> None:
    codes = [w.wait() for w in workers]
    if any(codes):
        raise RuntimeError(f"data-parallel worker(s) exited with {codes}")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", 0)))) == 0


def _announcement(run_dir: Path, launch: str) -> Path:
    return Path(run_dir) / f".ranks-{launch}.json"


def announce(run_dir: Path, launch: str, resume: bool | None = None, error: str | None = None,
             config: dict | None = None) -> None:
    """Rank 0, externally launched: tell the other ranks to start (resuming, from initial.safetensors, or under
    trainer=fsdp from the models its `config` names) on its resolved `config`, or that the run failed before
    training and they should stop."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(_announcement(run_dir, launch), {"resume": resume, "error": error, "config": config})


def announced_config(run_dir: Path, launch: str) -> dict:
    """The resolved config rank 0 announced (after `await_announcement`)."""
    return json.loads(_announcement(run_dir, launch).read_text())["config"]


def announced(run_dir: Path, launch: str) -> bool:
    return _announcement(run_dir, launch).is_file()


def await_announcement(run_dir: Path, launch: str, timeout_s: float = 24 * 3600) -> bool:
    """Ranks > 0, externally launched: wait for rank 0's decision; returns whether to resume. Rank 0 may first
    prepare the corpus or train a dense seed, hence the long default wait."""
    path, deadline = _announcement(run_dir, launch), time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not start {run_dir} within {timeout_s:.0f} s ({path} never appeared)")
        time.sleep(0.5)
    said = json.loads(path.read_text())
    if said.get("error"):
        raise RuntimeError(f"rank 0 stopped before training: {said['error']}")
    return bool(said["resume"])
