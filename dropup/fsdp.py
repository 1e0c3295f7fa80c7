"""Sharded data parallelism (`trainer=fsdp`): FSDP2 (`fully_shard`) through Lightning's `ModelParallelStrategy`.

How the model is wrapped, and why:
- one FSDP unit per transformer block, and the root (embeddings, final norm, LM head) as the last: a block's
  parameters are all-gathered just before it runs and freed after it (forward and backward), so at any time a
  rank holds its shards plus about two blocks' full parameters (the next one is prefetched);
- an MoE block's stacked experts (`w_gate_up` (E, 2F, D), `w_down` (E, D, F)) and its router (E, D) stay in that
  block's unit: the router's choice and every expert are needed by the same forward, so one all-gather serves
  them. They are sharded along dim 1, not FSDP's default dim 0: dim 0 is the expert index (8 in the paper), and
  split 64 ways it would leave 56 of 64 ranks holding nothing while 8 hold a whole expert each. Dim 1 (2F or D,
  thousands) splits evenly; where the ranks do not divide dim 1 (FSDP2 pads uneven shards only along dim 0) they
  fall back to dim 0. All other parameters use dim 0;
- under `trainer.precision=bf16-mixed` the units gather bf16 copies of the fp32 master shards and reduce-scatter
  gradients in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`): half the gather traffic of
  fp32, with AdamW updating fp32 shards. Under 32-true everything is fp32;
- the routing bias of `moe.lb_mode=aux_free` and the routing counts are buffers: replicated, not sharded (every
  rank applies the same all-reduced update).

Checkpoints of a sharded run are directories, `checkpoints/last.ckpt/`: torch.distributed.checkpoint (DCP) files,
one `__<rank>_0.distcp` per rank plus `.metadata`, and Lightning's `meta.pt` (step, loops, schedulers). A run
resumes from it with `resume=true`, on the same number of ranks or another (DCP reshards: a 2-rank checkpoint
resuming on 4 is tested). `python -m dropup.fsdp <ckpt dir> <out>`
writes its weights as one `model.safetensors` with the run's own names (what `stage=export` reads); a finished
run writes that file itself (`write_weights`). Both stream, one tensor at a time: DCP writes each rank's shards
as they are (a non-contiguous one is copied, one at a time), the consolidation reads one key at a time, and the
final weights gather one tensor at a time, so no rank ever holds the whole state to save it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from dropup.shards import save_file_order, write_safetensors
from dropup.tensors import full, is_sharded

EXPERT_DIM_PARAMS = ("w_gate_up", "w_down", "router.weight")  # dim 0 indexes the experts


def shard_model(model: nn.Module, mesh, bf16: bool) -> None:
    """Apply FSDP2 to our `Transformer` in place: one unit per block, then the root. The model may be on the meta
    device (then only the shards' shapes exist; `dropup.init.producer.materialize` fills them).

    The experts and routers are sharded along dim 1 where the ranks divide it: FSDP2 pads uneven shards along
    dim 0 only, so a dim 1 the ranks do not divide (e.g. 3 ranks) falls back to dim 0, and any rank count works."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    ranks = mesh.size()
    expert_dim = {id(p) for name, p in model.named_parameters()
                  if name.endswith(EXPERT_DIM_PARAMS) and p.shape[1] % ranks == 0}

    def placement(param: nn.Parameter):
        return Shard(1) if id(param) in expert_dim else Shard(0)

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)


def write_weights(model: nn.Module, path: Path, write: bool) -> None:
    """The model's state dict as the safetensors file `path` (our names), the bytes `save_file(model.state_dict())`
    writes, streamed: one tensor at a time, in the file's order. A sharded tensor is gathered whole on every rank
    (every rank calls this, and takes part in each gather in the same order: a collective) and written by the
    rank that `write`s (rank 0), then dropped; no rank ever holds the whole state."""
    state = model.state_dict()  # the model's own tensors (FSDP2: its DTensor shards), not copies
    metas = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}
    if write:
        write_safetensors(path, metas, lambda name: full(state[name]).detach().cpu())
        return
    for planned in save_file_order(metas):
        if is_sharded(state[planned.name]):
            full(state[planned.name])


def consolidate(checkpoint: Path, out: Path) -> Path:
    """A sharded checkpoint directory's model weights as one safetensors file (our names, no optimizer state;
    the bytes `save_file` writes for them), written under a temporary name and renamed when complete. Read and
    written one tensor at a time (DCP loads the keys asked for, from every rank's file): the optimizer states,
    twice the weights in fp32, stay on disk, and at most one whole tensor is in memory."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / ".metadata").is_file():
        raise ValueError(f"{checkpoint} is not a sharded checkpoint (no .metadata inside): pass the run's "
                         "checkpoints/last.ckpt directory of a trainer=fsdp run")
    reader = FileSystemReader(checkpoint)
    prefix = "state_dict."  # Lightning saves {"state_dict": <LitLM's>, "optimizer_0": ...}, flattened by DCP
    keys, metas = {}, {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            name = key[len(prefix):].removeprefix("model.")
            keys[name], metas[name] = key[len(prefix):], (tuple(meta.size), meta.properties.dtype)

    def tensor_of(name: str) -> torch.Tensor:
        tensor = torch.empty(metas[name][0], dtype=metas[name][1])
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load({"state_dict": {keys[name]: tensor}}, storage_reader=reader, no_dist=True)
        return tensor

    return write_safetensors(out, metas, tensor_of)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dropup.fsdp",
                                     description="Write a sharded (trainer=fsdp) checkpoint's weights as one "
                                                 "model.safetensors.")
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoints/last.ckpt directory")
    parser.add_argument("out", type=Path, help="the safetensors file to write, e.g. <run>/model.safetensors")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.checkpoint, args.out))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def sharded_strategy(devices: int, num_nodes: int):
    """Lightning's `ModelParallelStrategy` as pure data parallelism over every rank (FSDP2, no tensor parallelism),
    its checkpoints written under a temporary name and moved into place when every rank has written its shard."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class ShardedDataParallel(ModelParallelStrategy):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            path = Path(self.broadcast(str(filepath)))
            partial = path.with_name(path.name + ".partial")
            if self.global_rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            self.barrier()
            super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier()
            if self.global_rank == 0:
                replace_dir(partial, path)
            self.barrier()

    return ShardedDataParallel(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)


def replace_dir(new: Path, target: Path) -> None:
    """Move a completed checkpoint directory over the previous one, keeping the previous as `<target>.old` until
    the new one is in place (a job killed in between resumes from `.old`)."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
