"""Saving with bounded memory: checkpoints, the final weights, the consolidation and the export are written one
tensor at a time into the same bytes as before (safetensors' `save_file`, transformers' `save_pretrained`), and
a run's final save adds about one tensor to its training peak, not the checkpoint (issue 27)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from dropup.checkpoint_io import StreamingCheckpointIO
from dropup.config import ModelConfig, MoEConfig
from dropup.export import export
from dropup.fsdp import consolidate
from dropup.hf import hf_config, to_hf_model
from dropup.model import Transformer
from dropup.shards import write_safetensors
from test_train import ROOT


def _mixed_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"layers.10.w": torch.randn(3, 4, generator=g), "layers.2.w": torch.randn(5, generator=g),
            "a": torch.randn(2, generator=g).bfloat16(), "c": torch.randn(1, dtype=torch.float64),
            "z": torch.arange(3), "y": torch.randn(2, 2, generator=g).half(), "empty": torch.zeros(0),
            "mask": torch.ones(2, dtype=torch.bool)}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streamed_safetensors_are_save_files_bytes(tmp_path, metadata):
    """Tensor order (save_file sorts by dtype, widest first, then by name: layers.10 before layers.2) and header;
    writing in the dict's order, or with the converter's default metadata, differs."""
    state = _mixed_state()
    save_file(state, str(tmp_path / "want.safetensors"), metadata=metadata)
    asked = []
    write_safetensors(tmp_path / "got.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in state.items()},
                      lambda name: asked.append(name) or state[name], metadata=metadata)
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    assert asked[:5] == ["z", "c", "empty", "layers.10.w", "layers.2.w"]  # in the file's order, one at a time
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_write_leaves_no_file(tmp_path):
    state = _mixed_state()

    def failing(name):
        if name == "layers.2.w":
            raise RuntimeError("disk full")
        return state[name]

    with pytest.raises(RuntimeError, match="disk full"):
        write_safetensors(tmp_path / "w.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, failing)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_io_writes_torch_saves_bytes_atomically_and_reads_memory_mapped(tmp_path):
    state = {"state_dict": {"w": torch.randn(64, 32)}, "optimizer_states": [{"state": {0: torch.randn(64, 32)}}],
             "global_step": 3}
    io = StreamingCheckpointIO()
    io.save_checkpoint(state, tmp_path / "ckpt" / "last.ckpt")
    TorchCheckpointIO().save_checkpoint(state, tmp_path / "want.ckpt")  # Lightning's, through a whole-file buffer
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == (tmp_path / "want.ckpt").read_bytes()
    loaded = io.load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"]) and loaded["global_step"] == 3
    # memory-mapped: the tensors live in the file's mapping, not in a copy read into memory
    assert str(tmp_path / "ckpt" / "last.ckpt") in open("/proc/self/maps").read()
    # a save that fails half-way leaves the previous checkpoint as it was, and no partial file
    before = (tmp_path / "ckpt" / "last.ckpt").read_bytes()
    with pytest.raises(Exception):
        io.save_checkpoint({"w": torch.zeros(3), "unpicklable": lambda: None}, tmp_path / "ckpt" / "last.ckpt")
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_consolidate_reads_one_key_at_a_time_into_save_files_bytes(tmp_path):
    """A DCP checkpoint as Lightning's sharded strategy writes it (weights and optimizer states): the consolidated
    file is save_file's bytes of the weights alone, as before."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    weights = {f"model.{k}": v for k, v in Transformer(ModelConfig(vocab_size=64, n_layers=2, d_model=16, d_ff=32,
                                                                   n_heads=2, n_kv_heads=2)).state_dict().items()}
    optimizer = {"state": {k: {"exp_avg": torch.randn_like(v)} for k, v in weights.items()}}
    save({"state_dict": weights, "optimizer_0": optimizer}, storage_writer=FileSystemWriter(tmp_path / "ckpt"),
         no_dist=True)
    consolidate(tmp_path / "ckpt", tmp_path / "got.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, str(tmp_path / "want.safetensors"))
    assert (tmp_path / "got.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()


def _export_before(run_dir, out, model_cfg, moe_cfg, ids):
    """The export as it was (the whole state loaded into transformers' model, `save_pretrained`): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(model_cfg, moe_cfg, **ids))
    state = load_file(str(run_dir / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("ffn.expert_bias")}
    model.load_state_dict(to_hf_model(state, model_cfg, moe_cfg), strict=False)
    model.save_pretrained(out)


EXPORTS = {  # model fields, MoE (None: dense)
    "llama-dense": ({"family": "llama"}, None),
    "llama-mixtral-tied": ({"family": "llama", "tie_embeddings": True}, MoEConfig(enabled=True, num_experts=4, top_k=2)),
    "qwen2-moe-shared": ({"family": "qwen2", "attn_bias": True},
                         MoEConfig(enabled=True, num_experts=4, top_k=2, shared_expert_d_ff=32, shared_expert_gate=True)),
    "qwen3-moe-aux-free": ({"family": "qwen3", "qk_norm": True},
                           MoEConfig(enabled=True, num_experts=4, top_k=2, lb_mode="aux_free")),
    "phi3-dense-fused": ({"family": "phi3"}, None),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_writes_the_files_save_pretrained_wrote(tmp_path, case):
    """Dense, Mixtral (tied: no lm_head written), Qwen2-MoE (its shared expert), Qwen3-MoE with aux_free biases
    (left out, with the warning's model filled from the file) and Phi-3 (q|k|v fused from three of ours): every
    file, bytes included, as the whole-state export wrote it."""
    fields, moe = EXPORTS[case]
    model = ModelConfig(name="t", vocab_size=97, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2, **fields)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    moe_fields = moe.__dict__ if moe is not None else {"enabled": False}
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"model": model.__dict__, "moe": moe_fields}))
    state = Transformer(model, moe).state_dict()
    for name in [k for k in state if k.endswith("expert_bias")]:
        state[name] = torch.randn(state[name].shape) * 0.01
    save_file(state, str(run / "model.safetensors"))
    seed = tmp_path / "seed"
    seed.mkdir()
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    (seed / "config.json").write_text(json.dumps(ids))
    (run / "results.json").write_text(json.dumps({"provenance": {"seed_model": str(seed)}}))
    got = export(run, tmp_path / "got", tmp_path / "data")
    _export_before(run, tmp_path / "want", model, moe, ids)
    want = tmp_path / "want"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for path in want.iterdir():
        assert (got / path.name).read_bytes() == path.read_bytes(), path.name


MEASURE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
    sys.path.insert(0, "tests")
    from test_train import config
    from dropup.train import train

    def hwm():  # peak resident set so far (VmHWM, bytes): mapped file pages count too
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    marks = {}
    dump = _CheckpointConnector.dump_checkpoint

    def first_dump(self, *args, **kwargs):  # the run's first checkpoint: training (and validation) are over
        marks.setdefault("trained", hwm())
        return dump(self, *args, **kwargs)

    _CheckpointConnector.dump_checkpoint = first_dump
    train(config(sys.argv[1], *sys.argv[3:]))
    marks["saved"] = hwm()
    Path(sys.argv[2]).write_text(json.dumps(marks))
''')
# 8 layers of 8 experts, d 256, F 512: 25.5 M parameters, 102 MB in fp32; the largest tensor (one layer's
# w_gate_up) is 8 % of it. Two steps of 2 x 16 tokens, one checkpoint (at the end).
MEMORY_RUN = ["init=scratch", "trainer.precision=32-true", "model.n_layers=8", "model.d_model=256", "model.d_ff=512",
              "model.n_heads=4", "model.n_kv_heads=4", "data.seq_len=16", "train.batch_size=2", "train.tokens=64",
              "train.val_tokens=32", "train.val_batch_size=2", "train.ckpt_every=1000", "train.log_every=1"]


def test_the_final_save_adds_about_one_tensor_to_the_training_peak(tmp_path, store):
    """Before: Lightning serialized the checkpoint (weights + both AdamW moments, 3x the weights) into memory, and
    safetensors' save_file copied the weights once more: the save rose ~3x the weights (~300 MB here) above the
    training peak. Now it may add one tensor and the I/O buffers: bound 40 % of the weights (41 MB)."""
    marks = tmp_path / "marks.json"
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "run"), str(marks), *MEMORY_RUN, *store],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    weights = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert weights > 100e6
    peaks = json.loads(marks.read_text())
    added = peaks["saved"] - peaks["trained"]
    assert added < 0.4 * weights, f"the save added {added / 1e6:.0f} MB to the training peak (weights {weights / 1e6:.0f} MB)"


def test_final_weights_are_save_files_bytes_whole_and_gathered_tensor_by_tensor(tmp_path):
    """`write_weights` on a plain model and on its FSDP2-sharded copy (one gloo rank) writes the file that
    save_file wrote from the whole state dict (before: get_model_state_dict's full dict under FSDP)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from dropup.fsdp import shard_model, write_weights
    from dropup.tensors import is_sharded

    model_cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=16, d_ff=32, n_heads=2, n_kv_heads=2)
    model = Transformer(model_cfg, MoEConfig(enabled=True, num_experts=4, top_k=2, lb_mode="aux_free"))
    save_file(model.state_dict(), str(tmp_path / "want.safetensors"))
    write_weights(model, tmp_path / "whole.safetensors", write=True)
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "want.safetensors").read_bytes()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        shard_model(model, init_device_mesh("cpu", (1,)), bf16=False)
        assert sum(is_sharded(t) for t in model.state_dict().values()) == len(list(model.parameters()))
        write_weights(model, tmp_path / "gathered.safetensors", write=True)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        save_file(full, str(tmp_path / "before.safetensors"))
    finally:
        dist.destroy_process_group()
    assert (tmp_path / "gathered.safetensors").read_bytes() == (tmp_path / "before.safetensors").read_bytes() \
        == (tmp_path / "want.safetensors").read_bytes()
