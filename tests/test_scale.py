"""Scale-out: micro-batches, activation checkpointing, and FSDP2 on two CPU processes (gloo) with a sharded
checkpoint that resumes after a kill.

Tolerances: runs that split the same fp32 computation differently (micro-batches, ranks) sum in another order,
so they agree to rounding: losses to 1e-5 relative, weights after 20 AdamW steps to 1e-4 absolute (measured:
1e-7 and 3e-6). The balance loss is formed per micro-batch and, pooled, per rank, so a run with it differs by
design; these comparisons train with `moe.lb_coef=0` and compare `lm_loss`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.model import Transformer
from dropup.train import train, train_settings
from test_train import ROOT, config, rows

FP32_NO_BALANCE = ["init=scratch", "trainer.precision=32-true", "moe.lb_coef=0"]


def _compare_curves(got_dir, want_dir, columns=("lm_loss", "val_loss", "grad_norm")):
    got, want = rows(got_dir), rows(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for column in columns:
            assert (g[column] == "") == (w[column] == ""), (column, g["step"])
            if w[column]:
                assert float(g[column]) == pytest.approx(float(w[column]), rel=1e-5), (column, g["step"])


def test_activation_checkpointing_changes_no_number_and_keeps_less():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2)
    moe = MoEConfig(enabled=True, num_experts=4, top_k=2, z_coef=1e-3)
    model = Transformer(cfg, moe)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))

    def step(checkpointing: bool):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            losses = model.losses(model(x), y)
        losses["loss"].backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    plain_losses, plain_grads, plain_saved = step(False)
    ckpt_losses, ckpt_grads, ckpt_saved = step(True)
    for name in plain_losses:
        assert torch.equal(plain_losses[name], ckpt_losses[name]), name
    for name in plain_grads:  # the balance and z losses' router gradients included
        assert torch.equal(plain_grads[name], ckpt_grads[name]), name
    assert ckpt_saved < plain_saved / 2  # only each block's input (and the head's logits) are kept


def test_micro_batches_give_the_whole_batch_step(tmp_path, store):
    """8 sequences per step in one pass vs 4 micro-batches of 2 with activation checkpointing: the same curve,
    gradient norms included. Reading the same rows in every micro-batch, or summing instead of averaging the
    micro-batches' losses, changes lm_loss or grad_norm at the first logged step."""
    whole = train(config(tmp_path / "whole", *FP32_NO_BALANCE, *store))
    micro = train(config(tmp_path / "micro", *FP32_NO_BALANCE, *store, "train.micro_batch_size=2",
                         "train.activation_checkpointing=true"))
    _compare_curves(tmp_path / "micro", tmp_path / "whole")
    assert micro["metrics"]["val_loss"] == pytest.approx(whole["metrics"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["train.micro_batch_size=3"], "train.micro_batch_size=3 does not divide the 8 sequences"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0 does not divide the 8 sequences"),  # not "null"
    (["trainer.devices=2", "train.micro_batch_size=8"], "does not divide the 4 sequences each of the 2 ranks"),
])
def test_micro_batch_size_must_divide_each_ranks_share(tmp_path, overrides, message):
    cfg = config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message):
        train_settings(cfg, world_size=int(cfg.trainer.devices))


def _run_py(*args, env=None):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_fsdp_on_two_processes_matches_one_and_resumes_on_four_after_a_kill(tmp_path, store):
    from dropup.export import export
    from dropup.fsdp import consolidate

    common = [*FP32_NO_BALANCE, "data=fixture", "model.vocab_size=512", "train.batch_size=8", "train.tokens=10240",
              "train.log_every=5", "train.val_every=10", "train.ckpt_every=5", "train.val_tokens=2048",
              "trainer.enable_progress_bar=false", *store]
    single = train(config(tmp_path / "single", *common))
    sharded = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", *common,
               f"hydra.run.dir={tmp_path / 'fsdp'}"]
    killed = _run_py(*sharded, env={"DROPUP_CRASH_AT_STEP": "15"})
    assert killed.returncode != 0 and "simulated crash" in killed.stderr
    ckpt = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    _assert_experts_and_router_sharded_along_dim_1(ckpt)
    # resharded: the 2 ranks' checkpoint resumes on 4 (DCP redistributes the weights and AdamW states); with
    # lb_coef=0 the balance loss trains nothing, so lm_loss matches the single-process run's as before
    on_four = [arg if arg != "trainer.devices=2" else "trainer.devices=4" for arg in sharded]
    resumed = _run_py(*on_four, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(ckpt.glob("*.distcp"))) == 4  # the final checkpoint: one shard per rank of the resumed run

    results = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert results["status"] == "completed" and results["provenance"]["resumed_from_step"] == 10
    _compare_curves(tmp_path / "fsdp", tmp_path / "single")
    assert results["metrics"]["lm_loss"] == pytest.approx(single["metrics"]["lm_loss"], rel=1e-5)
    weights, reference = load_file(str(tmp_path / "fsdp" / "model.safetensors")), \
        load_file(str(tmp_path / "single" / "model.safetensors"))
    assert weights.keys() == reference.keys()
    for name in reference:
        assert_close(weights[name], reference[name], atol=1e-4, rtol=0, msg=name)
    # the final sharded checkpoint holds exactly the weights the run wrote
    consolidated = load_file(str(consolidate(ckpt, tmp_path / "consolidated.safetensors")))
    assert consolidated.keys() == weights.keys()
    assert all(torch.equal(consolidated[name], weights[name]) for name in weights)

    data_dir = Path(store[0].split("=", 1)[1])
    hf_sharded = load_file(str(export(tmp_path / "fsdp", tmp_path / "hf-fsdp", data_dir) / "model.safetensors"))
    hf_single = load_file(str(export(tmp_path / "single", tmp_path / "hf-single", data_dir) / "model.safetensors"))
    assert hf_sharded.keys() == hf_single.keys()
    for name in hf_single:
        assert_close(hf_sharded[name], hf_single[name], atol=1e-4, rtol=0, msg=name)


def test_consolidate_names_a_wrong_path(tmp_path):
    from dropup.fsdp import main

    (tmp_path / "last.ckpt").write_bytes(b"not a directory checkpoint")
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()


def _assert_experts_and_router_sharded_along_dim_1(ckpt):
    """Dim 0 of the stacked experts and the router is the expert index: split across more ranks than experts it
    would leave ranks empty, so those are sharded along dim 1, everything else along dim 0. Read off the sharded
    checkpoint's metadata: each rank's chunk of each tensor, by its offset."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    for name, tensor in metadata.items():
        if not name.startswith("state_dict.model.") or name.endswith("tokens_per_expert"):
            continue
        split = {d for chunk in tensor.chunks for d, offset in enumerate(chunk.offsets) if offset}
        expert_dim = name.endswith(("ffn.w_gate_up", "ffn.w_down", "ffn.router.weight"))
        assert len(tensor.chunks) == 2 and split == ({1} if expert_dim else {0}), (name, tensor.chunks)
    assert "state_dict.model.layers.0.ffn.w_gate_up" in metadata and "state_dict.model.layers.1.ffn.router.weight" in metadata


def test_how_a_step_is_executed_does_not_change_the_seed_key(tmp_path):
    """A dense seed trained with micro-batches or checkpointing is the same model: found, not retrained."""
    from dropup.dense_seeds import seed_key

    key = seed_key(config(tmp_path))
    assert seed_key(config(tmp_path, "seed_recipe.train.micro_batch_size=2",
                           "seed_recipe.train.activation_checkpointing=true")) == key
    assert seed_key(config(tmp_path, "seed_recipe.train.batch_size=4")) != key
