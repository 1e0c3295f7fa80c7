"""A computed scaling plan: memory per GPU, the largest micro-batch, communication and run time of a config
trained with FSDP2 on `gpus` GPUs, and where expert parallelism would start to pay.

    python -m dropup.scaling experiment=paper_8x3.7b gpus=64 gpu_mem_gib=80
    python -m dropup.scaling --docs            # rewrite the generated tables of docs/scaling.md (--check: compare)

Arguments are Hydra overrides of the run's config plus the scaling knobs of `KNOBS` (plain key=value, not config
keys). The output is a Markdown table and, as its last line, one JSON object (`plan()`'s dict).

The training setup modelled is `dropup/fsdp.py`'s: FSDP2 (`fully_shard`) per Block plus the root (embeddings,
final norm, LM head); N ranks, P parameters, P_root the root's, P_block one block's.
- bf16-mixed (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`): fp32 master shards 4P/N, fp32 gradient
  shards 4P/N, AdamW exp_avg and exp_avg_sq 8P/N; bf16 unsharded parameters of the root and two blocks (the one
  running and the prefetched one) while computing; during a block's backward its unsharded bf16 gradients plus
  their fp32 copy for the reduce-scatter (6 P_block). 32-true: the same in fp32 (4-byte working copies, 4 P_block
  of unsharded gradients, nothing to cast).
- Blocks reshard after forward (all-gathered in forward and again in backward, per micro-batch); the root does not
  (FSDP2's default for the root: gathered once per micro-batch, freed after its backward). Gradients are
  reduce-scattered once per micro-batch, in fp32. The root's unsharded gradients (LM head first, embeddings last)
  live until the end of the backward, where they are reduce-scattered.
- Activation checkpointing per Block (non-reentrant): a block keeps its input only, and its activations are live
  again while its backward runs.

Activations are MEASURED, not assumed: `measure_activations` runs our own `Transformer` (forward + loss) under
`torch.autograd.graph.saved_tensors_hooks` and adds up every storage autograd saves, once per storage, parameters
excluded (FSDP frees and re-gathers those). Under bf16-mixed the model is cast to bf16 and run under bf16 autocast:
FSDP2's param_dtype=bf16 hands every module bf16 parameters (norm gains and embeddings included), and Lightning's
bf16-mixed adds autocast on top; a model kept in fp32 under autocast alone would save fp32 residual streams that the
FSDP run never has. Under 32-true it runs in fp32. Full widths in bf16 are far too slow on a CPU (emulated bf16),
so widths are divided by factors s (d_model, d_ff, heads and KV heads /s; head width, experts and top-k kept) at
a small vocabulary, and:
- for each such model the saved bytes of one forward are, exactly, B*S*per_token + S*per_position + const (flash
  attention saves its output and logsumexp, nothing quadratic in S; RoPE's cast cos/sin tables are per position):
  three (B, S) points fix the three, a fourth (the tests) confirms them;
- a layer's bytes are those of a 2-layer model minus a 1-layer one; the root's (embedding indices, final norm, LM
  head input, the logits the loss saves, targets) are the 1-layer model's minus one layer;
- every per-token tensor is (tokens x a width), so each coefficient is a + b/s exactly: two factors give the
  full-width value (the tests check that two predict a third and s = 1 exactly, with Fractions);
- the root's bytes are affine in the vocabulary (the saved logits): a second vocabulary gives the slope;
- checkpointed, a run keeps what autograd saves outside the blocks plus each block's inputs (non-reentrant
  checkpointing saves the inputs of its region, nothing inside): read off the same forward passes, and checked
  in the tests against the model's own checkpointed forward (`Transformer.set_activation_checkpointing`).
Sliding windows are measured without the window (the GPU kernels keep out + logsumexp either way).

Not measured, stated: the loss's gradient of the logits (T x V in the compute dtype, what ChunkedCrossEntropy's
backward writes) and its chunk workspace (512 rows x V in fp32 plus a compute-dtype copy), and, while one block's
backward runs, a workspace of that block's saved bytes again for the activation gradients in flight (an
assumption: each saved activation's gradient has at most its shape, and autograd frees them as it goes). The peak
is the largest of four moments: the loss's backward (all activations + logits gradient), a block's backward
(activations less the logits, the block's recomputed activations when checkpointing, its workspace and
gradients, the LM head's gradient), the root's reduce-scatter at the end of the backward, and the optimizer step
(torch's foreach AdamW holds one fp32 temporary of the shard, sqrt(exp_avg_sq)). Capacity is gpu_mem_gib less
reserve_gib (CUDA context, NCCL buffers, allocator fragmentation).

Communication per GPU per step (ring collectives, bytes each GPU sends): per micro-batch the blocks are gathered
twice and the root once in the parameter dtype, and all gradients reduce-scattered in fp32:
    n_micro * (N-1)/N * (w * (P_root + 2 * P_blocks) + 4 * P),       w = 2 (bf16-mixed) or 4 (32-true).
Time: within a node (N <= gpus_per_node) at nvlink_gbps; across nodes NCCL's rings run one per NIC (rail-aligned),
so each GPU sends 1/gpus_per_node of its ring traffic over its NIC at internode_gbps and the rest over NVLink, at
the same time: t = max((1 - f) * V / nvlink, f * V / internode), f = 1/gpus_per_node (0 inside one node).
Bandwidths are per direction peak rates: no latency, no congestion, so this is a lower bound.

Compute per step per GPU: `dropup.flops.train_flops` of its B*S/N tokens (3x the Table 3 forward), plus the blocks'
forward again when checkpointing (the recomputation: the forward less embeddings and logits), divided by
mfu * peak_tflops, or, where `tokens_per_s` is given (the tokens/s one GPU reached on this model without
checkpointing), the tokens over that rate (scaled by the recomputation). Step = max(compute, communication)
(overlapped) and the sum (not overlapped); run = train.tokens / (B*S) steps.

Expert parallelism (EP, degree e = min(N, E)) would instead keep experts in place and move tokens: per MoE layer and
micro-batch of T_mb = m*S tokens, dispatch and combine in the forward and their gradients in the backward (a = 4
all-to-alls; 6 with checkpointing, whose recomputed forward repeats both), each carrying k copies of d_model per
token in the parameter dtype, of which (e-1)/e leave the GPU under even routing. FSDP moves, per micro-batch, the
routed experts' P_exp = L*E*3*D*F parameters gathered twice (w bytes) and reduce-scattered (4 bytes):
    EP bytes / step   = n_micro * a * L * T_mb * k * D * w * (e-1)/e
    FSDP bytes / step = n_micro * P_exp * (2w + 4) * (N-1)/N
so EP moves fewer bytes when T_mb < T* = 3 E F (2w + 4) / (a k w) * [(N-1)/N] / [(e-1)/e]; with bf16-mixed
(2w+4 = 8 = a*w without checkpointing) T* = 3 E F / k. T_mb = min(m, B/N) * S shrinks once a GPU's share of the
batch, B/N sequences, falls below the micro-batch that fits: `ep_pays_from_gpus` is the smallest N (dividing B)
with T_mb < T*. A byte count only: EP also changes memory (experts not sharded over all N).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.flops import forward_flops_per_sequence, human_count, param_counts, train_flops
from dropup.stages import compose

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "scaling.md"
GIB = 2**30
CE_CHUNK_ROWS = 512  # dropup.model.ChunkedCrossEntropy.CHUNK_ROWS (checked by the tests)

# The scaling knobs: name -> (type, default, meaning). Not config keys: split off argv before composing.
KNOBS: dict[str, tuple[type, Any, str]] = {
    "gpus": (int, 8, "GPUs (FSDP ranks)"),
    "gpu_mem_gib": (float, 80.0, "memory of one GPU, GiB"),
    "reserve_gib": (float, 4.0, "per GPU, kept free for the CUDA context, NCCL buffers and fragmentation"),
    "micro_batch": (int, None, "sequences per forward/backward (default: train.micro_batch_size, else the best fit)"),
    "checkpointing": (str, "auto", "activation checkpointing: auto (the faster plan that fits) | true | false"),
    "tokens_per_s": (float, None, "measured tokens/s of one GPU on this model (default: from mfu and peak_tflops)"),
    "mfu": (float, 0.35, "assumed model FLOPs utilization, when tokens_per_s is not given"),
    "peak_tflops": (float, 989.0, "dense bf16 peak of one GPU, TFLOP/s (H100/H200 SXM: 989)"),
    "nvlink_gbps": (float, 450.0, "intra-node bandwidth per GPU and direction, GB/s (NVLink 4: 450)"),
    "internode_gbps": (float, 50.0, "inter-node bandwidth per GPU and direction, GB/s (one 400 Gb/s NIC: 50)"),
    "gpus_per_node": (int, 8, "GPUs per node"),
}
PRECISIONS = {"bf16-mixed": "bf16", "bf16": "bf16", "32-true": "fp32", "32": "fp32"}

DOC_PRESETS = ("paper_8x152m", "paper_8x1.5b", "paper_8x3.7b")
DOC_GPUS = (8, 16, 32, 64, 128, 256)
DOC_MEM_GIB = (80, 141)
BEGIN, END = "<!-- scaling:begin (generated by `python -m dropup.scaling --docs`) -->", "<!-- scaling:end -->"


# --- measured activations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Affine:
    """Bytes of a forward pass as B*S*per_token + S*per_position + const (exact rationals)."""

    per_token: Fraction
    per_position: Fraction
    const: Fraction

    def __call__(self, batch: int, seq_len: int) -> Fraction:
        return batch * seq_len * self.per_token + seq_len * self.per_position + self.const

    def combine(self, other: "Affine", f) -> "Affine":
        return Affine(*(f(a, b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


SAMPLE_POINTS = ((1, 8), (2, 8), (1, 16))  # (batch, seq_len) of the measured forwards: fixes the three coefficients


@dataclass(frozen=True)
class ActivationProfile:
    """What autograd keeps per layer and for the root, without and with per-block checkpointing."""

    layer: Affine
    layer_checkpointed: Affine
    root: Affine
    root_checkpointed: Affine  # the root's, plus what the checkpointed blocks share (RoPE tables)
    n_layers: int
    itemsize: int  # the compute dtype's bytes

    def kept(self, batch: int, seq_len: int, checkpointing: bool) -> int:
        layer, root = (self.layer_checkpointed, self.root_checkpointed) if checkpointing else (self.layer, self.root)
        return int(self.n_layers * layer(batch, seq_len) + root(batch, seq_len))


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, precision: str):
    """Our Transformer in the compute dtype of `precision` ("bf16" or "fp32"), built on the meta device and filled
    in place: the saved bytes do not depend on the values, so only the embeddings and routers are random (fixed
    seed: tokens spread over the experts as in training), every other weight 0.02 (random fills cost seconds)."""
    import torch

    from dropup.model import Transformer

    dtype = torch.bfloat16 if _precision(precision) == "bf16" else torch.float32
    with torch.device("meta"):
        model = Transformer(model_cfg, moe_cfg).to(dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("tok_emb.weight", "router.weight")):
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(0.02)
    for name, buffer in model.named_buffers():
        buffer.zero_()
    return model


def _forward_saving(model, batch: int, seq_len: int, pack) -> None:
    """One forward pass + loss of `model` on `batch` x `seq_len` random tokens (fixed seed) with `pack` as the
    saved-tensor hook. A bf16 model runs under bf16 autocast (Lightning's bf16-mixed over FSDP2's bf16 parameters)."""
    import torch

    bf16 = next(model.parameters()).dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(batch * 1000 + seq_len)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()  # storages of their own, as in training
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.losses(model(inputs), targets)["loss"]
    del loss


def _storage(t) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_bytes(model, batch: int, seq_len: int, checkpointing: bool = False) -> int:
    """Bytes autograd saves in one forward pass + loss of `model` (a `build_model`): each storage once, parameters
    excluded; with `checkpointing`, through the model's own per-block activation checkpointing."""
    model.set_activation_checkpointing(checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr not in params:
            storages[ptr] = nbytes
        return t

    _forward_saving(model, batch, seq_len, pack)
    return sum(storages.values())


def saved_bytes_both(model, batch: int, seq_len: int) -> tuple[int, int]:
    """(saved bytes, bytes a per-block checkpointed run keeps) from one forward without checkpointing: the second
    is what autograd saves outside the blocks plus each block's tensor inputs, which is what non-reentrant
    checkpointing keeps (it saves the inputs of the region it wraps and nothing inside it). The tests check it
    against `saved_bytes(..., checkpointing=True)` byte for byte."""
    model.set_activation_checkpointing(False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, outside, inputs, depth = {}, {}, {}, [0]
    alive = []  # the block inputs, held as a checkpoint holds them (else their memory is reused and addresses clash)

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr not in params:
            (inside if depth[0] else outside)[ptr] = nbytes
        return t

    def enter(module, args):
        if not depth[0]:
            for arg in args:
                if hasattr(arg, "untyped_storage"):
                    alive.append(arg)
                    ptr, nbytes = _storage(arg)
                    inputs[ptr] = nbytes
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    handles = [h for block in model.layers for h in (block.register_forward_pre_hook(enter),
                                                      block.register_forward_hook(leave))]
    try:
        _forward_saving(model, batch, seq_len, pack)
    finally:
        for handle in handles:
            handle.remove()
    return sum({**inside, **outside}.values()), sum({**outside, **inputs}.values())


def fit_affine(model, points=SAMPLE_POINTS) -> tuple[Affine, Affine]:
    """B*S*per_token + S*per_position + const through three measured (B, S) points, without and with per-block
    checkpointing."""
    (b1, s1), (b2, _), (_, s3) = points
    measured = [saved_bytes_both(model, b, s) for b, s in points]

    def fit(m):
        per_token = Fraction(m[1] - m[0], (b2 - b1) * s1)
        per_position = Fraction(m[2] - m[0], s3 - s1) - b1 * per_token
        return Affine(per_token, per_position, m[0] - b1 * s1 * per_token - s1 * per_position)

    return fit([m[0] for m in measured]), fit([m[1] for m in measured])


def scale_factors(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, largest: int = 8) -> tuple[int, ...]:
    """Two width divisors (largest first, at most `largest`) that keep every width whole, or (1,) where none is."""
    widths = [model_cfg.d_model, model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.d_ff]
    if model_cfg.head_dim is None:
        widths.append(model_cfg.d_model // model_cfg.n_heads * model_cfg.n_heads)
    if moe_cfg is not None:
        widths += [model_cfg.d_ff // moe_cfg.granularity] + ([moe_cfg.shared_expert_d_ff]
                                                             if moe_cfg.shared_expert_d_ff else [])
    g = functools.reduce(math.gcd, widths)
    divisors = [d for d in range(min(g, largest), 0, -1) if g % d == 0]
    return tuple(divisors[:2]) if len(divisors) > 1 else (1,)


def scaled(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, s: int, vocab: int, n_layers: int):
    """The model with widths / s, `vocab` tokens and `n_layers` layers (no sliding window)."""
    model = dataclasses.replace(model_cfg, d_model=model_cfg.d_model // s, d_ff=model_cfg.d_ff // s,
                                n_heads=model_cfg.n_heads // s, n_kv_heads=model_cfg.n_kv_heads // s,
                                vocab_size=vocab, n_layers=n_layers, sliding_window=None)
    if moe_cfg is None:
        return model, None
    moe = dataclasses.replace(moe_cfg, shared_expert_d_ff=moe_cfg.shared_expert_d_ff // s,
                              backend="grouped" if moe_cfg.backend == "megablocks" else moe_cfg.backend)
    return model, moe


MEASURE_VOCABS = (128, 256)


def profile_at(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, precision: str, s: int,
               vocab: int) -> dict[bool, tuple[Affine, Affine]]:
    """Without and with checkpointing: (layer, root) bytes measured on the model scaled by `s` with `vocab` tokens
    (a 2-layer model minus a 1-layer one, and the 1-layer one minus that layer)."""
    one = fit_affine(build_model(*scaled(model_cfg, moe_cfg, s, vocab, 1), precision))
    two = fit_affine(build_model(*scaled(model_cfg, moe_cfg, s, vocab, 2), precision))
    out = {}
    for ckpt in (False, True):
        layer = two[ckpt].combine(one[ckpt], lambda a, b: a - b)
        out[ckpt] = layer, one[ckpt].combine(layer, lambda a, b: a - b)
    return out


def extrapolate(values: dict[int, Affine], to: int = 1) -> Affine:
    """Each coefficient as a + b/s through the two measured factors, evaluated at s = `to`."""
    if len(values) == 1:
        return next(iter(values.values()))
    (s1, v1), (s2, v2) = values.items()

    def at(c1, c2):
        b = (c1 - c2) / (Fraction(1, s1) - Fraction(1, s2))
        return c1 - b / s1 + b / to

    return v1.combine(v2, at)


_PROFILES: dict[tuple, ActivationProfile] = {}


def _measure(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, precision: str) -> ActivationProfile:
    factors = scale_factors(model_cfg, moe_cfg)
    v1, v2 = MEASURE_VOCABS
    layers, roots, layers_ckpt, roots_ckpt = {}, {}, {}, {}
    for s in factors:
        both = profile_at(model_cfg, moe_cfg, precision, s, v1)
        (layers[s], roots[s]), (layers_ckpt[s], roots_ckpt[s]) = both[False], both[True]
    # the root at a second vocabulary: a 1-layer model less the layer (which does not depend on the vocabulary)
    one_v2, _ = fit_affine(build_model(*scaled(model_cfg, moe_cfg, factors[0], v2, 1), precision))
    root_v2 = one_v2.combine(layers[factors[0]], lambda a, b: a - b)
    slope = root_v2.combine(roots[factors[0]], lambda a, b: (a - b) / (v2 - v1))

    def full_vocab(values):
        return extrapolate(values).combine(slope, lambda a, b: a + b * (model_cfg.vocab_size - v1))

    return ActivationProfile(extrapolate(layers), extrapolate(layers_ckpt), full_vocab(roots), full_vocab(roots_ckpt),
                             model_cfg.n_layers, compute_bytes(precision))


def measure_activations(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, precision: str = "bf16-mixed"):
    """The model's `ActivationProfile`, measured (cached per architecture and precision within a process; it does
    not depend on the sequence length)."""
    check_pair(model_cfg, moe_cfg)
    moe_cfg = moe_cfg if moe_cfg is not None and moe_cfg.enabled else None
    kind = _precision(precision)
    key = (json.dumps(dataclasses.asdict(model_cfg), sort_keys=True),
           json.dumps(dataclasses.asdict(moe_cfg) if moe_cfg else None, sort_keys=True), kind)
    if key not in _PROFILES:
        _PROFILES[key] = _measure(model_cfg, moe_cfg, kind)
    return _PROFILES[key]


def _precision(precision: str) -> str:
    if precision in ("bf16", "fp32"):
        return precision
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not modelled; use bf16-mixed or 32-true")
    return PRECISIONS[precision]


def compute_bytes(precision: str) -> int:
    """Bytes of the compute (and gathered parameter) dtype: bf16 under bf16-mixed, fp32 under 32-true."""
    return 2 if _precision(precision) == "bf16" else 4


# --- memory ----------------------------------------------------------------------------------------------------------

def parameter_split(model_cfg: ModelConfig, moe_cfg: MoEConfig | None) -> dict[str, int]:
    """Total parameters, the root unit's (embeddings, final norm, LM head), one block's, and the routed experts'."""
    total = param_counts(model_cfg, moe_cfg)["total_params"]
    root = (1 if model_cfg.tie_embeddings else 2) * model_cfg.vocab_size * model_cfg.d_model + model_cfg.d_model
    block = (total - root) // model_cfg.n_layers
    experts = 0
    if moe_cfg is not None and moe_cfg.enabled:
        experts = model_cfg.n_layers * moe_cfg.num_experts * 3 * model_cfg.d_model * moe_cfg.expert_d_ff(model_cfg)
    head = 0 if model_cfg.tie_embeddings else model_cfg.vocab_size * model_cfg.d_model
    return {"total": total, "root": root, "block": block, "experts": experts, "lm_head": head}


def predict_memory(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, *, gpus: int, micro_batch: int, seq_len: int,
                   checkpointing: bool, precision: str = "bf16-mixed", optimizer: str = "adamw",
                   profile: ActivationProfile | None = None) -> dict:
    """Bytes per GPU of one FSDP2 training step (see the module docstring): the components, each moment's total,
    and the peak with its breakdown into params / grads / optimizer / activations (which sum to it)."""
    if optimizer != "adamw":
        raise ConfigError(f"optimizer={optimizer!r} is not modelled; only adamw (what the runs use)")
    if gpus < 1 or micro_batch < 0 or seq_len < 1:
        raise ConfigError(f"gpus={gpus}, micro_batch={micro_batch}, seq_len={seq_len}: need gpus >= 1, "
                          "micro_batch >= 0, seq_len >= 1")
    kind = _precision(precision)
    profile = profile or measure_activations(model_cfg, moe_cfg, kind)
    split = parameter_split(model_cfg, moe_cfg)
    P, N = split["total"], gpus
    w = compute_bytes(kind)
    grad_copy = 4 if kind == "bf16" else 0  # the fp32 copy of unsharded bf16 gradients for the reduce-scatter
    tokens = micro_batch * seq_len
    c = {
        "params_sharded": 4 * P / N,  # fp32 master (or fp32 parameter) shards
        "grads_sharded": 4 * P / N,
        "optimizer_states": 8 * P / N,  # AdamW exp_avg, exp_avg_sq
        "params_unsharded": w * (split["root"] + 2 * split["block"]),
        "activations": profile.kept(micro_batch, seq_len, checkpointing),
        "logits_grad": tokens * model_cfg.vocab_size * w,
        "loss_workspace": min(CE_CHUNK_ROWS, tokens) * model_cfg.vocab_size * (4 + w),
    }
    layer_full = int(profile.layer(micro_batch, seq_len))
    c["block_recompute"] = layer_full if checkpointing else 0
    c["block_grad_workspace"] = layer_full
    c["block_grads_unsharded"] = (w + grad_copy) * split["block"]
    c["lm_head_grad"] = w * split["lm_head"]
    c["root_grads_unsharded"] = (w + grad_copy) * split["root"]
    c["optimizer_step_temp"] = 4 * P / N
    logits_saved = tokens * model_cfg.vocab_size * w
    static = {"params": c["params_sharded"], "grads": c["grads_sharded"], "optimizer": c["optimizer_states"]}
    moments = {
        "loss_backward": {**static, "params": static["params"] + c["params_unsharded"],
                          "activations": c["activations"] + c["logits_grad"] + c["loss_workspace"]},
        "block_backward": {**static, "params": static["params"] + c["params_unsharded"],
                           "grads": static["grads"] + c["block_grads_unsharded"] + c["lm_head_grad"],
                           "activations": c["activations"] - logits_saved + c["block_recompute"]
                           + c["block_grad_workspace"]},
        "root_reduce_scatter": {**static, "params": static["params"] + w * split["root"],
                                "grads": static["grads"] + c["root_grads_unsharded"], "activations": 0},
        "optimizer_step": {**static, "optimizer": static["optimizer"] + c["optimizer_step_temp"],
                           "activations": 0},
    }
    totals = {name: sum(parts.values()) for name, parts in moments.items()}
    peak_moment = max(totals, key=totals.get)
    return {"components": c, "moments": totals, "peak": totals[peak_moment], "peak_moment": peak_moment,
            "breakdown": moments[peak_moment], "precision": kind}


def max_micro_batch(model_cfg, moe_cfg, *, capacity: float, limit: int = 1 << 16, **kwargs) -> int:
    """The largest micro-batch (sequences) whose peak fits in `capacity` bytes (0: not even one)."""
    def fits(m):
        return predict_memory(model_cfg, moe_cfg, micro_batch=m, **kwargs)["peak"] <= capacity

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --- communication and time -----------------------------------------------------------------------------------------

def comm_bytes_per_micro_batch(split: dict, gpus: int, precision: str) -> float:
    """Bytes each GPU sends per micro-batch: blocks gathered twice, the root once, gradients reduce-scattered."""
    if gpus == 1:
        return 0.0
    w = compute_bytes(precision)
    blocks = split["total"] - split["root"]
    return (gpus - 1) / gpus * (w * (split["root"] + 2 * blocks) + 4 * split["total"])


def comm_seconds(volume: float, gpus: int, knobs: dict) -> float:
    inter = 0.0 if gpus <= knobs["gpus_per_node"] else 1.0 / knobs["gpus_per_node"]
    return max((1 - inter) * volume / (knobs["nvlink_gbps"] * 1e9), inter * volume / (knobs["internode_gbps"] * 1e9))


def recompute_flops_per_sequence(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, seq_len: int) -> float:
    """The blocks' forward (what per-block checkpointing runs again): the forward less embeddings and logits."""
    return forward_flops_per_sequence(model_cfg, moe_cfg, seq_len) - 4.0 * seq_len * model_cfg.vocab_size \
        * model_cfg.d_model


def ep_bytes(model_cfg, moe_cfg, *, gpus, micro_batch, seq_len, n_micro, checkpointing, precision) -> dict:
    """Per GPU per step: bytes expert parallelism's all-to-alls would move vs FSDP's expert-weight traffic."""
    w = compute_bytes(precision)
    E, k = moe_cfg.num_experts, moe_cfg.top_k
    e = min(gpus, E)
    a = 6 if checkpointing else 4
    p_exp = parameter_split(model_cfg, moe_cfg)["experts"]
    a2a = n_micro * a * model_cfg.n_layers * micro_batch * seq_len * k * model_cfg.d_model * w * (e - 1) / e
    fsdp = n_micro * p_exp * (2 * w + 4) * (gpus - 1) / gpus
    if gpus > 1 and e > 1:
        threshold = 3 * E * moe_cfg.expert_d_ff(model_cfg) * (2 * w + 4) / (a * k * w) * ((gpus - 1) / gpus) \
            / ((e - 1) / e)
    else:  # one GPU (or one expert): nothing to place elsewhere, nothing to gather
        threshold = None
    return {"a2a_bytes_per_step": a2a, "fsdp_expert_bytes_per_step": fsdp, "pays": threshold is not None and a2a < fsdp,
            "breakeven_tokens_per_micro_batch": threshold, "tokens_per_micro_batch": micro_batch * seq_len}


# --- the plan --------------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """A composed config reduced to what the plan needs."""

    name: str
    model: ModelConfig
    moe: MoEConfig | None
    seq_len: int
    batch_size: int
    tokens: int
    precision: str
    micro_batch_size: int | None = None
    activation_checkpointing: bool = False


def setup_from_config(cfg, name: str = "") -> Setup:
    from dropup.config import architecture

    model, moe = architecture(cfg)
    train = cfg.train
    return Setup(name or model.name, model, moe, int(cfg.data.seq_len), int(train.batch_size), int(train.tokens),
                 str(cfg.trainer.precision), train.get("micro_batch_size"),
                 bool(train.get("activation_checkpointing", False)))


def _options(setup: Setup, knobs: dict, gpus: int, profile) -> dict:
    """For each checkpointing choice: the largest micro-batch that fits and the micro-batch a plan would use."""
    capacity = (knobs["gpu_mem_gib"] - knobs["reserve_gib"]) * GIB
    per_gpu = setup.batch_size // gpus
    out = {}
    for ckpt in (False, True):
        largest = max_micro_batch(setup.model, setup.moe, capacity=capacity, gpus=gpus, seq_len=setup.seq_len,
                                  checkpointing=ckpt, precision=setup.precision, profile=profile)
        usable = [d for d in range(1, per_gpu + 1) if per_gpu % d == 0 and d <= largest]
        out[ckpt] = {"max_micro_batch": largest, "micro_batch": usable[-1] if usable else 0}
    return out


def _timing(setup: Setup, knobs: dict, gpus: int, micro: int, ckpt: bool) -> dict:
    per_gpu = setup.batch_size // gpus
    n_micro = per_gpu // micro if micro else 0
    tokens_step = per_gpu * setup.seq_len
    flops = train_flops(setup.model, setup.moe, tokens_step, setup.seq_len)
    extra = per_gpu * recompute_flops_per_sequence(setup.model, setup.moe, setup.seq_len) if ckpt else 0.0
    if knobs["tokens_per_s"]:
        compute = tokens_step / knobs["tokens_per_s"] * (flops + extra) / flops
    else:
        compute = (flops + extra) / (knobs["mfu"] * knobs["peak_tflops"] * 1e12)
    split = parameter_split(setup.model, setup.moe)
    volume = n_micro * comm_bytes_per_micro_batch(split, gpus, setup.precision)
    comm = comm_seconds(volume, gpus, knobs)
    steps = math.ceil(setup.tokens / (setup.batch_size * setup.seq_len))
    return {"n_micro": n_micro, "flops_per_step": flops + extra, "compute_s": compute, "comm_bytes_per_step": volume,
            "comm_s": comm, "step_s": max(compute, comm), "step_s_no_overlap": compute + comm, "steps": steps,
            "run_days": steps * max(compute, comm) / 86400, "run_days_no_overlap": steps * (compute + comm) / 86400}


def plan(setup: Setup, knobs: dict) -> dict:
    """The whole plan as one JSON-able dict (the command's last line)."""
    knobs = {**{k: v[1] for k, v in KNOBS.items()}, **knobs}
    gpus = knobs["gpus"]
    _check(setup, knobs)
    profile = measure_activations(setup.model, setup.moe, setup.precision)
    options = _options(setup, knobs, gpus, profile)
    forced_micro = _forced_micro(setup, knobs)
    mode = knobs["checkpointing"]
    if mode == "auto" and setup.activation_checkpointing:  # the config asks for it
        mode = "true"
    choices = {"auto": (False, True), "true": (True,), "false": (False,)}[mode]
    candidates = []
    for ckpt in choices:
        micro = options[ckpt]["micro_batch"] if forced_micro is None else forced_micro
        if micro:
            fits = micro <= options[ckpt]["max_micro_batch"]
            candidates.append((not fits, _timing(setup, knobs, gpus, micro, ckpt)["step_s"], ckpt, micro))
    candidates.sort()
    _, _, ckpt, micro = candidates[0] if candidates else (True, 0, choices[-1], 0)
    fits = bool(micro) and micro <= options[ckpt]["max_micro_batch"]
    memory = predict_memory(setup.model, setup.moe, gpus=gpus, micro_batch=micro, seq_len=setup.seq_len,
                            checkpointing=ckpt, precision=setup.precision, profile=profile)
    timing = _timing(setup, knobs, gpus, micro, ckpt) if micro else None
    counts = param_counts(setup.model, setup.moe)
    L = setup.model.n_layers
    result = {
        "name": setup.name, "gpus": gpus, "gpu_mem_gib": knobs["gpu_mem_gib"], "reserve_gib": knobs["reserve_gib"],
        "precision": _precision(setup.precision), "seq_len": setup.seq_len, "global_batch": setup.batch_size,
        "sequences_per_gpu": setup.batch_size // gpus, "tokens": setup.tokens, **counts,
        "activation_bytes_per_token": {
            "layer": float(profile.layer.per_token), "layer_checkpointed": float(profile.layer_checkpointed.per_token),
            "root": float(profile.root.per_token),
            "model": float(L * profile.layer.per_token + profile.root.per_token),
            "model_checkpointed": float(L * profile.layer_checkpointed.per_token + profile.root.per_token),
            "logits_grad": memory["components"]["logits_grad"] / max(1, micro * setup.seq_len) if micro else None,
        },
        "max_micro_batch": {"no_checkpointing": options[False]["max_micro_batch"],
                            "checkpointing": options[True]["max_micro_batch"]},
        "micro_batch": micro, "checkpointing": ckpt, "fits": fits,
        "memory": {"peak": memory["peak"], "peak_moment": memory["peak_moment"], **memory["breakdown"],
                   "moments": memory["moments"]},
        "throughput": (f"measured tokens_per_s={knobs['tokens_per_s']:g} per GPU" if knobs["tokens_per_s"]
                       else f"assumed mfu={knobs['mfu']:g} x peak_tflops={knobs['peak_tflops']:g}"),
        "bandwidth": {k: knobs[k] for k in ("nvlink_gbps", "internode_gbps", "gpus_per_node")},
        **(timing or {"n_micro": 0, "comm_bytes_per_step": None, "compute_s": None, "comm_s": None, "step_s": None,
                      "step_s_no_overlap": None, "run_days": None, "run_days_no_overlap": None}),
    }
    if setup.moe is not None and micro:
        ep = ep_bytes(setup.model, setup.moe, gpus=gpus, micro_batch=micro, seq_len=setup.seq_len,
                      n_micro=timing["n_micro"], checkpointing=ckpt, precision=setup.precision)
        ep["pays_from_gpus"] = _ep_point(setup, knobs, ckpt)
        result["ep"] = ep
    else:
        result["ep"] = None
    return result


def _ep_point(setup: Setup, knobs: dict, ckpt: bool) -> int | None:
    """The smallest GPU count (dividing the batch) at which EP's all-to-alls move fewer bytes than FSDP's experts."""
    profile = measure_activations(setup.model, setup.moe, setup.precision)
    forced_micro = _forced_micro(setup, knobs)
    for gpus in range(2, setup.batch_size + 1):
        if setup.batch_size % gpus:
            continue
        if forced_micro is None:
            micro = _options(setup, {**knobs, "gpus": gpus}, gpus, profile)[ckpt]["micro_batch"]
        else:
            micro = min(forced_micro, setup.batch_size // gpus)
        if not micro:
            continue
        ep = ep_bytes(setup.model, setup.moe, gpus=gpus, micro_batch=micro, seq_len=setup.seq_len,
                      n_micro=setup.batch_size // gpus // micro, checkpointing=ckpt, precision=setup.precision)
        if ep["pays"]:
            return gpus
    return None


def _forced_micro(setup: Setup, knobs: dict) -> int | None:
    """The micro-batch the user fixed (the micro_batch knob, else train.micro_batch_size); None: the plan picks."""
    return knobs["micro_batch"] if knobs["micro_batch"] is not None else setup.micro_batch_size


def _check(setup: Setup, knobs: dict) -> None:
    gpus = knobs["gpus"]
    if gpus < 1:
        raise ConfigError(f"gpus={gpus} must be at least 1, e.g. gpus=64")
    if setup.batch_size % gpus:
        raise ConfigError(f"train.batch_size={setup.batch_size} sequences do not split evenly over gpus={gpus}: "
                          "choose a GPU count that divides the batch (or set train.batch_size)")
    for name in ("gpu_mem_gib", "peak_tflops", "nvlink_gbps", "internode_gbps", "gpus_per_node"):
        if knobs[name] <= 0:
            raise ConfigError(f"{name}={knobs[name]:g} must be positive")
    if knobs["reserve_gib"] < 0 or knobs["reserve_gib"] >= knobs["gpu_mem_gib"]:
        raise ConfigError(f"reserve_gib={knobs['reserve_gib']:g} must be >= 0 and below gpu_mem_gib")
    if not 0 < knobs["mfu"] <= 1:
        raise ConfigError(f"mfu={knobs['mfu']:g} must be in (0, 1], e.g. mfu=0.35")
    if knobs["tokens_per_s"] is not None and knobs["tokens_per_s"] <= 0:
        raise ConfigError(f"tokens_per_s={knobs['tokens_per_s']:g} must be positive (one GPU's measured rate)")
    if knobs["checkpointing"] not in ("auto", "true", "false"):
        raise ConfigError(f"checkpointing={knobs['checkpointing']!r}: use auto, true or false")
    micro = _forced_micro(setup, knobs)
    per_gpu = setup.batch_size // gpus
    if micro is not None and (micro < 1 or per_gpu % micro):
        raise ConfigError(f"micro_batch={micro} does not divide the {per_gpu} sequences each GPU takes per step "
                          f"(train.batch_size={setup.batch_size} / gpus={gpus}): choose a divisor of {per_gpu}")


# --- rendering -------------------------------------------------------------------------------------------------------

def gib(n) -> str:
    return "–" if n is None else f"{n / GIB:.1f}"


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 0.1:
        return f"{seconds * 1000:.2g} ms"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def _days(days) -> str:
    if days is None:
        return "–"
    return f"{days:.1f} d" if days >= 1 else f"{days * 24:.1f} h" if days * 24 >= 0.1 else f"{days * 1440:.1f} min"


def render(result: dict) -> str:
    """The command's Markdown table (one quantity a row)."""
    r, mem, act = result, result["memory"], result["activation_bytes_per_token"]
    rows = [
        ("model", f"{r['name']}: {human_count(r['total_params'])} total, {human_count(r['active_params'])} "
                  f"active, {r['precision']}"),
        ("GPUs x memory", f"{r['gpus']} x {r['gpu_mem_gib']:g} GiB ({r['reserve_gib']:g} GiB reserved)"),
        ("global batch", f"{r['global_batch']} x {r['seq_len']} tokens; {r['sequences_per_gpu']} sequences per GPU "
                         "per step"),
        ("activations / token (measured)", f"{act['layer']:.0f} B per layer ({act['layer_checkpointed']:.0f} B "
                                           f"checkpointed), root {act['root']:.0f} B; model {act['model'] / 1024:.1f} "
                                           f"KiB ({act['model_checkpointed'] / 1024:.1f} KiB checkpointed)"),
        ("largest micro-batch", f"{r['max_micro_batch']['no_checkpointing']} without checkpointing, "
                                f"{r['max_micro_batch']['checkpointing']} with"),
        ("plan", f"micro-batch {r['micro_batch']} x {r['n_micro']} accumulation steps, checkpointing "
                 f"{'on' if r['checkpointing'] else 'off'}" + ("" if r["fits"] else " (DOES NOT FIT)")),
        ("peak memory / GPU", f"{gib(mem['peak'])} GiB at the {mem['peak_moment'].replace('_', ' ')}: params "
                              f"{gib(mem['params'])}, grads {gib(mem['grads'])}, AdamW {gib(mem['optimizer'])}, "
                              f"activations {gib(mem['activations'])} GiB"),
        ("communication / GPU / step", "–" if r["comm_bytes_per_step"] is None
         else f"{r['comm_bytes_per_step'] / 1e9:.1f} GB ({_duration(r['comm_s'])} at nvlink "
              f"{r['bandwidth']['nvlink_gbps']:g}, inter-node {r['bandwidth']['internode_gbps']:g} GB/s per GPU)"),
        ("compute / step", f"{_duration(r['compute_s'])} ({r['throughput']})"),
        ("step time", f"{_duration(r['step_s'])} overlapped, {_duration(r['step_s_no_overlap'])} not"),
        ("run", f"{r['tokens'] / 1e9:g}B tokens: {_days(r['run_days'])} overlapped, "
                f"{_days(r['run_days_no_overlap'])} not"),
    ]
    if r["ep"] is not None:
        ep = r["ep"]
        here = ("one GPU: nothing to compare" if ep["breakeven_tokens_per_micro_batch"] is None else
                f"all-to-all {ep['a2a_bytes_per_step'] / 1e9:.1f} GB vs FSDP experts "
                f"{ep['fsdp_expert_bytes_per_step'] / 1e9:.1f} GB per step: "
                f"{'pays' if ep['pays'] else 'does not pay'} here (below "
                f"{ep['breakeven_tokens_per_micro_batch']:.0f} tokens per micro-batch it does)")
        rows.append(("expert parallelism", f"{here}; pays from {ep['pays_from_gpus'] or 'no'} GPUs on"))
    lines = ["| quantity | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def docs_section(presets=DOC_PRESETS, gpus_list=DOC_GPUS, mems=DOC_MEM_GIB) -> str:
    """The generated part of docs/scaling.md: one table per preset, a row per (GPUs, memory)."""
    out = []
    for preset in presets:
        setup = setup_from_config(compose([f"experiment={preset}"]), preset)
        first = plan(setup, {"gpus": gpus_list[0], "gpu_mem_gib": mems[0]})
        act = first["activation_bytes_per_token"]
        ep_line = ""
        if first["ep"] is not None:
            ep_line = (f" Expert parallelism moves fewer bytes than FSDP's expert traffic below "
                       f"{first['ep']['breakeven_tokens_per_micro_batch']:.0f} tokens per micro-batch per GPU "
                       f"(at {gpus_list[0]} GPUs).")
        out += [f"### {preset}: {first['total_params'] / 1e9:.2f}B total, {first['active_params'] / 1e9:.2f}B "
                f"active", "",
                textwrap.fill(f"`python -m dropup.scaling experiment={preset} gpus=N gpu_mem_gib=M`. Global batch "
                f"{first['global_batch']} x {first['seq_len']}, {first['tokens'] / 1e9:g}B tokens, "
                f"{first['precision']}. Measured activations per token: {act['layer']:.0f} B per layer "
                f"({act['layer_checkpointed']:.0f} B checkpointed), root {act['root']:.0f} B (the logits), model "
                f"{act['model'] / 1024:.1f} KiB ({act['model_checkpointed'] / 1024:.1f} KiB checkpointed)."
                f"{ep_line} Compute: {first['throughput']}.",
                              width=118, break_on_hyphens=False, break_long_words=False),
                "",
                "| GPUs | GiB | params | grads | AdamW | activations | peak | max micro (no ckpt / ckpt) | plan "
                "(micro x accum, ckpt) | comm / step | step (overlap / sum) | run (overlap / sum) | EP pays |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for gpus in gpus_list:
            for mem in mems:
                r = plan(setup, {"gpus": gpus, "gpu_mem_gib": mem})
                m = r["memory"]
                mm = r["max_micro_batch"]
                plan_cell = (f"{r['micro_batch']} x {r['n_micro']}, {'ckpt' if r['checkpointing'] else 'no ckpt'}"
                             if r["micro_batch"] and r["fits"] else "does not fit")
                ep = r["ep"]
                ep_cell = "–" if ep is None else ("yes" if ep["pays"] else "no") + \
                    f" (from {ep['pays_from_gpus'] or '–'})"
                comm = "–" if r["comm_bytes_per_step"] is None else f"{r['comm_bytes_per_step'] / 1e9:.0f} GB"
                out.append(f"| {gpus} | {mem} | {gib(m['params'])} | {gib(m['grads'])} | {gib(m['optimizer'])} | "
                           f"{gib(m['activations'])} | {gib(m['peak'])} | {mm['no_checkpointing']} / "
                           f"{mm['checkpointing']} | {plan_cell} | {comm} | {_duration(r['step_s'])} / "
                           f"{_duration(r['step_s_no_overlap'])} | {_days(r['run_days'])} / "
                           f"{_days(r['run_days_no_overlap'])} | {ep_cell} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def rewrite_docs(path: Path = DOCS, check: bool = False) -> bool:
    """Replace the generated section of `path` (between the markers); with `check`, only report a difference."""
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ConfigError(f"{path} has no generated section: put the lines {BEGIN} and {END} where it goes")
    new = pattern.sub(lambda _: f"{BEGIN}\n{docs_section()}\n{END}", text)
    if check:
        return new == text
    path.write_text(new)
    return True


# --- command line ----------------------------------------------------------------------------------------------------

def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(scaling knobs, Hydra overrides). A top-level key that is neither a knob nor a config key or group is an
    error naming the knobs (Hydra would suggest `+key`, which is not the fix)."""
    from dropup.stages import Config

    top_level = {f.name for f in dataclasses.fields(Config)} | {"experiment", "hydra", "local", "defaults"}
    top_level |= {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    knobs, overrides = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in KNOBS:
            if not eq or value == "":
                raise ConfigError(f"{key} needs a value, e.g. {key}={KNOBS[key][1] or 1}")
            kind = KNOBS[key][0]
            try:
                knobs[key] = value.lower() if kind is str else kind(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a{'n' if kind is int else ''} {kind.__name__}: e.g. "
                                  f"{key}={KNOBS[key][1] or 1}") from None
            continue
        bare = key.lstrip("+~")
        if "." not in bare and bare not in top_level:
            close = difflib.get_close_matches(bare, [*KNOBS, *sorted(top_level)], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown argument {arg!r}{hint}: scaling knobs are {', '.join(KNOBS)}; anything "
                              "else is a config override such as experiment=paper_8x3.7b or train.batch_size=512")
        overrides.append(arg)
    return knobs, overrides


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("--docs", "--check"):
            same = rewrite_docs(check=argv[0] == "--check")
            if not same:
                print(f"error: {DOCS} differs from `python -m dropup.scaling --docs`'s output: run that",
                      file=sys.stderr)
                return 1
            print(DOCS)
            return 0
        if any(a in ("-h", "--help") for a in argv):
            print(__doc__.split("\n\n")[0] + "\n\nknobs:\n" + "\n".join(
                f"  {k}={v[1]}  {v[2]}" for k, v in KNOBS.items()))
            return 0
        knobs, overrides = split_args(argv)
        cfg = compose(overrides)
        experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "")
        result = plan(setup_from_config(cfg, experiment), knobs)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
