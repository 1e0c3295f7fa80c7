"""Planning a conversion before writing anything: the strategy from the options, the checked inputs, every output tensor
in its shard.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dropup import families
from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.hf import LAYOUT_ALIASES, hf_output_tensors
from dropup.init.base import InitStrategy, Option
from dropup.init.registry import STRATEGIES, cli_options, normalize_options
from dropup.init.shapes import check_sources, moe_shapes
from dropup.shards import CheckpointReader, PlannedTensor
from dropup.upcycle.common import DTYPE_LABELS, DTYPES
from dropup.upcycle.inputs import Dense, _same_architecture, open_dense


def make_strategy(args: argparse.Namespace) -> InitStrategy:
    """The init strategy the options describe (each option the registry's: `cli_options`); an option that does not
    apply to it is an error, not ignored."""
    cls = STRATEGIES[args.init]
    kwargs: dict = {}
    for option, takers in cli_options():
        value = getattr(args, option_dest(option), None)
        if value is None:
            continue
        if args.init not in takers:
            raise ConfigError(f"{option.flag} applies to --init {' and '.join(takers)} only, not --init {args.init}: "
                              "drop it")
        kwargs[option.name] = value
    return cls(**kwargs)


def normalize_layout(layout: str) -> str:
    """An expert layout by its current name ("fused", stacked's older name, is read as "stacked")."""
    return LAYOUT_ALIASES.get(layout, layout)


def normalize_recorded(options: dict) -> dict:
    """Recorded conversion options in today's spelling (an index mode or layout under its older name)."""
    options = normalize_options(options.get("init"), options)
    return {**options, "layout": normalize_layout(options["layout"])} if "layout" in options else options


def option_dest(option: Option) -> str:
    """The argparse attribute of a registry option."""
    return option.flag.removeprefix("--").replace("-", "_")


@dataclass
class Shard:
    """One output file: the tensors it holds, in order, and our names of the tensors they come from."""

    file: str
    tensors: list[PlannedTensor]
    sources: set[str]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(model: ModelConfig, moe: MoEConfig, layout: str, dtype: torch.dtype, max_bytes: int) -> list[Shard]:
    """Every output tensor (our state-dict order, as HF names), cut into shards of at most `max_bytes`.

    Shapes come from the model built on the meta device, mapped by the same `hf_output_tensors` the writer uses, so the
    plan is exact before any weight exists; a tensor larger than `max_bytes` gets a shard of its own."""
    groups: list[list[tuple[PlannedTensor, str]]] = [[]]
    size = 0
    for ours, shape in moe_shapes(model, moe).items():
        for name, meta in hf_output_tensors(ours, torch.empty(shape, dtype=dtype, device="meta"), layout,
                                            model, moe).items():
            planned = PlannedTensor(name, tuple(meta.shape), dtype)
            if groups[-1] and size + planned.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append((planned, ours))
            size += planned.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", [t for t, _ in g], {o for _, o in g})
            for i, g in enumerate(groups)]


@dataclass
class Job:
    """A conversion, fully validated before anything is written."""

    strategy: InitStrategy
    inputs: list[Dense]
    readers: list[CheckpointReader]  # empty for scratch, which reads only the config
    model: ModelConfig
    moe: MoEConfig
    dtype: torch.dtype
    shards: list[Shard]
    options: dict  # everything that determines the output bytes (compared on resume)
    out: Path


def plan_job(args: argparse.Namespace) -> Job:
    """Check every input and option, and plan every output tensor; reads headers only, writes nothing."""
    strategy = make_strategy(args)
    if not strategy.reads_dense and len(args.dense) != 1:
        raise ConfigError(f"--init {args.init} reads only the architecture (config.json) of one --dense directory")
    inputs = [open_dense(p) for p in args.dense]
    model = _same_architecture(inputs)
    shared_d_ff = 0
    if args.shared_expert or args.shared_expert_d_ff is not None:
        shared_d_ff = model.d_ff if args.shared_expert_d_ff is None else args.shared_expert_d_ff
        if shared_d_ff < 1:
            raise ConfigError(f"--shared-expert-d-ff {shared_d_ff} must be a positive width")
    try:
        moe = MoEConfig(enabled=True, num_experts=args.experts, top_k=args.top_k, granularity=args.granularity,
                        shared_expert_d_ff=shared_d_ff)
        check_pair(model, moe)
        families.family(model.family).check_moe(moe)
        families.family(model.family).check_moe_window(model)
    except ConfigError as err:  # say it in the CLI's words
        message = str(err)
        for field_name, flag in (("moe.num_experts", "--experts"), ("moe.top_k", "--top-k"),
                                 ("moe.granularity", "--granularity"),
                                 ("drop the shared expert", "drop --shared-expert"), (" / model.family=qwen2", "")):
            message = message.replace(field_name, flag)
        raise ConfigError(message) from None
    readers = [d.reader() for d in inputs] if strategy.reads_dense else []
    try:
        strategy.validate(len(readers), moe)
    except ConfigError as err:
        message = str(err)
        if "dense model" in message and "virtual" not in message:
            message += " (one --dense per model)"
        for field_name, flag in (("moe.top_k", "--top-k"), ("moe.granularity", "--granularity"),
                                 ("init.virtual_groups=false", "--no-virtual-groups"),
                                 ("init.virtual_groups=true", "--virtual-groups"),
                                 ("set moe.granularity > 1 (moe=fine_grained)", "set --granularity > 1")):
            message = message.replace(field_name, flag)
        raise ConfigError(message) from None
    check_sources(readers, model)
    dtype = DTYPES.get(args.dtype) or (readers[0].meta("tok_emb.weight")[1] if readers else torch.float32)
    out = args.out.resolve()
    for d in inputs:
        if out == d.path or out.is_relative_to(d.path) or d.path.is_relative_to(out):
            raise ConfigError(f"--out {out} overlaps --dense {d.path}: write the MoE to a directory of its own")
    values = strategy.option_values()
    options = {
        "init": args.init, "ratio": strategy.ratio_value if "ratio" in values else None,
        "index_mode": values.get("index_mode"), "noise_std": values.get("std"),
        "experts": moe.num_experts, "top_k": moe.top_k, "granularity": moe.granularity,
        "shared_expert_d_ff": moe.shared_expert_d_ff, "virtual_groups": strategy.uses_virtual_groups(moe),
        "router_init": strategy.router, "seed": args.seed, "dtype": DTYPE_LABELS[dtype], "layout": args.layout,
        "shard_size": args.shard_size, "dense": [d.identity() for d in inputs],
        # only when set, so a conversion recorded before the flag existed resumes with the same options
        **({"shuffle": True} if values.get("shuffle") else {}),
    }
    return Job(strategy, inputs, readers, model, moe, dtype,
               plan_shards(model, moe, args.layout, dtype, args.shard_size), options, out)


def _layer_bytes(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> int:
    """Bytes of one layer's experts (or of the largest tensor, if bigger): the writer's memory budget."""
    shapes = moe_shapes(model, moe)
    numel = [math.prod(shape) for shape in shapes.values()]
    experts = math.prod(shapes["layers.0.ffn.w_gate_up"]) + math.prod(shapes["layers.0.ffn.w_down"])
    return max(experts, *numel) * torch.empty((), dtype=dtype).element_size()
