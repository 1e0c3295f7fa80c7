"""The balance losses' statistics and losses: Switch Transformer's load-balancing loss in each `moe.lb_mode`
(`dropup.balancing` says what each mode does), the step's running loads of `global_batch`, and ST-MoE's z-loss.

Shapes: T tokens, E experts, K top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from dropup import balancing
from dropup.config import ConfigError


class BalanceStats(NamedTuple):
    """One layer's input to the balance loss: top-k assignments per expert (fp32), the router probabilities
    summed over tokens per expert (fp32, differentiable) and the number of tokens."""

    counts_E: torch.Tensor
    prob_sums_E: torch.Tensor
    rows: int


def _assignment_stats(logits_TE: torch.Tensor, top_k: int, experts_TK: torch.Tensor | None = None) -> BalanceStats:
    """`BalanceStats` recomputed from a layer's logits. `experts_TK`: the choices the layer made (aux_free's bias
    changes them); by default the top k of the logits."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if experts_TK is None:
        experts_TK = torch.topk(probs_TE, top_k, dim=-1).indices
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=logits_TE.shape[-1]).float()
    return BalanceStats(counts_E, probs_TE.sum(dim=0), logits_TE.shape[0])


class StepLoads:
    """global_batch's running selection counts over the micro-batches of one optimizer step, every rank's
    included: `reset` at a step's first micro-batch, `add` at each (Megatron-Core keeps the same sums over its
    gradient-accumulation steps). Nothing to checkpoint: checkpoints fall between steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.counts_E: torch.Tensor | None = None
        self.rows: torch.Tensor | int = 0

    def add(self, counts_E: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Add one micro-batch's (all-rank) counts; return the sums over the step so far."""
        counts_E = counts_E.detach()
        self.counts_E = counts_E if self.counts_E is None else self.counts_E + counts_E
        self.rows = self.rows + rows
        return self.counts_E, self.rows


def _sum_over_ranks(counts_E: torch.Tensor, probs_E: torch.Tensor, rows: int):
    """global_batch: the loads, summed probabilities and token counts of every data-parallel rank. The probability
    sum is all-reduced differentiably, so each rank's gradient reaches every rank's router; after DDP averages
    the ranks' gradients, a step of one micro-batch per rank equals pooled on the concatenated batch in one
    process (with several, the probabilities are each micro-batch's: `load_balancing_loss`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts_E, probs_E, rows
    # here, not at the top: torch builds without distributed support lack this module
    from torch.distributed.nn.functional import all_reduce

    counts_E = counts_E.detach().clone()
    dist.all_reduce(counts_E)
    rows_t = torch.tensor([float(rows)], device=counts_E.device)
    dist.all_reduce(rows_t)
    return counts_E, all_reduce(probs_E), rows_t[0]


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mode: str = "pooled",
                        experts: list[torch.Tensor] | None = None,
                        stats: list[BalanceStats] | None = None,
                        step_loads: StepLoads | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss, E * sum_e f_e * P_e, unweighted (equals top_k at perfect balance).

    f_e is the share of top-k assignments that go to expert e (summed over the k slots, so sum_e f_e = k) and P_e
    the mean router probability of e; `experts` are the layers' actual choices (default: the logits' top k).
    - `pooled` computes it once over all layers' tokens concatenated (transformers' `load_balancing_loss_func`,
      what the paper's runs used), per forward pass: each rank pools its own micro-batch's tokens;
    - `per_layer` computes it per layer and averages, so the coefficient means the same in both modes;
    - `global_batch` balances the whole optimizer step (Qiu et al. 2025; Megatron-Core's global aux loss). At
      micro-batch k of a step, f_e counts the assignments of micro-batches 0..k on every data-parallel rank
      (`step_loads`, reset each step; counts all-reduced), and P_e is the mean probability over micro-batch k on
      every rank (the probability sums all-reduced differentiably). So the last micro-batch's f_e is the whole
      step's, and with one micro-batch per step (or without `step_loads`) this is `pooled` over all ranks' tokens:
      on one process, `pooled`;
    - `aux_free` is computed like `pooled`, for the log: that mode does not train on it.
    """
    num_experts = router_logits[0].shape[-1]
    if not stats:  # what the layers recorded while routing, or else recomputed from their logits
        experts = experts if experts else [None] * len(router_logits)
        stats = [_assignment_stats(logits, top_k, chosen) for logits, chosen in zip(router_logits, experts)]
    spec = balancing.MODES.get(mode)
    if spec is None:
        raise ConfigError(f"unknown load-balancing mode {mode!r}; use one of {', '.join(balancing.NAMES)}")
    if not spec.pools_layers:
        losses = [num_experts * torch.sum((c / n) * (p / n)) for c, p, n in stats]
        return torch.stack(losses).mean()
    rows = sum(n for _, _, n in stats)
    counts_E, probs_E = sum(c for c, _, _ in stats), sum(p for _, p, _ in stats)
    freq_counts_E, freq_rows = counts_E, rows
    if spec.over_ranks:
        counts_E, probs_E, rows = _sum_over_ranks(counts_E, probs_E, rows)
        freq_counts_E, freq_rows = counts_E, rows
    if spec.step_frequencies and step_loads is not None:
        freq_counts_E, freq_rows = step_loads.add(counts_E, rows)
    return num_experts * torch.sum((freq_counts_E / freq_rows) * (probs_E / rows))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    return torch.stack([torch.logsumexp(l.float(), dim=-1).square().mean() for l in router_logits]).mean()
