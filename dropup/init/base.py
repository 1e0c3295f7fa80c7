"""The machinery every init strategy shares: which dense tensor feeds which MoE tensor.

An MoE state dict is produced tensor by tensor from 0..N dense "source" state dicts (our naming, see
`dropup.model`), so a caller can stream: `moe_tensors` yields (name, tensor) pairs layer by layer and reads each
source tensor only when it is needed. A strategy only decides
- how one expert's (W_gate, W_up, W_down) is derived from its source slice (`expert`), and
- how a non-FFN tensor is derived from the sources' copies of it (`shared`; default: the mean, i.e. a copy for
  one source and BTX's average for several).

Expert e of E with granularity G reads part p = e mod G of the FFN of source model m = floor((e div G) N / (E/G)):
for G = 1 that is BTX's m = floor(e N / E), and with one source every expert reads the same FFN.
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

    name: ClassVar[str] = "base"
    min_sources: ClassVar[int] = 1
    max_sources: ClassVar[int | None] = 1

    def __post_init__(self) -> None:
        router_init.parse(self.router)

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

    def expert(self, gate_FD, up_FD, down_DF, key: ExpertKey):
        """Return one expert's (W_gate, W_up, W_down) from its source slice; default: an exact copy."""
        return gate_FD, up_FD, down_DF

    def shared(self, name: str, tensors: Sequence[torch.Tensor], shape, dtype, seed: int) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].clone()
        return torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensors[0].dtype)


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
):
    """The stacked expert tensors (w_gate_up (E, 2F, D), w_down (E, D, F)) of one MoE layer.

    Each source's FFN is read once per layer, and every expert is copied straight into the preallocated outputs
    (in `dtype`, default: the strategy's output dtype): at the paper's 8x3.7B scale a layer's experts are 1.2 GB in
    bf16, and building them by list + stack + cat would hold that about three times over. `threads` > 1 builds
    that many experts at a time (torch releases the GIL; each expert has its own generators, so the result is
    the same), at the cost of that many experts' temporaries.
    """
    d_f = moe.expert_d_ff(model)
    prefix = f"layers.{layer}.ffn."
    ffns: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def build(e: int):
        m, part = expert_source(e, moe.num_experts, moe.granularity, max(len(sources), 1))
        cols = slice(part * d_f, (part + 1) * d_f)
        if sources:
            gate, up, down = ffns[m][0][cols], ffns[m][1][cols], ffns[m][2][:, cols]
        else:
            gate = up = torch.empty(d_f, model.d_model)
            down = torch.empty(model.d_model, d_f)
        return strategy.expert(gate, up, down, ExpertKey(seed, layer, e))

    for e in range(moe.num_experts if sources else 0):
        m = expert_source(e, moe.num_experts, moe.granularity, len(sources))[0]
        if m not in ffns:
            ffns[m] = tuple(sources[m][prefix + w] for w in ("w_gate.weight", "w_up.weight", "w_down.weight"))
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
    for name, shape in moe_shapes(model, moe).items():
        if names is not None and name not in names:
            continue
        match = _EXPERT_TENSOR.match(name)
        if match is None:
            tensor = strategy.shared(name, [src[name] for src in sources], shape, dtype, seed)
        elif match.group(2) == "router.weight":
            layer = int(match.group(1))
            tensor = router_init.draw(strategy.router, tuple(shape), seed, layer, -1, "router")
        else:
            layer = int(match.group(1))
            if layer not in experts_of_layer:
                experts_of_layer.clear()  # keep one layer's experts in memory at a time
                experts_of_layer[layer] = layer_experts(strategy, layer, sources, model, moe, seed, dtype, threads)
            tensor = experts_of_layer[layer][0 if match.group(2) == "w_gate_up" else 1]
        yield name, tensor.to(dtype)


def build_moe_state(strategy, sources, model, moe, seed, dtype=None) -> dict[str, torch.Tensor]:
    return dict(moe_tensors(strategy, sources, model, moe, seed, dtype))
