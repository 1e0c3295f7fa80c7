"""Order-independent randomness: one generator per key -- (seed, layer, expert, tensor) for init draws, (stream,
seed, step) for the batch sampler.

The seed of each generator is a stable hash (BLAKE2b, not Python's per-process salted `hash`) of the key, so a
tensor's values do not depend on which tensors were drawn before it, on the process, on parallelism or on
resumption -- the converter and the training run produce the same weights for the same seed.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*key: object) -> int:
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*key: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stable_seed(*key))


def normal(shape, mean: float, std: float, *key: object) -> torch.Tensor:
    """fp32 N(mean, std^2) samples on the CPU (cast by the caller)."""
    return torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=generator(*key))


def uniform(shape, low: float, high: float, *key: object) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(low, high, generator=generator(*key))


def subset(n: int, size: int, *key: object) -> torch.Tensor:
    """`size` distinct indices of range(n), sorted, drawn uniformly without replacement."""
    return torch.randperm(n, generator=generator(*key))[:size].sort().values


def permutation(n: int, *key: object) -> torch.Tensor:
    return torch.randperm(n, generator=generator(*key))
