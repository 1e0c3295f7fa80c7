"""Every config file composes (found by glob), and bad configs fail with a message that names the problem."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import run_py_inline
from dropup.init import STRATEGIES
from dropup.config import architecture
from dropup.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OPTIONS = sorted(
    p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.parent != CONF and "local" not in p.parts
)


def compose_with(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_there_are_options_to_check():
    assert {p.parts[0] for p in OPTIONS} >= {"model", "moe", "init"}


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_every_config_file_composes(option):
    group, name = str(option.parent), option.stem
    cfg = compose_with(f"{group}={name}")
    model, moe = architecture(cfg)
    strategy = instantiate(cfg.init)
    assert strategy.name in {*STRATEGIES, "pretrained"}
    if group == "model":
        assert model.name == name
    if group == "init":
        assert strategy.name == name


def test_ratio_flows_into_drop():
    cfg = compose_with("init=drop", "ratio=0.25")
    assert instantiate(cfg.init).ratio == 0.25


@pytest.mark.parametrize(
    "override,message",
    [("model.d_modle=3", "d_modle"), ("model.n_layers=many", "n_layers"), ("moe.top_k=9", "top_k=9"),
     ("moe.granularity=3", "granularity=3"), ("moe.backend=cuda", "backend")],
)
def test_bad_config_fails_with_a_clear_message(override, message, tmp_path):
    code, out, err = run_py_inline("stage=info", override, f"hydra.run.dir={tmp_path}")
    assert code != 0
    assert message in err + out
    assert "Traceback" not in err


def test_a_bad_config_through_a_real_run_py_process():
    """The same through a new interpreter: the exit code and the stderr the shell sees, and nothing on stdout (a
    fresh process's imports print nothing there, so `stage=info`'s JSON is its stdout's last line: tests/test_flops.py
    checks that in this process)."""
    proc = subprocess.run([sys.executable, "run.py", "stage=info", "moe.top_k=9", "hydra.run.dir=/tmp/dropup-test-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "top_k=9" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
