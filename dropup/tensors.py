"""Sharded tensors seen whole, for code below the trainer (the model, analysis) that may be handed FSDP's DTensors.

Uses torch.distributed.tensor only, and only once something has imported it: a DTensor cannot exist before its
module is loaded, so a process that never shards pays neither the import nor a collective.
"""

from __future__ import annotations

import sys

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2's sharded parameter or gradient)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank if it is sharded (a collective: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor
