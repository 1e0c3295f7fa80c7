"""The experiment engine end to end: run.py multiruns, run directories, seed models, resume, bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from dropup.config import ConfigError
from dropup.data import DATA_STREAM_VERSION
from dropup.data.corpus import DataError
from dropup.lit import MEASURED
from dropup import memory
from dropup.memory import Available
from dropup.schema import register_configs
from dropup.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data=fixture", "model.vocab_size=512", "train.batch_size=8", "train.tokens=10240", "train.log_every=5",
    "train.val_every=10", "train.ckpt_every=5", "train.val_tokens=2048", "seed_recipe.train.batch_size=8",
    "seed_recipe.train.tokens=20480", "seed_recipe.train.val_every=20", "seed_recipe.train.val_tokens=2048",
    "trainer.enable_progress_bar=false",
]


def config(run_dir, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_sweep_through_run_py(tmp_path, store):
    """`python run.py -m ...` through Hydra's own entry point and its multirun launcher, in this process (the real
    process boundary is tested by the DDP and bad-config runs)."""
    from conftest import run_py_inline

    sweep = tmp_path / "sweep"
    seed_store = Path(store[1].split("=", 1)[1])
    before = set(seed_store.iterdir()) if seed_store.exists() else set()
    code, _, stderr = run_py_inline("-m", "init=drop", "ratio=0.0,0.5", *TINY, *store, f"hydra.sweep.dir={sweep}")
    assert code == 0, stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    # the dense seed was trained (at most) once and both jobs read it (the store is shared by the session's tests)
    assert len([p for p in set(seed_store.iterdir()) - before if p.is_dir()]) <= 1
    seed_dirs = {json.loads((job / "results.json").read_text())["provenance"]["seed_model"] for job in jobs}
    assert len(seed_dirs) == 1
    seed_dirs = [Path(seed_dirs.pop())]
    seed_results = json.loads((seed_dirs[0] / "results.json").read_text())
    for job, ratio in zip(jobs, (0.0, 0.5)):
        assert (job / ".hydra" / "config.yaml").is_file()
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["error"] is None
        assert (results["init"], results["ratio"], results["moe"], results["model"]) == ("drop", ratio, "mixtral", "tiny")
        assert results["steps"] == 20 and results["tokens"] == 20 * 8 * 64
        assert results["total_params"] > results["active_params"] > 0 and results["train_flops"] > 0
        assert set(results["metrics"]) >= {"train_loss", "val_loss", "val_loss/ja", "val_loss/en", "val_loss/code"}
        domains = [results["metrics"][f"val_loss/{d}"] for d in ("ja", "en", "code")]
        assert results["metrics"]["val_loss"] == pytest.approx(sum(domains) / 3)
        prov = results["provenance"]
        assert prov["corpus_hash"] and prov["tokenizer_hash"] and prov["seed_model"] == str(seed_dirs[0])
        # each kind of run reads its own data: the MoE does not replay its dense seed's batches
        assert (prov["data_stream"], prov["stream"]) == (DATA_STREAM_VERSION, "moe")
        assert seed_results["provenance"]["stream"] == "seed"
        assert results["routing"] == "routing.json" and (job / "routing.json").is_file()
        assert "MoE experts on cpu in bfloat16: backend grouped" in (job / "run.log").read_text()
        table = rows(job)
        assert {"step", "tokens", "train_loss", "lr", "lb_loss", "val_loss", "val_loss/ja"} <= set(table[0])
        train_rows = [r for r in table if r["train_loss"]]
        assert [int(r["step"]) for r in train_rows] == [5, 10, 15, 20]
        assert all(1.0 < float(r["lb_loss"]) < 8.0 for r in train_rows)
        step0 = next(r for r in table if r["step"] == "0")
        if ratio == 0.0:
            # upcycling preserved the model: the MoE at step 0 is the dense seed at its end
            assert float(step0["val_loss"]) == pytest.approx(seed_results["metrics"]["val_loss"], abs=2e-3)
        else:
            assert float(step0["val_loss"]) > seed_results["metrics"]["val_loss"] + 0.01


def test_resume_after_a_kill_ends_bit_identical(tmp_path, store):
    """Killed by SIGKILL (the OOM killer's way, so no "failed" is ever written): results.json still says
    running, with this host and a pid that is gone, so the run is `died` (`make status`, the sweep) and it
    resumes to the uninterrupted run's numbers."""
    import os
    import signal
    import socket

    from analysis.sweep import status_of

    # log_every=6 does not divide the 20 steps: the last row is logged off the cadence
    naive = ["init=naive", "train.log_every=6", *store]
    reference = train(config(tmp_path / "ref", *naive))
    crashed = tmp_path / "crashed"
    script = ("import sys; sys.path.insert(0, 'tests'); from test_train import config; from dropup.train import train; "
              f"train(config({str(crashed)!r}, *{naive!r}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DROPUP_CRASH_AT_STEP": "13", "DROPUP_CRASH_SIGNAL": "KILL"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = json.loads((crashed / "results.json").read_text())
    assert killed["status"] == "running" and killed["host"] == socket.gethostname() and killed["heartbeat"] > 0
    assert status_of(crashed) == "died"
    with pytest.raises(ConfigError, match="holds a died run: pass resume=true"):
        train(config(crashed, *naive))
    resumed = train(config(crashed, *naive, "resume=true"))
    assert resumed["status"] == "completed"
    assert resumed["metrics"] == reference["metrics"]  # bit-identical on CPU
    assert resumed["provenance"]["seed_model"] == reference["provenance"]["seed_model"] is not None
    assert resumed["provenance"]["resumed_from_step"] > 0
    ref_rows = [{k: v for k, v in r.items() if k not in MEASURED} for r in rows(tmp_path / "ref")]
    got_rows = [{k: v for k, v in r.items() if k not in MEASURED} for r in rows(crashed)]
    assert got_rows == ref_rows
    # the final row's gradient norm is its own step's, not the last cadence step's (18)
    norms = {r["step"]: r["grad_norm"] for r in ref_rows if r["train_loss"]}
    assert list(norms) == ["6", "12", "18", "20"] and all(norms.values()) and norms["20"] != norms["18"]


def test_a_run_stopped_mid_schedule_extends_bit_identical(tmp_path, store):
    """train.tokens stops a run on a longer schedule (train.schedule_tokens); `resume=true train.tokens=<more>`
    continues it on that schedule, and ends where an uninterrupted run ends."""
    from analysis.sweep import Run, status_of

    # 10500 tokens: 20 steps of 512 and a remainder, as a sweep's schedule in tokens usually has
    schedule = ["init=naive", "train.schedule_tokens=10500", "train.ckpt_every=7", *store]
    reference = train(config(tmp_path / "ref", *schedule, "train.tokens=10500"))
    short = train(config(tmp_path / "ext", *schedule, "train.tokens=5120"))
    assert (short["steps"], short["tokens"], short["schedule_tokens"]) == (10, 5120, 10500)
    planned = Run("NU", 0, tmp_path / "ext", [], 10240, 10500, 0.0, 512)
    assert status_of(tmp_path / "ext", planned) == "short"  # the sweep extends it, not reruns it
    assert status_of(tmp_path / "ref", planned) == "completed"
    ref_lr = {r["step"]: float(r["lr"]) for r in rows(tmp_path / "ref") if r["lr"]}
    short_lr = {r["step"]: float(r["lr"]) for r in rows(tmp_path / "ext") if r["lr"]}
    assert short_lr == {k: ref_lr[k] for k in short_lr}  # the same cosine, cut off mid-way
    assert short_lr["10"] > 2 * ref_lr["20"]
    extended = train(config(tmp_path / "ext", *schedule, "train.tokens=10500", "resume=true"))
    assert extended["provenance"]["resumed_from_step"] == 10  # from the run's own last step, not step 7
    assert extended["metrics"] == reference["metrics"]
    assert (tmp_path / "ext" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="train.schedule_tokens=10500"):  # forgetting the horizon changes it
        train(config(tmp_path / "ext", "init=naive", "train.ckpt_every=7", *store, "train.tokens=20480",
                     "resume=true"))
    with pytest.raises(ConfigError, match="past the schedule"):
        train(config(tmp_path / "too-far", *schedule, "train.tokens=20480"))


def test_seed_key_is_kept_by_model_fields_at_their_defaults_and_changed_by_others(tmp_path, store):
    """Seeds trained before the HF-family fields existed are still found; a field that changes the model, or
    another data-stream version, makes another key."""
    from dropup import dense_seeds as seeds

    base = seeds.seed_key(config(tmp_path, *store))
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(config(tmp_path, *store), resolve=True)
    model = {k: v for k, v in cfg["model"].items() if k not in seeds.KEY_NEUTRAL_AT_DEFAULT and k != "name"}
    fields_before_sampling = ("source", "path", "domains", "vocab_size", "val_fraction", "max_chars_per_domain",
                              "seq_len", "weights")
    legacy = seeds._hash({"model": model, "data": {k: cfg["data"].get(k) for k in fields_before_sampling},
                          "recipe": {k: v for k, v in cfg["seed_recipe"]["train"].items()
                                     if k not in seeds.EXECUTION_ONLY},  # fields added since (how a step runs)
                          "seed": 0,
                          "data_stream": seeds.DATA_STREAM_VERSION})
    assert base == legacy
    assert seeds.seed_key(config(tmp_path, *store, "model.tie_embeddings=true")) != base
    assert seeds.seed_key(config(tmp_path, *store, "model.rope_theta=500000")) != base
    assert seeds.seed_key(config(tmp_path, *store, "data.tokenizer_sample_chars=1000")) != base
    # a seed trained in fp32 is another seed than the bf16 one (at the bf16-mixed default the key is as it was)
    assert seeds.seed_key(config(tmp_path, *store, "trainer.precision=32-true")) != base
    assert seeds.seed_key(config(tmp_path, *store, "trainer.precision=bf16-mixed")) == base


def test_streams_per_kind_of_run(tmp_path, store):
    """The dense seed, each BTX branch and the MoE runs read different batches at the same (seed, step); MoE
    runs of one seed read the same ones, whatever their init."""
    from dropup.data import TokenData
    from dropup.train import load_data, train_settings

    cfg = config(tmp_path / "x", "init=naive", *store)
    data = load_data(cfg, 64, log=lambda *_: None)
    assert isinstance(data, TokenData)
    streams = {
        "naive": train_settings(cfg)["stream"],
        "drop": train_settings(config(tmp_path / "y", "init=drop", *store))["stream"],
        "dense": train_settings(config(tmp_path / "z", "moe=none", "init=scratch", *store))["stream"],
    }
    assert streams == {"naive": "moe", "drop": "moe", "dense": "dense"}
    batches = {s: data.train_batch(3, 8, 0, s)[0] for s in ("moe", "seed", "branch-ja", "branch-en", "dense")}
    names = list(batches)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(batches[a], batches[b]), (a, b)


def test_a_run_killed_before_its_first_checkpoint_starts_clean(tmp_path, store, monkeypatch):
    run = tmp_path / "early"
    monkeypatch.setenv("DROPUP_CRASH_AT_STEP", "3")  # ckpt_every=5: nothing to resume from
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(run, "init=scratch", *store))
    failed = json.loads((run / "results.json").read_text())  # an exception is recorded as it happens
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert "simulated crash" in (run / "error.txt").read_text()
    monkeypatch.delenv("DROPUP_CRASH_AT_STEP")
    resumed = train(config(run, "init=scratch", "resume=true", *store))
    assert resumed["status"] == "completed" and resumed["provenance"]["resumed_from_step"] is None
    steps = [(r["step"], bool(r["val_loss"])) for r in rows(run)]
    assert len(steps) == len(set(steps)), "a metrics.csv row was written twice"
    assert steps.count(("0", True)) == 1


def test_dense_run_and_scratch_moe(tmp_path, store):
    dense = train(config(tmp_path / "dense", "moe=none", "init=scratch", *store))
    assert dense["moe"] == "none" and dense["total_params"] == dense["active_params"]
    assert "lb_loss" not in rows(tmp_path / "dense")[0]
    scratch = train(config(tmp_path / "fs", "init=scratch", *store))
    assert scratch["init"] == "scratch" and scratch["ratio"] is None
    assert scratch["provenance"]["seed_model"] is None


def test_btx_trains_one_branch_per_domain(tmp_path, store):
    results = train(config(tmp_path / "btx", "init=btx", *store))
    sources = results["provenance"]["seed_model"]
    assert len(sources) == 4 and [Path(s).name.split("-")[-1] for s in sources[1:]] == ["ja", "en", "code"]
    branch = json.loads((Path(sources[1]) / "results.json").read_text())
    assert branch["init"] == "pretrained" and branch["tokens"] == int(0.2 * 10240) // 512 * 512
    streams = [json.loads((Path(s) / "results.json").read_text())["provenance"]["stream"] for s in sources]
    assert streams == ["seed", "branch-ja", "branch-en", "branch-code"]


def test_seed_model_may_be_a_run_directory(tmp_path, store):
    dense = train(config(tmp_path / "dense", "moe=none", "init=scratch", *store))
    moe = train(config(tmp_path / "moe", "init=naive", f"seed_model={tmp_path / 'dense'}", *store))
    assert moe["provenance"]["seed_model"] == str(tmp_path / "dense")
    step0 = next(r for r in rows(tmp_path / "moe") if r["step"] == "0")
    assert float(step0["val_loss"]) == pytest.approx(dense["metrics"]["val_loss"], abs=2e-3)


@pytest.mark.parametrize("override,error,message", [
    ("ratio=1.5", ConfigError, "outside \\[0, 1\\]"),
    ("seed_model=/nonexistent/dense", ConfigError, "does not exist"),
    ("data.seq_len=4096 train.tokens=65536", DataError, "fewer than one sequence"),
    ("train.tokens=10", ConfigError, "less than one batch"),
])
def test_bad_input_is_one_clear_error_and_no_completed_run(tmp_path, store, override, error, message):
    with pytest.raises(error, match=message):
        train(config(tmp_path / "run", *override.split(), *store))
    results = tmp_path / "run" / "results.json"
    assert not results.exists() or json.loads(results.read_text())["status"] == "failed"


def test_a_run_predicted_not_to_fit_stops_before_any_corpus_work(tmp_path, store, monkeypatch):
    """The host offers 3/4 of the run's predicted peak: the run stops at once, naming the fix (two nodes)."""
    def check_on_a_smaller_host(model, moe, run, available):
        host = int(0.75 * memory.predict(model, moe, run)["host_peak_per_node"])
        return check_fits(model, moe, run, Available(host=host))

    check_fits = memory.check_fits
    monkeypatch.setattr("dropup.memory.check_fits", check_on_a_smaller_host)
    monkeypatch.setattr("dropup.train.load_data", lambda *a, **k: pytest.fail("corpus work before the memory check"))
    with pytest.raises(ConfigError, match=r"predicted peak host memory .* exceeds the .* available: set "
                                          r"trainer=fsdp and trainer.num_nodes=2"):
        train(config(tmp_path / "run", *store))
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("content,message", [(b"", "no documents"), (b"\xff\xfe\x00bad\n", "not UTF-8"),
                                             (b'{"text": "x"}\n', "bad.jsonl:1 has no `domain` field")])
def test_bad_data_files(tmp_path, store, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        train(config(tmp_path / "run", "data=jsonl", f"data.path={path}", "init=scratch", *store))


def _hf_dir(tmp_path, store, moe: bool):
    """A tiny HF checkpoint saved by transformers itself, with the fixture corpus's tokenizer."""
    from transformers import AutoModelForCausalLM

    from dropup.config import architecture
    from dropup.hf import hf_config, to_hf
    from dropup.model import Transformer

    cfg = config(tmp_path / "unused", *store, *(["moe=none"] if not moe else []))
    model_cfg, moe_cfg = architecture(cfg)
    ours = Transformer(model_cfg, moe_cfg)
    hf = AutoModelForCausalLM.from_config(hf_config(model_cfg, moe_cfg))
    hf.load_state_dict(to_hf(ours.state_dict()), strict=True)
    out = tmp_path / ("hf-mixtral" if moe else "hf-llama")
    hf.save_pretrained(out)
    from dropup.train import load_data

    tokenizer = load_data(cfg, int(cfg.data.seq_len), log=lambda *_: None).path / "tokenizer.json"
    (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out


def test_seed_model_may_be_an_hf_llama_directory(tmp_path, store):
    hf = _hf_dir(tmp_path, store, moe=False)
    results = train(config(tmp_path / "run", "init=drop", "ratio=0.25", f"seed_model={hf}", *store))
    assert results["status"] == "completed" and results["provenance"]["seed_model"] == str(hf)
    import hashlib

    assert results["provenance"]["tokenizer_hash"] == hashlib.sha256((hf / "tokenizer.json").read_bytes()).hexdigest()


def test_pretrained_continues_an_hf_mixtral(tmp_path, store):
    hf = _hf_dir(tmp_path, store, moe=True)
    results = train(config(tmp_path / "run", "init=pretrained", f"seed_model={hf}", *store))
    assert results["status"] == "completed" and results["init"] == "pretrained"
    with pytest.raises(ConfigError, match="is an MoE but moe= says dense"):
        train(config(tmp_path / "run2", "init=pretrained", "moe=none", f"seed_model={hf}", *store))
    with pytest.raises(ConfigError, match="is an MoE model"):
        train(config(tmp_path / "run3", "init=naive", f"seed_model={hf}", *store))


def test_wandb_logger_offline(tmp_path, store, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    results = train(config(tmp_path / "run", "moe=none", "init=scratch", "logger=wandb", *store))
    assert results["status"] == "completed"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert rows(tmp_path / "run")  # metrics.csv is written whatever the logger


def test_pre_tokenized_data_folder(tmp_path, store):
    from dropup.train import load_data

    prepared = load_data(config(tmp_path / "x", *store), 64, log=lambda *_: None).path
    results = train(config(tmp_path / "run", "moe=none", "init=scratch", "data=tokens", f"data.path={prepared}",
                           "data.seq_len=64", *store))
    assert results["provenance"]["corpus_hash"] == json.loads((prepared / "manifest.json").read_text())["corpus_hash"]
    with pytest.raises(DataError, match="no manifest.json"):
        train(config(tmp_path / "bad", "moe=none", "init=scratch", "data=tokens", f"data.path={tmp_path}", *store))


def test_export_and_lm_eval_on_a_local_task(tmp_path, store, monkeypatch):
    """A finished MoE run exported as an HF Mixtral directory loads with transformers, computes our logits, and
    lm-evaluation-harness scores it on a task defined in a local file (no downloads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dropup.config import architecture
    from dropup.export import evaluate, export
    from dropup.model import Transformer
    from safetensors.torch import load_file

    cfg = config(tmp_path / "run", "init=naive", *store)
    train(cfg)
    out = export(tmp_path / "run", tmp_path / "hf", Path(cfg.paths.data_dir))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = Transformer(*architecture(cfg)).eval()
    ours.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    ids = tokenizer("def main():\n    return 1", return_tensors="pt").input_ids
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = tmp_path / "tasks" / "docs.jsonl"
    docs.parent.mkdir()
    docs.write_text("".join(json.dumps({"question": f"{i} plus one is", "choices": [str(i + 1), "banana"],
                                        "answer": 0}) + "\n" for i in range(6)))
    (docs.parent / "tiny.yaml").write_text(yaml_task(docs))
    scores = evaluate(tmp_path / "run", out, {"tasks": ["dropup_tiny"], "include_path": str(docs.parent),
                                              "limit": 6, "batch_size": 2})
    assert 0.0 <= scores["eval/dropup_tiny"] <= 1.0
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())
    assert recorded["metrics"]["eval/dropup_tiny"] == scores["eval/dropup_tiny"]


def yaml_task(docs: Path) -> str:
    return f"""task: dropup_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
