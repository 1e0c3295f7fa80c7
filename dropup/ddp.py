"""Single-node data parallelism without Lightning re-running `run.py`.

Lightning's own launcher restarts the script with its original arguments, which under a Hydra multirun would
start the whole sweep again in every rank. Instead, rank 0 saves the resolved config and starts ranks 1..N-1 as
`python -m dropup.ddp <config>` with the torch.distributed environment set; Lightning then sees processes created
externally (LOCAL_RANK set) and only joins them. On SLURM or under torchrun, the environment is already there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def needs_launch(devices: int, num_nodes: int) -> bool:
    external = any(v in os.environ for v in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    return devices > 1 and num_nodes == 1 and not external


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(cfg: DictConfig, run_dir: Path, devices: int, resume: bool) -> list[subprocess.Popen]:
    """Start ranks 1..devices-1 on `cfg` (rank 0 is this process) and set this process's rank-0 environment."""
    config_path = run_dir / "ddp_config.yaml"
    worker_cfg = OmegaConf.to_container(cfg, resolve=True)
    worker_cfg.update(run_dir=str(run_dir), resume=resume)
    OmegaConf.save(OmegaConf.create(worker_cfg), config_path)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(devices),
           "NODE_RANK": "0"}
    os.environ.update(env, LOCAL_RANK="0", RANK="0")
    return [subprocess.Popen([sys.executable, "-m", "dropup.ddp", str(config_path)],
                             env={**os.environ, **env, "LOCAL_RANK": str(rank), "RANK": str(rank)})
            for rank in range(1, devices)]


def wait_workers(workers: list[subprocess.Popen]) -> None:
    codes = [w.wait() for w in workers]
    if any(codes):
        raise RuntimeError(f"data-parallel worker(s) exited with {codes}")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", 0)))) == 0


if __name__ == "__main__":
    from dropup.train import train

    train(OmegaConf.load(sys.argv[1]), log=lambda *_: None)
