"""Activation memory of a config, measured on our own Transformer rather than assumed (see the package docstring:
saved bytes per forward as affine functions of batch and sequence length, extrapolated over width and vocabulary
exactly)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.model import Transformer

GIB = 2**30
CE_CHUNK_ROWS = 512  # dropup.model.ChunkedCrossEntropy.CHUNK_ROWS (checked by the tests)
PRECISIONS = {"bf16-mixed": "bf16", "bf16": "bf16", "32-true": "fp32", "32": "fp32"}


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
    dtype = torch.bfloat16 if compute_kind(precision) == "bf16" else torch.float32
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
    kind = compute_kind(precision)
    key = (json.dumps(dataclasses.asdict(model_cfg), sort_keys=True),
           json.dumps(dataclasses.asdict(moe_cfg) if moe_cfg else None, sort_keys=True), kind)
    if key not in _PROFILES:
        _PROFILES[key] = _measure(model_cfg, moe_cfg, kind)
    return _PROFILES[key]


def compute_kind(precision: str) -> str:
    if precision in ("bf16", "fp32"):
        return precision
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not modelled; use bf16-mixed or 32-true")
    return PRECISIONS[precision]


def compute_bytes(precision: str) -> int:
    """Bytes of the compute (and gathered parameter) dtype: bf16 under bf16-mixed, fp32 under 32-true."""
    return 2 if compute_kind(precision) == "bf16" else 4


