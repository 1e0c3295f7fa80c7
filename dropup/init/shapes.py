"""The shapes an init works with: a dense model's and an MoE's state dicts (from the model built on the meta
device, so exact before any weight exists), and the check that dense sources fit them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.model import Transformer


def dense_shapes(model: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of the dense model `model`, by name, with its shape."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(model).state_dict().items()}


def moe_shapes(model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Size]:
    """Every tensor of the MoE model (`model` with `moe`), in state-dict order, with its shape."""
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
