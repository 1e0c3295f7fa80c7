"""Initial weights one tensor at a time, for a model that holds only its shard of each (`trainer=fsdp`).

An `InitialWeights` yields the full tensor of each name of a model's state dict, one at a time, in state-dict
order, computed by the same code as the whole state dict: `dropup.init.streaming.moe_tensors` for an MoE built by
a strategy, `dropup.init.scratch.scratch_tensor` for a dense model from scratch, the checkpoint's own tensors for
`init=pretrained`. The same code on the same inputs gives the same bits, so a rank's slice equals the same slice
of the single-process init whatever the number of ranks (random draws come from one generator per (seed, layer,
expert, tensor): a rank draws the whole tensor and keeps its slice).

The dense models are read lazily (`shards.CheckpointReader`): a run's `model.safetensors` (`run_reader`) or a
Hugging Face directory through its index and its family's tensor mapping (`hf_reader`; a part of a fused tensor
is read by its rows). In memory at a time: the tensor being produced, and what it is made of -- for a layer's
stacked experts, the rank's blocks of them, one expert computed whole, and the sources' FFN matrices of that layer.

`materialize` writes a stream into a module whose parameters are still on the meta device (FSDP2's DTensors or
plain tensors): each rank keeps the slice its DTensor says (FSDP2 shards along one dimension, padding uneven
shards; the offsets are the DTensor's own), then frees the full tensor. A layer's stacked experts are built as the
rank's block only (`moe_tensors`' `regions`), one expert at a time.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dropup import families
from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.init.base import InitStrategy
from dropup.init.scratch import scratch_tensor
from dropup.init.shapes import check_sources, dense_shapes, moe_shapes
from dropup.init.streaming import moe_tensors
from dropup.shards import CheckpointReader, scan, scan_hf_dir
from dropup.tensors import is_sharded

Region = tuple[slice, ...]  # the block of a tensor a rank holds
Stream = Callable[[Collection[str], Mapping[str, Region]], Iterator[tuple[str, torch.Tensor]]]
ROUTING_BIAS = "ffn.expert_bias"  # aux_free's routing bias: state, not weights; zero where a checkpoint has none


class InitialWeights:
    """A model's starting state as a stream: `shapes` (name -> shape, in state-dict order) and `tensors(names)`,
    which yields (name, full tensor) for those names, in that order, one at a time. `regions` (name -> block)
    allows a stream to yield just that block of a tensor instead (the stacked experts: it then never holds one
    whole), or still the whole tensor."""

    def __init__(self, shapes: Mapping[str, torch.Size], stream: Stream, what: str):
        self.shapes, self._stream, self.what = dict(shapes), stream, what

    def tensors(self, names: Collection[str] | None = None,
                regions: Mapping[str, Region] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        return self._stream(self.shapes.keys() if names is None else names, regions or {})

    def state(self) -> dict[str, torch.Tensor]:
        """The whole state dict (tests and small models only: this holds every tensor at once)."""
        return dict(self.tensors())

    def __repr__(self) -> str:
        return f"InitialWeights({self.what}, {len(self.shapes)} tensors)"


def built(strategy: InitStrategy, sources: Sequence[Mapping[str, torch.Tensor]], model: ModelConfig,
          moe: MoEConfig, seed: int) -> InitialWeights:
    """The MoE `strategy` builds from `sources` (lazy readers), as `moe_tensors` computes it. The sources are
    checked against the config here, from their headers, before any tensor is read."""
    check_pair(model, moe)
    if not moe.enabled:
        raise ConfigError(f"init={strategy.name} builds an MoE: set moe=mixtral (or another MoE preset), not moe=none")
    strategy.validate(len(sources), moe)
    check_sources(sources, model)

    def stream(names, regions):
        return moe_tensors(strategy, sources, model, moe, seed, names=set(names), regions=regions)

    return InitialWeights(moe_shapes(model, moe), stream, f"init={strategy.name}")


def dense_scratch(model: ModelConfig, seed: int) -> InitialWeights:
    """A dense model from scratch (`dropup.init.scratch.dense_state`, tensor by tensor)."""
    shapes = dense_shapes(model)

    def stream(names, regions):
        return ((name, scratch_tensor(name, shapes[name], model.init_std, seed)) for name in shapes if name in names)

    return InitialWeights(shapes, stream, "dense from scratch")


def pretrained(reader: Mapping[str, torch.Tensor], model: ModelConfig, moe: MoEConfig | None,
               where: str) -> InitialWeights:
    """A checkpoint's own tensors (init=pretrained), as `Transformer.complete_state` makes them fit: a routing
    bias the checkpoint lacks starts at zero, one this model does not route with is dropped (a warning if it is
    not zero). Every other tensor must be there with this config's shape: a checkpoint of another model is one
    error, before any tensor is read."""
    shapes = moe_shapes(model, moe) if moe is not None and moe.enabled else dense_shapes(model)
    meta = getattr(reader, "meta", None)
    for name, shape in shapes.items():
        if name not in reader:
            if name.endswith(ROUTING_BIAS):
                continue
            raise ConfigError(f"{where} lacks tensor {name!r}: it is a checkpoint of another model than this config "
                              "(model=, moe=); pass the config it was trained with")
        found = tuple(meta(name)[0]) if meta is not None else tuple(reader[name].shape)
        if found != tuple(shape):
            raise ConfigError(f"{where}: tensor {name} has shape {found} but this config expects {tuple(shape)}: it "
                              "is a checkpoint of another model; pass the config it was trained with")
    extra = [name for name in reader if name not in shapes]
    stray = [name for name in extra if not name.endswith(ROUTING_BIAS)]
    if stray:
        raise ConfigError(f"{where} holds tensor {stray[0]!r}, which this config's model has not: it is a "
                          "checkpoint of another model; pass the config it was trained with")

    def stream(names, regions):
        for name in extra:  # read once, small: one number per expert
            if bool(reader[name].any()):
                logging.getLogger(__name__).warning(
                    "the starting weights carry aux_free routing biases (%s, ...) that this model does not use: it "
                    "routes without them", name)
                break
        for name in shapes:
            if name in names:
                yield name, reader[name] if name in reader else torch.zeros(shapes[name])

    return InitialWeights(shapes, stream, f"init=pretrained from {where}")


# --- lazy readers of the dense models --------------------------------------------------------------------------

def run_reader(run_dir: Path) -> CheckpointReader:
    """A dropup run's `model.safetensors` (our names), read tensor by tensor; a missing or truncated file is one
    error here (its header is checked against its size)."""
    path = Path(run_dir) / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no model.safetensors: it is not a completed dropup run")
    return CheckpointReader(scan([path]))


def hf_reader(hf_dir: Path, model: ModelConfig) -> CheckpointReader:
    """An HF directory's tensors under our names, through its index (`scan_hf_dir`: a shard the index names must
    exist and be complete) and its family's mapping (a fused tensor's parts are row ranges of it). With tied
    embeddings a stored `lm_head.weight` must equal the input embedding and is dropped (as `dropup.hf.from_hf`)."""
    stored = scan_hf_dir(Path(hf_dir))
    if model.tie_embeddings and "lm_head.weight" in stored:
        head = CheckpointReader({n: stored[n] for n in ("lm_head.weight", "model.embed_tokens.weight") if n in stored})
        if "model.embed_tokens.weight" in head and not torch.equal(head["model.embed_tokens.weight"],
                                                                   head["lm_head.weight"]):
            raise ConfigError("tie_word_embeddings=true but lm_head.weight differs from the input embedding")
        stored = {k: v for k, v in stored.items() if k != "lm_head.weight"}
    return CheckpointReader(families.family(model.family).mapper("any").sources(stored, dense_shapes(model)))


# --- writing a stream into a module's (local) tensors ----------------------------------------------------------

class _SkipMetaInit(TorchFunctionMode):
    """Initializers called on a meta tensor return it untouched: it has no values to draw, and drawing none would
    still load torch's Python reference kernels (seconds of imports in a process that never needed them)."""

    INITS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
             *(getattr(nn.init, f) for f in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                                            "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "constant_",
                                            "ones_", "zeros_"))}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func in self.INITS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextmanager
def on_meta():
    """Build modules on the meta device (shapes only, no storage, no initialization); `materialize` fills them."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def local_region(target: torch.Tensor) -> Region | None:
    """The block of its tensor that `target` holds here: for a DTensor its local shard (the shape and offset its
    placements give on its mesh, FSDP2's padding of uneven shards included), else None (all of it)."""
    if not is_sharded(target):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(slice(start, start + size) for size, start in zip(shape, offset))


def local_slice(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The part of `full` that `target` holds here (`local_region`)."""
    region = local_region(target)
    return full if region is None else full[region]


@torch.no_grad()
def materialize(module: nn.Module, weights: InitialWeights | None, device: torch.device | str) -> None:
    """Allocate `module`'s tensors on `device` (only the local shards of sharded ones: `to_empty`) and write
    `weights` into them tensor by tensor; buffers outside the state dict (counters) start at zero, and so does
    everything for `weights` None (a resumed run, whose checkpoint then overwrites them). Afterwards nothing is
    left on the meta device, so nothing else (Lightning's `reset_parameters` pass) re-initializes it."""
    state_names = list(module.state_dict(keep_vars=True).keys())
    if weights is None:
        module.to_empty(device=device)
        for target in (*module.parameters(), *module.buffers()):
            (target.to_local() if is_sharded(target) else target).zero_()
        return
    if set(state_names) != set(weights.shapes):
        missing = sorted(set(state_names) - set(weights.shapes)) or sorted(set(weights.shapes) - set(state_names))
        raise ConfigError(f"{weights.what} does not fit the model: {missing[0]} is in one and not the other")
    module.to_empty(device=device)
    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    regions = {name: region for name, target in targets.items() if (region := local_region(target)) is not None}
    for name, full in weights.tensors(state_names, regions):
        target = targets.pop(name)
        local = target.to_local() if is_sharded(target) else target
        if tuple(full.shape) == tuple(target.shape):
            local.copy_(local_slice(full, target))
        elif name in regions and tuple(full.shape) == tuple(local.shape):  # the stream built just this block
            local.copy_(full)
        else:
            raise ConfigError(f"{weights.what}: tensor {name} has shape {tuple(full.shape)}, the model "
                              f"{tuple(target.shape)}")
        del full
    for name, target in targets.items():
        if name in weights.shapes:
            raise ConfigError(f"{weights.what} yielded no tensor {name}")
        (target.to_local() if is_sharded(target) else target).zero_()


def materialize_on_every_rank(model: nn.Module, weights: InitialWeights | None, device: torch.device,
                              group=None) -> None:
    """`materialize`, then agree over the ranks (of `group`, default all): a rank that failed (a file unreadable
    there, ...) raises its error, and every other rank raises one naming that rank and its error, so none waits in
    the first collective of training for a rank that is gone."""
    error = None
    try:
        materialize(model, weights, device)
    except Exception as err:  # noqa: BLE001 -- every failure must reach the other ranks
        error = err
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if error is not None:
            raise error
        return
    said: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(
        said, None if error is None else (isinstance(error, ConfigError), f"{type(error).__name__}: {error}"),
        group=group)
    if error is not None:
        raise error
    failed = [(rank, entry) for rank, entry in enumerate(said) if entry is not None]
    if failed:
        rank, (config_error, message) = failed[0]
        raise (ConfigError if config_error else RuntimeError)(f"rank {rank} could not build its shards of the "
                                                              f"initial weights: {message}")
