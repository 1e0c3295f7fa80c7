"""Streaming an MoE state dict out of an init strategy and its dense sources: which dense tensor feeds which MoE
tensor.

An MoE state dict is produced tensor by tensor from 0..N dense "source" state dicts (our naming, see
`dropup.model`), so a caller can stream: `moe_tensors` yields (name, tensor) pairs layer by layer and reads each
source tensor only when it is needed. The strategy (`dropup.init.base.InitStrategy`) builds each expert from its
source slice (`expert`, which part of which source: `dropup.init.virtual_groups.expert_source`) and every
non-expert tensor from the sources' copies (`non_expert`); the router is drawn as `strategy.router` says; a shared
expert is the sources' FFN (`dropup.init.shared_expert`), and the routed experts' W_down carry the factors that
keep naive Upcycling's step-0 function the dense one (`output_scales`). `step0_ffn_error` measures how far a
built layer is from its dense FFN.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.init.base import ExpertKey, InitStrategy
from dropup.init.shapes import check_sources, moe_shapes, tensor_meta
from dropup.init.shared_expert import layer_shared_expert, output_scales
from dropup.init.virtual_groups import expert_source, grouped_router
from dropup.moe.layer import MoELayer, SwiGLU

_EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.ffn\.(w_gate_up|w_down|router\.weight)$")
_SHARED_EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.ffn\.shared_expert(\.w_gate|\.w_up|\.w_down|_gate)\.weight$")


def source_ffns(sources, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each source's (W_gate, W_up, W_down) of one layer, read once for everything built from them."""
    prefix = f"layers.{layer}.ffn."
    return [tuple(src[f"{prefix}{w}.weight"] for w in ("w_gate", "w_up", "w_down")) for src in sources]


def layer_experts(
    strategy: InitStrategy,
    layer: int,
    sources,
    model: ModelConfig,
    moe: MoEConfig,
    seed: int,
    dtype: torch.dtype | None = None,
    threads: int = 1,
    ffns=None,
    regions: tuple[Region | None, Region | None] = (None, None),
):
    """The stacked expert tensors (w_gate_up (E, 2F, D), w_down (E, D, F)) of one MoE layer.

    Each source's FFN is read once per layer (or passed in as `ffns`, `source_ffns`'s list), and every expert is
    copied straight into the preallocated outputs (in `dtype`, default: the strategy's output dtype): at the
    paper's 8x3.7B scale a layer's experts are 1.2 GB in bf16, and building them by list + stack + cat would hold that
    about three times over. `threads` > 1 builds that many experts at a time (torch releases the GIL; each expert has its own generators, so the result is
    the same), at the cost of that many experts' temporaries.

    `regions` (one per output, or None for all of it): build only that block of each output (a rank's shard under
    FSDP). Each expert is still computed whole, from its own generators and its whole sub-block's statistics, so
    the block's bits are the same block of the whole tensor; an expert outside both blocks is not computed.
    """
    d_f = moe.expert_d_ff(model)
    if ffns is None:
        ffns = source_ffns(sources, layer)
    routed_scale = output_scales(moe, strategy.uses_virtual_groups(moe))[0] if sources else 1.0

    def build(e: int):
        m, part = expert_source(e, moe.num_experts, moe.granularity, max(len(sources), 1))
        cols = slice(part * d_f, (part + 1) * d_f)
        if sources:
            gate, up, down = ffns[m][0][cols], ffns[m][1][cols], ffns[m][2][:, cols]
        else:
            gate = up = torch.empty(d_f, model.d_model)
            down = torch.empty(model.d_model, d_f)
        gate, up, down = strategy.expert(gate, up, down, ExpertKey(seed, layer, e))
        return gate, up, (down if routed_scale == 1.0 else down * routed_scale)

    if regions != (None, None):
        return _expert_blocks(build, moe.num_experts, (2 * d_f, model.d_model), (model.d_model, d_f), regions, dtype)
    w_gate_up = w_down = None
    threads = max(1, threads)
    with ThreadPoolExecutor(threads) as pool:
        for first in range(0, moe.num_experts, threads):
            batch = range(first, min(first + threads, moe.num_experts))
            for e, (gate, up, down) in zip(batch, pool.map(build, batch)):
                if w_gate_up is None:
                    out_dtype = dtype or gate.dtype
                    w_gate_up = torch.empty(moe.num_experts, 2 * d_f, model.d_model, dtype=out_dtype)
                    w_down = torch.empty(moe.num_experts, model.d_model, d_f, dtype=out_dtype)
                w_gate_up[e, :d_f].copy_(gate)
                w_gate_up[e, d_f:].copy_(up)
                w_down[e].copy_(down)
    return w_gate_up, w_down


Region = tuple[slice, slice, slice]  # a block of a stacked expert tensor: experts, rows, columns


def _expert_blocks(build, num_experts: int, gate_up_shape, down_shape, regions, dtype):
    """`layer_experts` restricted to one block of each output: one expert in memory at a time."""
    full = ((slice(None),) * 3)
    (gu_e, gu_r, gu_c), (dn_e, dn_r, dn_c) = (region or full for region in regions)
    gu_experts = range(num_experts)[gu_e]
    dn_experts = range(num_experts)[dn_e]
    gu_shape = (len(gu_experts), len(range(gate_up_shape[0])[gu_r]), len(range(gate_up_shape[1])[gu_c]))
    dn_shape = (len(dn_experts), len(range(down_shape[0])[dn_r]), len(range(down_shape[1])[dn_c]))
    w_gate_up = w_down = None
    for e in sorted(set(gu_experts if 0 not in gu_shape else ()) | set(dn_experts if 0 not in dn_shape else ())):
        gate, up, down = build(e)
        if w_gate_up is None:
            out_dtype = dtype or gate.dtype
            w_gate_up, w_down = torch.empty(gu_shape, dtype=out_dtype), torch.empty(dn_shape, dtype=out_dtype)
        if e in gu_experts:
            w_gate_up[gu_experts.index(e)].copy_(torch.cat([gate, up])[gu_r, gu_c])
        if e in dn_experts:
            w_down[dn_experts.index(e)].copy_(down[dn_r, dn_c])
        del gate, up, down
    if w_gate_up is None:  # this block is empty (a rank past the end of an unevenly sharded tensor)
        w_gate_up, w_down = torch.empty(gu_shape, dtype=dtype), torch.empty(dn_shape, dtype=dtype)
    return w_gate_up, w_down


def moe_tensors(
    strategy: InitStrategy,
    sources: Sequence[Mapping[str, torch.Tensor]],
    model: ModelConfig,
    moe: MoEConfig,
    seed: int,
    dtype: torch.dtype | None = None,
    names: Container[str] | None = None,
    threads: int = 1,
    regions: Mapping[str, Region] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the MoE model's state dict, in state-dict order, built by `strategy`.

    `names` restricts the output to those tensors; the others are neither computed nor read from the sources (a
    resumed conversion skips what it has already written; each tensor's randomness depends only on its key).
    `threads`: experts built at a time (see `layer_experts`). `regions`: for the stacked expert tensors named
    there, only that block is built and yielded (a rank's shard: `dropup.init.producer`); every other tensor is
    yielded whole."""
    check_pair(model, moe)
    if not moe.enabled:
        raise ConfigError(f"init={strategy.name} builds an MoE: set moe=mixtral (or another MoE preset), not moe=none")
    strategy.validate(len(sources), moe)
    check_sources(sources, model)
    if dtype is None:
        dtype = tensor_meta(sources[0], "tok_emb.weight")[1] if sources else torch.float32
    experts_of_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    shared_of_layer: dict[int, dict[str, torch.Tensor]] = {}
    ffns_of_layer: dict[int, list] = {}  # the sources' FFNs of the current layer: the experts and S read them once

    def ffns(layer: int) -> list:
        if layer not in ffns_of_layer:
            ffns_of_layer.clear()
            ffns_of_layer[layer] = source_ffns(sources, layer)
        return ffns_of_layer[layer]

    for name, shape in moe_shapes(model, moe).items():
        if names is not None and name not in names:
            continue
        if name.endswith("ffn.expert_bias"):  # aux_free's routing bias starts at 0 (state, not a weight: fp32)
            yield name, torch.zeros(shape)
            continue
        match = _EXPERT_TENSOR.match(name)
        shared_expert = _SHARED_EXPERT_TENSOR.match(name)
        if shared_expert is not None and sources:
            layer = int(shared_expert.group(1))
            if layer not in shared_of_layer:
                shared_of_layer.clear()
                shared_of_layer[layer] = layer_shared_expert(layer, ffns(layer), model, moe)
            tensor = shared_of_layer[layer][name]
        elif match is None:
            tensor = strategy.non_expert(name, [src[name] for src in sources], shape, dtype, seed)
        elif match.group(2) == "router.weight":
            tensor = router_weight(strategy, tuple(shape), moe, seed, int(match.group(1)))
        else:
            layer = int(match.group(1))
            if layer not in experts_of_layer:
                experts_of_layer.clear()  # keep one layer's experts in memory at a time
                blocks = tuple((regions or {}).get(f"layers.{layer}.ffn.{w}") for w in ("w_gate_up", "w_down"))
                experts_of_layer[layer] = layer_experts(strategy, layer, sources, model, moe, seed, dtype, threads,
                                                        ffns(layer), blocks)
            tensor = experts_of_layer[layer][0 if match.group(2) == "w_gate_up" else 1]
        yield name, tensor.to(dtype)


def router_weight(strategy: InitStrategy, shape: tuple, moe: MoEConfig, seed: int, layer: int) -> torch.Tensor:
    """One layer's router (E, D): drawn as `strategy.router` says; with virtual groups one row per group of G
    experts, repeated, so a group's members tie (`dropup.init.virtual_groups`)."""
    return grouped_router(strategy.router, shape, moe, strategy.uses_virtual_groups(moe), seed, layer, -1, "router")


def step0_ffn_error(strategy: InitStrategy, sources, model: ModelConfig, moe: MoEConfig, seed: int,
                    layer: int = 0, tokens: int = 512, state: Mapping[str, torch.Tensor] | None = None) -> float:
    """How far the upcycled MoE layer's function is from the dense FFN it came from, at step 0:
    ||MoE(x) - FFN(x)|| / ||FFN(x)|| over `tokens` probe inputs x (unit-RMS Gaussian vectors times the layer's
    FFN-norm gains, i.e. what the FFN sees after its RMSNorm). Builds only that layer's FFN tensors (one dense
    source: BTX's experts come from several FFNs and have no single dense function to compare with), or reads
    them from `state` where the whole MoE state is already built."""
    prefix = f"layers.{layer}.ffn."
    names = {n for n in moe_shapes(model, moe) if n.startswith(prefix)}
    tensors = ((n, state[n]) for n in names) if state is not None else \
        moe_tensors(strategy, sources, model, moe, seed, names=names)
    built = {n[len(prefix):]: t.float() for n, t in tensors}
    moe_layer = MoELayer(model.d_model, moe.expert_d_ff(model), MoEConfig(**{**vars(moe), "backend": "loop"}))
    moe_layer.load_state_dict(built, strict=True)
    dense = SwiGLU(model.d_model, model.d_ff)
    dense.load_state_dict({k: sources[0][f"{prefix}{k}"].float() for k in dense.state_dict()}, strict=True)
    gains = sources[0][f"layers.{layer}.ffn_norm.weight"].float()
    x_TD = torch.randn(tokens, model.d_model, generator=torch.Generator().manual_seed(seed)) * gains
    with torch.no_grad():
        want_TD = dense(x_TD)
        got_TD = moe_layer(x_TD)[0]
    return float((got_TD - want_TD).norm() / want_TD.norm().clamp_min(1e-30))


def build_moe_state(strategy, sources, model, moe, seed, dtype=None) -> dict[str, torch.Tensor]:
    """The whole MoE state dict (`moe_tensors`, collected)."""
    return dict(moe_tensors(strategy, sources, model, moe, seed, dtype))
