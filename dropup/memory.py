"""A run's memory per rank from its configs alone, and the start-of-run check that it fits.

Static: no activation is measured (`dropup.scaling` traces them, seconds of work); every term below is bytes that
a run certainly holds, so the predicted peak is a floor. A run this refuses could not have fitted; one it passes
may still not fit (activations beyond the floor, the allocator, other processes).

Notation: P parameters (`dropup.flops.param_counts`), P_root the embeddings, final norm and LM head, P_block one
block's; N ranks in all (trainer.devices x trainer.num_nodes), n = trainer.devices of them on one node; s = N
under trainer=fsdp (the states are sharded), else 1; w the compute dtype's bytes (2 under bf16-mixed, 4 under
32-true); T = micro_batch x seq_len tokens per forward; L layers, D d_model, V the vocabulary, E experts of
width F_e, F the dense width.

- **Training states**, per rank: fp32 parameters 4P/s, gradients 4P/s, AdamW's two states 8P/s. Under
  trainer=fsdp also the gathered working copies of the root and two blocks, w (P_root + 2 P_block), and one
  block's unsharded gradients with their fp32 copy under bf16, (w + 4 [bf16]) P_block (`dropup.fsdp`'s units).
- **Activations, the floor**: what any step keeps whatever the blocks compute inside, activation checkpointing
  or not: each block's input, L T D w, and the logits the loss saves plus their gradient, 2 T V w.
- **Initialization**, host, per rank. Sharded (trainer=fsdp: the model is built on the meta device and each rank
  materializes its shards, `dropup.init.producer`): the rank's fp32 shards 4P/N, plus the largest unit produced
  and what it is read from: a layer's stacked experts, of which a rank builds only its block (w_gate_up and
  w_down, 4 * 3 E D F_e / N) one expert at a time (4 * 3 D F_e), with the dense FFN matrices they come from,
  4 * 3 D F per dense source; or the embedding, whole (4 V D, and its dense source, 4 V D). Not sharded (a
  single process builds on the meta device too): the whole fp32 model, 4P (the initial state is not kept beside
  it), plus the unit, a layer's experts whole (4 * 3 E D F_e).

Where it lives: on a GPU the device holds the training states and activations, the host the initialization; on a
CPU the host holds both (the larger of the two moments). The host is shared by the node's n ranks, so host
memory is compared per node: n x the rank's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from dropup.config import ModelConfig, MoEConfig
from dropup.flops import param_counts

GIB = 2**30


def parameter_split(model: ModelConfig, moe: MoEConfig | None) -> dict[str, int]:
    """Total parameters, the root unit's (embeddings, final norm, LM head), one block's, and the routed experts'."""
    total = param_counts(model, moe)["total_params"]
    root = (1 if model.tie_embeddings else 2) * model.vocab_size * model.d_model + model.d_model
    block = (total - root) // model.n_layers
    experts = 0
    if moe is not None and moe.enabled:
        experts = model.n_layers * moe.num_experts * 3 * model.d_model * moe.expert_d_ff(model)
    head = 0 if model.tie_embeddings else model.vocab_size * model.d_model
    return {"total": total, "root": root, "block": block, "experts": experts, "lm_head": head}


def init_host_memory(model: ModelConfig, moe: MoEConfig | None, ranks: int, sharded: bool = True,
                     dense_sources: int = 1) -> dict[str, float]:
    """Host bytes one rank holds while its model is initialized (the module docstring's model): `params` (its
    fp32 shards, or the whole model unsharded), `full_tensor` (the largest unit produced whole), `dense_buffer`
    (what that unit is read from) and their `total`."""
    if ranks < 1:
        raise ValueError(f"ranks={ranks}: need at least one")
    P = param_counts(model, moe)["total_params"]
    D, V = model.d_model, model.vocab_size
    embedding = (4 * V * D, 4 * V * D if dense_sources else 0)
    if moe is not None and moe.enabled:
        layer, expert = 4 * 3 * moe.num_experts * D * moe.expert_d_ff(model), 4 * 3 * D * moe.expert_d_ff(model)
        experts = (layer / ranks + expert if sharded else layer, 4 * 3 * D * model.d_ff * dense_sources)
    else:
        experts = (4 * 3 * D * model.d_ff, 4 * 3 * D * model.d_ff if dense_sources else 0)
    full, buffer = max(embedding, experts, key=sum)
    params = 4 * P / ranks if sharded else 4 * P
    return {"params": params, "full_tensor": full, "dense_buffer": buffer, "total": params + full + buffer}


@dataclass(frozen=True)
class RunShape:
    """How a run is laid out, as far as memory goes (`RunShape.of` reads it off the trainer config and the
    resolved training settings)."""

    ranks: int = 1  # data-parallel ranks in all
    ranks_per_node: int = 1
    sharded: bool = False  # trainer=fsdp
    on_gpu: bool = False
    precision: str = "32-true"
    micro_batch: int = 1  # sequences per forward/backward on a rank
    seq_len: int = 2048
    rank_batch: int = 1  # sequences per optimizer step on a rank (micro_batch divides it)
    dense_sources: int = 1  # dense models the init reads (0: none, e.g. init=scratch)

    @classmethod
    def of(cls, trainer: Mapping, settings: Mapping, dense_sources: int = 1) -> "RunShape":
        devices, nodes = int(trainer.get("devices", 1)), int(trainer.get("num_nodes", 1))
        accelerator = str(trainer.get("accelerator", "cpu"))
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda_available())
        ranks = devices * nodes
        return cls(ranks=ranks, ranks_per_node=devices, sharded=trainer.get("strategy") == "fsdp", on_gpu=on_gpu,
                   precision=str(trainer.get("precision", "32-true")), micro_batch=int(settings["micro_batch_size"]),
                   seq_len=int(settings["seq_len"]), rank_batch=int(settings["batch_size"]) // ranks,
                   dense_sources=dense_sources)


def _cuda_available() -> bool:
    import torch  # only asked for accelerator=auto

    return torch.cuda.is_available()


def _compute_bytes(precision: str) -> int:
    return 2 if "16" in precision else 4


def predict(model: ModelConfig, moe: MoEConfig | None, run: RunShape) -> dict:
    """Per-rank bytes (the module docstring's terms): `states`, `activations`, `init_host`; the peak of the
    device (None on a CPU) and of the host, per rank and per node."""
    split = parameter_split(model, moe)
    P, s, w = split["total"], run.ranks if run.sharded else 1, _compute_bytes(run.precision)
    states = {"params": 4 * P / s, "grads": 4 * P / s, "optimizer": 8 * P / s}
    if run.sharded:
        states["working_copies"] = w * (split["root"] + 2 * split["block"])
        states["block_grads"] = (w + (4 if w == 2 else 0)) * split["block"]
    tokens = run.micro_batch * run.seq_len
    activations = {"block_inputs": model.n_layers * tokens * model.d_model * w,
                   "logits_and_grad": 2 * tokens * model.vocab_size * w}
    init = init_host_memory(model, moe, run.ranks, run.sharded, run.dense_sources)
    training = sum(states.values()) + sum(activations.values())
    host = init["total"] if run.on_gpu else max(init["total"], training)
    return {"states": states, "activations": activations, "init_host": init,
            "device_peak": training if run.on_gpu else None, "host_peak": host,
            "host_peak_per_node": host * run.ranks_per_node}


@dataclass(frozen=True)
class Available:
    """Free bytes: the host's (for the whole node) and one GPU's; None where unknown."""

    host: int | None = None
    device: int | None = None


def available_memory(on_gpu: bool) -> Available:
    """The host's MemAvailable (/proc/meminfo) and, on a GPU, this rank's device's free memory."""
    host = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    device = None
    if on_gpu:
        import torch  # the CUDA query only on a GPU run

        if torch.cuda.is_available():
            device = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))[0]
    return Available(host, device)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits(model: ModelConfig, moe: MoEConfig | None, run: RunShape, available: Available) -> str | None:
    """None when the predicted floor fits what is available, else one line: what does not fit, by how much, and
    the setting to change (`_fix`)."""
    p = predict(model, moe, run)
    if run.on_gpu and available.device is not None and p["device_peak"] > available.device:
        what = (f"predicted peak GPU memory {_gib(p['device_peak'])} per rank (training states "
                f"{_gib(sum(p['states'].values()))}, activations at least {_gib(sum(p['activations'].values()))}) "
                f"exceeds the {_gib(available.device)} free on the GPU")
        return f"{what}: {_fix(model, moe, run, available.device, 'device_peak')}"
    if available.host is not None and p["host_peak_per_node"] > available.host:
        moment = "initialization" if run.on_gpu or p["init_host"]["total"] >= p["host_peak"] else "training"
        what = (f"predicted peak host memory {_gib(p['host_peak_per_node'])} at {moment} ({run.ranks_per_node} "
                f"rank(s) on this node x {_gib(p['host_peak'])}) exceeds the {_gib(available.host)} available")
        return f"{what}: {_fix(model, moe, run, available.host, 'host_peak_per_node')}"
    return None


def _fix(model: ModelConfig, moe: MoEConfig | None, run: RunShape, capacity: float, peak: str) -> str:
    """The first change, in this order, whose predicted `peak` fits `capacity`: shard (trainer=fsdp); a smaller
    train.micro_batch_size (a divisor of the rank's batch); more GPUs (the device) or more nodes with as many
    ranks each (the host, which the node's ranks share)."""
    def fits(**changes) -> bool:
        return predict(model, moe, replace(run, **changes))[peak] <= capacity

    shard = "" if run.sharded else "trainer=fsdp and "
    if not run.sharded and fits(sharded=True):
        return f"set trainer=fsdp (it shards the training states and the initial weights over the {run.ranks} ranks)"
    divisors = [m for m in range(run.micro_batch - 1, 0, -1) if run.rank_batch % m == 0]
    for micro in divisors:
        if fits(sharded=True, micro_batch=micro):
            return f"set {shard}train.micro_batch_size={micro}"
    micro = divisors[-1] if divisors else run.micro_batch
    step = 1 if peak == "device_peak" else run.ranks_per_node  # the host: whole nodes of ranks_per_node ranks
    low, high = run.ranks, run.ranks + step
    while not fits(sharded=True, micro_batch=micro, ranks=high):
        if high > 1 << 20:
            return "no rank count fits it: a smaller model (model.*) or a machine with more memory"
        low, high = high, high * 2 - high % step
    while high - low > step:  # the fewest: bisect over multiples of `step`
        mid = (low + high) // 2 // step * step
        low, high = (low, mid) if fits(sharded=True, micro_batch=micro, ranks=mid) else (mid, high)
    also = f" with train.micro_batch_size={micro}" if micro != run.micro_batch else ""
    if peak == "device_peak":
        return f"{'set trainer=fsdp and ' if shard else ''}use at least {high} GPUs in all (trainer.devices x " \
            f"trainer.num_nodes){also}"
    return f"set {shard}trainer.num_nodes={high // run.ranks_per_node} ({run.ranks_per_node} rank(s) per node){also}"


__all__ = ["Available", "GIB", "RunShape", "available_memory", "check_fits", "init_host_memory", "parameter_split",
           "predict"]
