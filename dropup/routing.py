"""Routing statistics from per-domain, per-layer, per-expert token counts (paper section 5.4, Fig. 5).

`counts[domain][layer][expert]` = top-k assignments of that domain's validation tokens. Summaries, averaged over
layers:
- `imbalance`: max over experts of the pooled share / the uniform share 1/E (1 = perfectly balanced, E = one
  expert takes everything);
- `entropy`: entropy of the pooled expert distribution / log E (1 = uniform);
- `specialization`: generalized Jensen-Shannon divergence between the domains' expert distributions,
  H(mean_d p_d) - mean_d H(p_d), over log(#domains) so it lies in [0, 1] (0 = every domain routed alike).
"""

from __future__ import annotations

import numpy as np


def shares(counts: dict[str, list[list[float]]]) -> dict[str, np.ndarray]:
    """Per domain, a (layers, experts) array of the share of that domain's assignments going to each expert."""
    out = {}
    for domain, per_layer in counts.items():
        c = np.asarray(per_layer, dtype=np.float64)
        out[domain] = c / np.maximum(c.sum(axis=1, keepdims=True), 1e-12)
    return out


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def summarize(counts: dict[str, list[list[float]]] | None) -> dict[str, float]:
    if not counts:
        return {}
    per_domain = shares(counts)
    stacked = np.stack(list(per_domain.values()))  # (domains, layers, experts)
    pooled_counts = np.sum([np.asarray(v, dtype=np.float64) for v in counts.values()], axis=0)
    pooled = pooled_counts / np.maximum(pooled_counts.sum(axis=1, keepdims=True), 1e-12)
    n_experts = pooled.shape[1]
    mixture = stacked.mean(axis=0)
    jsd = _entropy(mixture) - _entropy(stacked).mean(axis=0)
    n_domains = stacked.shape[0]
    return {
        "routing/imbalance": float((pooled.max(axis=1) * n_experts).mean()),
        "routing/entropy": float((_entropy(pooled) / np.log(n_experts)).mean()),
        "routing/specialization": float((jsd / np.log(n_domains)).mean()) if n_domains > 1 else 0.0,
    }
