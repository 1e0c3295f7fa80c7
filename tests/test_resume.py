"""The resume key (dropup.resume): every setting that decides what a run computes is in it, each change is one
error line before anything is written, execution choices are not in it, legacy runs warn; the sweep reads the
same key. And liveness (dropup.liveness): a run whose process is gone is `died` (a SIGKILLed run resuming:
test_train.test_resume_after_a_kill_ends_bit_identical)."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from dropup import liveness, resume
from dropup.config import ConfigError
from dropup.train import plan_run
from conftest import run_py_inline
from test_train import TINY, config

# (override, the setting the error must name): each changes what the run computes
IN_KEY = [
    ("train.batch_size=4", "train.batch_size"), ("data.seq_len=32", "data.seq_len"),
    ("train.schedule_tokens=20480", "train.schedule_tokens"), ("train.lr=1e-3", "train.lr"),
    ("train.min_lr_ratio=0.2", "train.min_lr_ratio"), ("train.warmup_steps=3", "train.warmup_steps"),
    ("train.final_constant_steps=2", "train.final_constant_steps"), ("train.weight_decay=0.05", "train.weight_decay"),
    ("train.betas=[0.9,0.99]", "train.betas"), ("train.eps=1e-6", "train.eps"), ("train.grad_clip=0.5", "train.grad_clip"),
    ("seed=1", "seed"), ("train.stream=dense", "train.stream"), ("data.weights={ja:0.5,en:0.3,code:0.2}", "data.weights"),
    ("data.domains=[ja,en]", "data.domains"), ("init=naive", "init"), ("ratio=0.25", "init.ratio"),
    ("init.index_mode=per_matrix", "init.index_mode"), ("init.shuffle=true", "init.shuffle"),
    ("init.router=normal:0.02", "init.router"), ("seed_model=.", "seed_model"),
    ("seed_recipe.train.tokens=40960", "seed_model"),  # another dense seed (its store key)
    ("model.d_model=32", "model.d_model"), ("model.rope_theta=500000", "model.rope_theta"),
    ("moe.num_experts=4", "moe.num_experts"), ("moe.top_k=1", "moe.top_k"), ("moe.lb_mode=aux_free", "moe.lb_mode"),
    ("moe.lb_coef=0.01", "moe.lb_coef"), ("moe=none", "moe.enabled"),
]
# execution choices and how far the run goes: a resume may change them
NOT_IN_KEY = ["train.tokens=5120", "trainer.devices=2", "trainer.num_nodes=2", "train.micro_batch_size=4",
              "train.activation_checkpointing=true", "train.val_every=3", "train.ckpt_every=3", "train.log_every=2",
              "logger=wandb", "moe.backend=sliced", "train.eval_tokens=[1024]",
              "train.val_tokens=1024"]
BASE = ["init=drop", "ratio=0.5", "train.schedule_tokens=10240"]


def key_of(tmp_path, store, *overrides):
    return plan_run(config(tmp_path, *store, *BASE, *overrides), recipe_from={}).key


def test_every_setting_in_the_key_is_refused_in_one_line_and_execution_choices_are_not(tmp_path, store):
    base = key_of(tmp_path, store)
    previous = {"status": "failed", "resume_key": base}
    for override, setting in IN_KEY:
        with pytest.raises(ConfigError) as err:
            resume.check(previous, key_of(tmp_path, store, override), tmp_path)
        message = str(err.value)
        assert f"{setting}=" in message and "\n" not in message and "resume=true" in message, (override, message)
        assert message.count(f"{setting}=") == 2, message  # the recorded value and the new one
    for override in NOT_IN_KEY:
        assert resume.conflicts(base, key_of(tmp_path, store, override)) == [], override
    # the precision is how a step runs, but with seed_model=auto it picks another dense seed (the store keys on it)
    scratch = key_of(tmp_path, store, "init=scratch")
    assert resume.conflicts(scratch, key_of(tmp_path, store, "init=scratch", "trainer.precision=32-true")) == []
    assert [name for name, _, _ in resume.conflicts(base, key_of(tmp_path, store, "trainer.precision=32-true"))] \
        == ["seed_model"]
    # the loaded corpus joins the key
    data = resume.with_data(base, {"corpus_hash": "a", "tokenizer_hash": "t"})
    for changed in ({"corpus_hash": "b", "tokenizer_hash": "t"}, {"corpus_hash": "a", "tokenizer_hash": "u"}):
        assert resume.conflicts(data, resume.with_data(base, changed))
    # a start that failed before loading its data recorded no hashes, and cannot have checkpointed
    assert resume.conflicts(base, data) == []


def test_a_run_without_a_key_resumes_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dropup.resume")
    resume.check({"status": "failed", "schedule_tokens": 10}, {"train.lr": 1.0}, tmp_path)
    assert len(caplog.records) == 1 and "cannot be checked" in caplog.records[0].getMessage()
    resume.check({}, {"train.lr": 1.0}, tmp_path)  # no results.json: a fresh start
    assert len(caplog.records) == 1


def test_a_resume_that_changes_the_batch_or_the_seed_fails_through_run_py_and_writes_nothing(tmp_path, store):
    from dropup.train import train

    run = tmp_path / "run"
    train(config(run, "init=naive", *store))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    recorded = json.loads((run / "results.json").read_text())["resume_key"]
    assert recorded["data.corpus_hash"] and recorded["init"] == "naive"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert resume.checkpoint_key(ckpt) == recorded  # the checkpoint records it too
    code, _, stderr = run_py_inline("init=naive", *TINY, *store, "resume=true", "train.batch_size=4", "seed=1",
                                    f"hydra.run.dir={run}")
    assert code != 0 and "Traceback" not in stderr
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "train.batch_size=8" in error[0] and "train.batch_size=4" in error[0]
    assert "seed=0" in error[0] and "seed=1" in error[0]
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before}
    assert after == before
    # the checkpoint guards itself: a run directory whose results.json was replaced still refuses
    (run / "results.json").unlink()
    with pytest.raises(ConfigError, match="last.ckpt was trained with train.lr=0.002"):
        train(config(run, "init=naive", "train.lr=1e-3", "resume=true", *store))


def test_the_sweep_calls_a_run_stale_exactly_when_resume_would_refuse_it(tmp_path, store):
    from analysis.sweep import Run, status_of

    key = key_of(tmp_path, store)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results = {"status": "completed", "tokens": 10240, "schedule_tokens": 10240, "resume_key": key,
               "provenance": {"data_stream": __import__("dropup.data", fromlist=["x"]).DATA_STREAM_VERSION}}
    (run_dir / "results.json").write_text(json.dumps(results))
    planned = lambda k: Run("DU-0.5", 0, run_dir, [], 10240, 10240, 0.0, 512, key=k)  # noqa: E731
    assert status_of(run_dir, planned(key)) == "completed"
    # the same batch count per schedule in steps, but another batch size: the old steps check let it through
    assert status_of(run_dir, planned(key_of(tmp_path, store, "train.batch_size=4"))) == "stale"
    assert status_of(run_dir, planned(key_of(tmp_path, store, "seed_model=."))) == "stale"
    assert status_of(run_dir, planned(key_of(tmp_path, store, "train.micro_batch_size=4"))) == "completed"


# --- liveness -----------------------------------------------------------------------------------------------

def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_run_whose_process_is_gone_has_died(tmp_path):
    me = liveness.here()
    assert liveness.state({"status": "running", **me}) == "running"
    assert liveness.state({"status": "running", **me, "pid": _gone_pid()}) == "died"
    assert liveness.state({"status": "running", **me, "pid_start": "0"}) == "died"  # the pid was reused
    far = {"status": "running", "host": "elsewhere", "pid": 1}
    assert liveness.state({**far, "heartbeat": time.time() - 60}) == "running"
    assert liveness.state({**far, "heartbeat": time.time() - liveness.STALE_AFTER_S - 60}) == "died"
    legacy = tmp_path / "results.json"  # no host, pid or heartbeat: judged by the file's age
    legacy.write_text("{}")
    assert liveness.state({"status": "running"}, legacy) == "running"
    old = time.time() - liveness.STALE_AFTER_S - 60
    os.utime(legacy, (old, old))
    assert liveness.state({"status": "running"}, legacy) == "died"
    assert liveness.state({"status": "completed", **me, "pid": _gone_pid()}) == "completed"


def test_the_heartbeat_thread_refreshes_a_running_run_and_never_overwrites_its_end(tmp_path):
    path = tmp_path / "results.json"
    beat = liveness.Heartbeat(path, interval_s=0.05)
    results = {"status": "running"}
    beat.write(results)
    first = json.loads(path.read_text())
    assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
    beat.start()
    time.sleep(0.3)
    assert json.loads(path.read_text())["heartbeat"] > first["heartbeat"]
    results["status"] = "completed"
    beat.write(results)
    time.sleep(0.2)
    beat.stop()
    assert json.loads(path.read_text())["status"] == "completed"
