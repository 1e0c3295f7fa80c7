"""The machinery every init strategy shares: which dense tensor feeds which MoE tensor.

An MoE state dict is produced tensor by tensor from 0..N dense "source" state dicts (our naming, see
`dropup.model`), so a caller can stream: `moe_tensors` yields (name, tensor) pairs layer by layer and reads each
source tensor only when it is needed. A strategy only decides
- how one expert's (W_gate, W_up, W_down) is derived from its source slice (`expert`), and
- how a non-FFN tensor is derived from the sources' copies of it (`shared`; default: the mean, i.e. a copy for
  one source and BTX's average for several).

Expert e of E with granularity G reads part p = e mod G of the FFN of source model m = floor((e div G) N / (E/G)):
for G = 1 that is BTX's m = floor(e N / E), and with one source every expert reads the same FFN.

A shared expert S (moe.shared_expert_d_ff = d_s > 0), y = sum_k w_k E_k(x) + g(x) S(x), is made the same way by
every strategy that reads dense models, whatever it does to the routed experts (drop, noise and BTX act on those
only): S is the sources' FFN (their mean for several, like every other non-expert tensor) resized to d_s neurons
by `resize_ffn`, which keeps the FFN's function for d_s >= d_ff; its gate w_g is 0, so g = sigmoid(0) = 1/2 for
every token. To make the step-0 function the dense one, `output_scales` folds 1/2 into the routed experts' W_down
(after the strategy built them from the unscaled dense FFN: a dropped neuron's statistics are the dense ones) and
1/2 into S's W_down only where there is no gate: naive Upcycling then computes 1/2 FFN + 1/2 FFN = FFN, and an
exported checkpoint computes the same. From scratch, S and w_g are drawn like any weight matrix.

Fine-grained experts (G > 1) with *virtual groups* (He et al. 2024, "Upcycling Large Language Models into Mixture
of Experts"): the G experts e = cG .. cG+G-1 that hold the G parts of one FFN copy c form a group whose router rows
are one draw, repeated, so the group's members get equal logits. When top-k is a multiple of G, a token's top k are
then k/G whole groups (a group splits only if two groups' logits tie exactly: never seen in fp32, but bf16
router logits under autocast tie for about 0.2% of tokens at d_model 256, so there step 0 is the dense function
up to those tokens), each member of group g weighted
p_g / (G sum_g' p_g') after renormalization, so the layer computes sum_g (p_g / sum_g' p_g') FFN / G = FFN / G;
a factor G folded into every routed W_down (after the strategy built the expert from its unscaled slice, as the
shared expert's 1/2) makes it the FFN again. Naive Upcycling then computes the dense function at step 0, in our
model and in an exported checkpoint alike. Without virtual groups (`virtual_groups: false`) the top k are any k
parts, averaged rather than summed: the step-0 function is not the dense one (`step0_ffn_error` measures by how
much). `virtual_groups: auto` turns them on for G > 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Container, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.init import router as router_init

_EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.ffn\.(w_gate_up|w_down|router\.weight)$")
_SHARED_EXPERT_TENSOR = re.compile(r"layers\.(\d+)\.ffn\.shared_expert(\.w_gate|\.w_up|\.w_down|_gate)\.weight$")


@dataclass
class ExpertKey:
    """Identifies one expert's tensors for the per-tensor generators: (seed, layer, expert, tensor)."""

    seed: int
    layer: int
    expert: int

    def __call__(self, tensor: str) -> tuple:
        return (self.seed, self.layer, self.expert, tensor)


@dataclass
class InitStrategy:
    """Base of every strategy. Subclasses set `name`, the allowed source count, and override `expert`."""

    router: str = router_init.DEFAULT
    # fine-grained experts (G > 1) only: auto | true | false (module docstring); no effect at G = 1
    virtual_groups: bool | str = "auto"

    name: ClassVar[str] = "base"
    min_sources: ClassVar[int] = 1
    max_sources: ClassVar[int | None] = 1

    def __post_init__(self) -> None:
        router_init.parse(self.router)
        self.virtual_groups = parse_virtual_groups(self.virtual_groups)

    def uses_virtual_groups(self, moe: MoEConfig) -> bool:
        """Whether this init builds `moe`'s fine-grained experts in virtual groups (never for G = 1, where a group
        is one expert and nothing changes)."""
        if moe.granularity == 1 or self.max_sources == 0:
            return False
        return True if self.virtual_groups == "auto" else bool(self.virtual_groups)

    @property
    def ratio_value(self) -> float | None:
        """The re-initialization ratio this strategy reports in results (None where it has none)."""
        return None

    def validate(self, n_sources: int, moe: MoEConfig) -> None:
        upper = self.max_sources if self.max_sources is not None else n_sources
        if not self.min_sources <= n_sources <= upper:
            want = (
                f"at least {self.min_sources}" if self.max_sources is None
                else f"exactly {self.min_sources}" if self.min_sources == self.max_sources
                else f"{self.min_sources} to {self.max_sources}"
            )
            raise ConfigError(f"init={self.name} needs {want} dense model(s), got {n_sources}")
        self.check_moe(moe)

    def check_moe(self, moe: MoEConfig) -> None:
        """What this init needs of the MoE's shape (checked before any work, then again when it builds)."""
        if self.virtual_groups is True and self.max_sources == 0:
            raise ConfigError(f"init.virtual_groups=true groups the parts of a dense FFN, and init={self.name} reads "
                              "no dense model: drop it")
        if self.virtual_groups is True and moe.granularity == 1:
            raise ConfigError("init.virtual_groups=true groups the parts of fine-grained experts, and "
                              "moe.granularity=1 has none: set moe.granularity > 1 (moe=fine_grained), or drop it")
        if self.uses_virtual_groups(moe) and moe.top_k % moe.granularity:
            raise ConfigError(
                f"virtual groups need moe.top_k={moe.top_k} to be a multiple of moe.granularity={moe.granularity}: a "
                "token must choose whole groups of one FFN's parts to compute the dense function; use moe.top_k="
                f"{max(1, moe.top_k // moe.granularity) * moe.granularity}, or init.virtual_groups=false (then the "
                "step-0 function is not the dense one)")

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        """Return one expert's (W_gate, W_up, W_down) from its source slice; default: an exact copy."""
        return gate_FD, up_FD, down_DF

    def shared(self, name: str, tensors: Sequence[torch.Tensor], shape, dtype, seed: int) -> torch.Tensor:
        return average(tensors)


def parse_virtual_groups(value) -> bool | str:
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise ConfigError(f"init.virtual_groups={value!r} is not understood: use auto (on for moe.granularity > 1), "
                      "true or false")


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sources' copies of one tensor averaged in fp32 (a copy for one source)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    return torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)


def output_scales(moe: MoEConfig, virtual_groups: bool = False) -> tuple[float, float]:
    """(routed, shared) factors folded into W_down of an upcycled MoE so that naive Upcycling computes the dense
    FFN at step 0. Beside a shared expert, the routed experts' weights sum to 1 and each computes the FFN, so they
    give 1/2 FFN at 1/2; the shared expert gives 1/2 FFN through its zero gate (sigmoid(0) = 1/2) at 1, or at 1/2
    without a gate. Virtual groups of G parts multiply the routed factor by G (module docstring). Otherwise
    (1, 1)."""
    routed, shared = 1.0, 1.0
    if moe.shared_expert_d_ff:
        routed, shared = 0.5, 1.0 if moe.shared_expert_gate else 0.5
    return routed * (moe.granularity if virtual_groups else 1), shared


def resize_ffn(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, width: int):
    """A SwiGLU FFN as one of `width` neurons: neuron j is the FFN's neuron j mod d_ff, and its W_down column is
    divided by the number of copies of that neuron, so every neuron's contribution sums to the original one. For
    width >= d_ff the function is unchanged (width = d_ff: a copy); narrower keeps the first `width` neurons and
    is not the FFN's function."""
    neuron = torch.arange(width) % gate_FD.shape[0]
    copies = torch.bincount(neuron, minlength=gate_FD.shape[0])[neuron]
    down = (down_DF[:, neuron].float() / copies).to(down_DF.dtype)
    return gate_FD[neuron], up_FD[neuron], down


def source_ffns(sources, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each source's (W_gate, W_up, W_down) of one layer, read once for everything built from them."""
    prefix = f"layers.{layer}.ffn."
    return [tuple(src[f"{prefix}{w}.weight"] for w in ("w_gate", "w_up", "w_down")) for src in sources]


def layer_shared_expert(layer: int, ffns, model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    """One layer's shared expert and gate, upcycled from the sources' FFNs `ffns` (module docstring)."""
    prefix = f"layers.{layer}.ffn."
    gate, up, down = resize_ffn(*(average([ffn[i] for ffn in ffns]) for i in range(3)), moe.shared_expert_d_ff)
    scale = output_scales(moe)[1]
    out = {f"{prefix}shared_expert.w_gate.weight": gate, f"{prefix}shared_expert.w_up.weight": up,
           f"{prefix}shared_expert.w_down.weight": down if scale == 1.0 else down * scale}
    if moe.shared_expert_gate:
        out[f"{prefix}shared_expert_gate.weight"] = torch.zeros(1, model.d_model, dtype=gate.dtype)
    return out


def reinit_count(ratio: float, d_ff: int) -> int:
    """|S| = floor(r d_f); the epsilon keeps e.g. 0.29 * 100 = 28.999... from flooring to 28."""
    return min(d_ff, math.floor(ratio * d_ff + 1e-9))


def check_ratio(ratio: float) -> None:
    if not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"ratio={ratio} is outside [0, 1]: the re-initialized share of d_ff must be in [0, 1]")


def expert_source(expert: int, num_experts: int, granularity: int, n_sources: int) -> tuple[int, int]:
    """(source model index, FFN part index) that expert `expert` is built from."""
    copies = num_experts // granularity
    return (expert // granularity) * n_sources // copies, expert % granularity


def dense_shapes(model: ModelConfig) -> dict[str, torch.Size]:
    from dropup.model import Transformer

    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(model).state_dict().items()}


def moe_shapes(model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Size]:
    from dropup.model import Transformer

    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(model, moe).state_dict().items()}


def tensor_meta(source: Mapping[str, torch.Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of one source tensor without reading it where the source can say (a lazy checkpoint reader
    offers `meta(name)` from its file headers), else from the tensor itself."""
    meta = getattr(source, "meta", None)
    if meta is not None:
        return meta(name)
    tensor = source[name]
    return tuple(tensor.shape), tensor.dtype


def check_sources(sources: Sequence[Mapping[str, torch.Tensor]], model: ModelConfig) -> None:
    """Every dense source has every tensor of `model` with its shape (from metadata where the source offers it)."""
    expected = dense_shapes(model)
    for i, src in enumerate(sources):
        missing = [k for k in expected if k not in src]
        if missing:
            raise ConfigError(f"dense model {i} lacks tensor {missing[0]!r}: it is not a dense model of this layout")
        for name, shape in expected.items():
            found = tensor_meta(src, name)[0]
            if tuple(found) != tuple(shape):
                raise ConfigError(
                    f"dense model {i} tensor {name} has shape {tuple(found)} but model={model.name} "
                    f"expects {tuple(shape)}: choose the model preset the dense model was trained with"
                )


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
):
    """The stacked expert tensors (w_gate_up (E, 2F, D), w_down (E, D, F)) of one MoE layer.

    Each source's FFN is read once per layer (or passed in as `ffns`, `source_ffns`'s list), and every expert is
    copied straight into the preallocated outputs (in `dtype`, default: the strategy's output dtype): at the
    paper's 8x3.7B scale a layer's experts are 1.2 GB in bf16, and building them by list + stack + cat would hold that about three times over. `threads` > 1 builds
    that many experts at a time (torch releases the GIL; each expert has its own generators, so the result is
    the same), at the cost of that many experts' temporaries.
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


def moe_tensors(
    strategy: InitStrategy,
    sources: Sequence[Mapping[str, torch.Tensor]],
    model: ModelConfig,
    moe: MoEConfig,
    seed: int,
    dtype: torch.dtype | None = None,
    names: Container[str] | None = None,
    threads: int = 1,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the MoE model's state dict, in state-dict order, built by `strategy`.

    `names` restricts the output to those tensors; the others are neither computed nor read from the sources (a
    resumed conversion skips what it has already written; each tensor's randomness depends only on its key).
    `threads`: experts built at a time (see `layer_experts`)."""
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
            tensor = strategy.shared(name, [src[name] for src in sources], shape, dtype, seed)
        elif match.group(2) == "router.weight":
            tensor = router_weight(strategy, tuple(shape), moe, seed, int(match.group(1)))
        else:
            layer = int(match.group(1))
            if layer not in experts_of_layer:
                experts_of_layer.clear()  # keep one layer's experts in memory at a time
                experts_of_layer[layer] = layer_experts(strategy, layer, sources, model, moe, seed, dtype, threads,
                                                        ffns(layer))
            tensor = experts_of_layer[layer][0 if match.group(2) == "w_gate_up" else 1]
        yield name, tensor.to(dtype)


def router_weight(strategy: InitStrategy, shape: tuple, moe: MoEConfig, seed: int, layer: int) -> torch.Tensor:
    """One layer's router (E, D): drawn as `strategy.router` says; with virtual groups one row per group of G
    experts, repeated, so a group's members tie (module docstring)."""
    if not strategy.uses_virtual_groups(moe):
        return router_init.draw(strategy.router, shape, seed, layer, -1, "router")
    groups = router_init.draw(strategy.router, (shape[0] // moe.granularity, shape[1]), seed, layer, -1, "router")
    return groups.repeat_interleave(moe.granularity, dim=0)


def step0_ffn_error(strategy: InitStrategy, sources, model: ModelConfig, moe: MoEConfig, seed: int,
                    layer: int = 0, tokens: int = 512, state: Mapping[str, torch.Tensor] | None = None) -> float:
    """How far the upcycled MoE layer's function is from the dense FFN it came from, at step 0:
    ||MoE(x) - FFN(x)|| / ||FFN(x)|| over `tokens` probe inputs x (unit-RMS Gaussian vectors times the layer's
    FFN-norm gains, i.e. what the FFN sees after its RMSNorm). Builds only that layer's FFN tensors (one dense
    source: BTX's experts come from several FFNs and have no single dense function to compare with), or reads
    them from `state` where the whole MoE state is already built."""
    from dropup.moe import MoELayer, SwiGLU

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
    return dict(moe_tensors(strategy, sources, model, moe, seed, dtype))
