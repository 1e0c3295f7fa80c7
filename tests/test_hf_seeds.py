"""run.py from the checkpoints practitioners hold: an HF directory of each family as seed_model. The seed's own
config is the architecture (model=hf), checked before any corpus work; shards are read through the index; the
upcycled run exports as the seed family's MoE family with the seed's tokenizer."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dropup.config import ConfigError
from dropup.train import train
from tests.test_families import hf_dense
from tests.test_train import TINY, config, rows

FAMILY_CASES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"]


def fixture_tokenizer(tmp_path, store):
    from dropup.train import load_data

    return load_data(config(tmp_path / "unused", *store), 64, log=lambda *_: None).path / "tokenizer.json"


def save_seed(tmp_path, store, case, name="seed", **changes):
    """A dense HF checkpoint of the case's family, vocabulary 512 (the fixture tokenizer's), sharded, with the
    fixture corpus's tokenizer.json beside it."""
    model = hf_dense(case, vocab_size=512, **changes)
    out = tmp_path / name
    model.eval().save_pretrained(out, max_shard_size="40KB")
    shutil.copy(fixture_tokenizer(tmp_path, store), out / "tokenizer.json")
    return out, model


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_upcycled_run_from_each_family_trains_and_exports_the_dense_function(case, tmp_path, store):
    seed, dense = save_seed(tmp_path, store, case)
    run = tmp_path / "run"
    # lr 0: the run trains (every step, the losses, the checkpoint) but keeps its step-0 weights
    # naive upcycling for two families, drop at r = 0 for the other two: each MoE class sees both
    init = ["init=naive"] if case in ("llama", "qwen2") else ["init=drop", "ratio=0.0"]
    results = train(config(run, "model=hf", f"seed_model={seed}", *init, "train.tokens=2048", "train.lr=0",
                           "train.val_every=4", *store))
    assert results["status"] == "completed" and results["model"].startswith(case + "-")
    from dropup.export import export

    out = export(run, tmp_path / "hf", Path(store[0].split("=", 1)[1]))
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert moe.config.model_type == {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe",
                                     "qwen3": "qwen3_moe", "phi3": "mixtral", "olmo2": "flex_olmo",
                                     "granite": "granitemoe"}[case]
    assert (out / "tokenizer.json").read_bytes() == (seed / "tokenizer.json").read_bytes()
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(moe(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)
    trained = train(config(tmp_path / "trained", "model=hf", f"seed_model={seed}", "init=drop", "ratio=0.5",
                           "train.tokens=2048", *store))
    assert trained["status"] == "completed" and trained["provenance"]["seed_model"] == str(seed)
    assert torch.isfinite(torch.tensor(trained["metrics"]["val_loss"]))


def test_a_preset_that_disagrees_with_the_seed_is_one_error_not_a_silent_theta(tmp_path, store):
    """A Llama 3 seed with theta 500000 and eps 1e-6 under a preset whose shapes match: before, it trained with
    the preset's theta 10000 and eps 1e-5; now the explicit preset is refused, and model=hf takes the seed's."""
    seed, _ = save_seed(tmp_path, store, "llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_size=64, num_attention_heads=4,
                        intermediate_size=256, num_key_value_heads=4)
    matching_shapes = ["model.n_layers=2", "model.d_model=64", "model.d_ff=256", "model.n_heads=4",
                       "model.n_kv_heads=4"]
    with pytest.raises(ConfigError, match="rope_theta=500000.0.*norm_eps=1e-06"):
        train(config(tmp_path / "bad", *matching_shapes, f"seed_model={seed}", "init=naive", *store))
    results = train(config(tmp_path / "ok", "model=hf", f"seed_model={seed}", "init=naive", "train.tokens=1024",
                           *store))
    used = (tmp_path / "ok" / "config.yaml").read_text()
    assert results["status"] == "completed" and "rope_theta: 500000.0" in used and "norm_eps: 1.0e-06" in used


def run_py(*args, timeout=None):
    """run.py with these arguments, through Hydra's entry point in this process (`conftest.run_py_inline`)."""
    from types import SimpleNamespace

    from conftest import run_py_inline

    code, stdout, stderr = run_py_inline(*args)
    return SimpleNamespace(returncode=code, stdout=stdout, stderr=stderr)


def test_info_of_an_hf_seed_reports_the_seed_upcycled(tmp_path, store):
    """Before: stage=info seed_model=<dir> reported the tiny preset's 1.9 M parameters."""
    from dropup.config import MoEConfig
    from dropup.flops import param_counts
    from dropup.hf import configs_from_hf

    seed, dense = save_seed(tmp_path, store, "qwen3")
    proc = run_py("stage=info", f"seed_model={seed}", "moe=mixtral", f"hydra.run.dir={tmp_path / 'info'}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    model_cfg, _ = configs_from_hf(dense.config.to_dict())
    expected = param_counts(model_cfg, MoEConfig(enabled=True, num_experts=8, top_k=2))
    assert (report["total_params"], report["active_params"]) == (expected["total_params"], expected["active_params"])
    assert report["model"].startswith("qwen3-")


def test_a_vocabulary_mismatch_fails_before_any_corpus_work(tmp_path, store):
    """Before: the whole corpus was tokenized (87 s) before a vocabulary-size error."""
    seed, _ = save_seed(tmp_path, store, "llama")
    data_dir = tmp_path / "fresh-data"
    proc = run_py(*TINY, "model.vocab_size=256", f"seed_model={seed}", f"paths.data_dir={data_dir}",
                  f"paths.seed_store={tmp_path / 'seeds'}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "vocab_size=512" in last and "model=hf" in last
    assert not data_dir.exists()  # no corpus was prepared
    # and with the seed's own config (no model override) the same command runs (on the session's prepared data)
    proc = run_py(*[o for o in TINY if not o.startswith("model.")], f"seed_model={seed}", "init=naive",
                  "train.tokens=1024", *store, f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # results.json names the seed's family and size, not the default preset's name
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["model"].startswith("llama-")
    # adopted automatically through run.py: the paper's lr for a pretrained seed, said in the run's log
    assert "lr: 0.0002" in (tmp_path / "run2" / "config.yaml").read_text()
    assert "peak lr 0.0002 (model=hf" in (tmp_path / "run2" / "run.log").read_text()


def test_sharded_seed_is_read_through_its_index(tmp_path, store):
    """Before: every *.safetensors in the directory was merged, so a stray consolidated copy beside the shards
    silently replaced weights."""
    from safetensors.torch import save_file

    from dropup import dense_seeds as seeds
    from dropup.hf import configs_from_hf, from_hf

    seed, dense = save_seed(tmp_path, store, "mistral")
    assert (seed / "model.safetensors.index.json").is_file()
    stray = {k: torch.zeros_like(v) for k, v in dense.state_dict().items()}
    save_file(stray, str(seed / "consolidated.safetensors"))
    model_cfg, _ = configs_from_hf(dense.config.to_dict())
    state = seeds._hf_state(seed, model_cfg)
    expected = from_hf(dense.state_dict(), "mistral")
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_seed_whose_window_its_moe_family_cannot_carry_is_refused_before_any_work(tmp_path, store):
    """A Qwen3 sliding from layer 1 on: upcycling it (run.py adopts the seed) is refused at start, before the
    corpus or any file of the run."""
    from tests.test_families import QWEN3_LATE_WINDOW

    seed, _ = save_seed(tmp_path, store, "qwen3", **QWEN3_LATE_WINDOW)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="slides its attention window only from layer 1 on.*qwen3_moe"):
        train(config(run, "model=hf", f"seed_model={seed}", "init=naive", *store))
    assert not (run / "results.json").exists()


def test_a_pretrained_seed_trains_at_the_papers_lr_unless_one_is_chosen(tmp_path, store, caplog):
    """Before: seed_model=<HF dir> trained at the toy preset's 2e-3. Now model=hf (by hand or automatically)
    defaults to the paper's MoE peak 2e-4 and floor 0.1, an lr the user chose stays, and the log says which."""
    import logging

    from dropup.schema import recipe_choices

    caplog.set_level(logging.INFO, logger="dropup.train")
    seed, _ = save_seed(tmp_path, store, "llama")
    short = ["init=naive", f"seed_model={seed}", "train.tokens=1024", "train.min_lr_ratio=0.5", *store]
    train(config(tmp_path / "auto", *short), explicit_model=False, recipe_from={})
    used = (tmp_path / "auto" / "config.yaml").read_text()
    assert "lr: 0.0002" in used and "min_lr_ratio: 0.1" in used
    assert "peak lr 0.0002 (model=hf: the paper's MoE recipe (A.4) for a pretrained seed)" in caplog.text
    chosen = ["model=hf", "train.lr=1e-3"]
    train(config(tmp_path / "chosen", *chosen, *short), recipe_from=recipe_choices(chosen))
    used = (tmp_path / "chosen" / "config.yaml").read_text()
    assert "lr: 0.001" in used and "min_lr_ratio: 0.1" in used
    assert "peak lr 0.001 (train.lr=1e-3 on the command line)" in caplog.text
    assert max(float(r["lr"]) for r in rows(tmp_path / "chosen") if r["lr"]) <= 1e-3


def test_where_the_lr_comes_from():
    from dropup.schema import recipe_choices

    assert recipe_choices([]) == {} and recipe_choices(["model=hf", "seed=1"]) == {}
    assert set(recipe_choices(["+train.lr=1"])) == {"lr"}
    assert recipe_choices(["experiment=mini"]) == {"lr": "experiment=mini"}  # mini.yaml sets train.lr only
    assert set(recipe_choices(["train=paper_moe"])) == {"lr", "min_lr_ratio"}
