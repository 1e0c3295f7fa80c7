"""How alike the experts of one layer are: the diagnostic behind the paper's claim that re-initialization breaks
the copies' symmetry (logged per layer at every validation)."""

from __future__ import annotations

import torch


def expert_similarity(w_gate_up_E2FD: torch.Tensor, w_down_EDF: torch.Tensor, granularity: int = 1) -> float:
    """Mean pairwise cosine similarity of experts' weights (W_gate, W_up and W_down flattened and concatenated),
    over the pairs of experts built from the same FFN part (e mod G equal; for G = 1 all pairs): 1 when they are
    copies (naive Upcycling), about (1 - r)^2 after Drop-Upcycling of zero-mean weights, about 0 from scratch.
    Computed from the experts' Gram matrix, without copying the weights. Not invariant to permuting neurons, so
    meaningless after `init.shuffle: true`. NaN with fewer than two experts per part."""
    with torch.no_grad(), torch.autocast(w_down_EDF.device.type, enabled=False):
        gram_EE = sum(w.flatten(1).float() @ w.flatten(1).float().T for w in (w_gate_up_E2FD, w_down_EDF))
        norms_E = gram_EE.diagonal().clamp_min(1e-30).sqrt()
        cos_EE = gram_EE / (norms_E[:, None] * norms_E[None, :])
        means = []
        for part in range(granularity):
            block = cos_EE[part::granularity, part::granularity]
            n = block.shape[0]
            if n > 1:
                means.append((block.sum() - block.diagonal().sum()) / (n * (n - 1)))
        return float(torch.stack(means).mean()) if means else float("nan")
