"""Load-balancing modes (`moe.lb_mode`): one entry per mode, saying what it does, so no caller compares names.

The balance loss is Switch Transformer's, E * sum_e f_e * P_e (f_e: the share of top-k assignments that go to
expert e, summing to k; P_e: e's mean router probability; `dropup.moe.losses.load_balancing_loss`). The modes
differ in which tokens form f and P, whether the loss is trained at all, and what an export tells transformers:
- `pooled`: one loss over all layers' tokens concatenated, per forward pass (transformers'
  `load_balancing_loss_func`, the paper's runs); each data-parallel rank pools its own micro-batch;
- `per_layer`: one loss per layer, averaged (the coefficient means the same as pooled's);
- `global_batch`: pooled over the whole optimizer step on every rank (Qiu et al. 2025, Megatron-Core's global aux
  loss): f_e from the step's micro-batches so far on every rank, P_e from this micro-batch on every rank;
- `aux_free`: no balance loss (it is computed like pooled, for the log); a per-expert routing bias, moved by a
  fixed step against each expert's load after every optimizer step (DeepSeek-V3), balances instead.

Layer 1: no torch, importable by `dropup.config`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BalancingMode:
    """What one `moe.lb_mode` does."""

    name: str
    trains_loss: bool  # the balance loss (x moe.lb_coef) is part of the training loss
    router_bias: bool  # routes with a per-expert bias (`expert_bias`, checkpointed state) stepped from the loads
    pools_layers: bool  # one loss over all layers' tokens (else one per layer, averaged)
    over_ranks: bool  # f and P are sums over every data-parallel rank (else each rank's own micro-batch)
    step_frequencies: bool  # f counts the optimizer step's micro-batches so far (`StepLoads`), not this one's only
    label: str  # how a run in this mode is told apart in tables (pooled: only when it ran on several ranks)
    paper: bool = False  # the paper's setting in one process: no label suffix
    export_note: str | None = None  # what a fine-tune of the export in transformers does differently ({model_type})

    def exported_aux_coef(self, lb_coef: float) -> float:
        """transformers' `router_aux_loss_coef` for an export: the run's coefficient where it trained the loss,
        else 0 (a fine-tune of the export must not start training a loss the run never used)."""
        return lb_coef if self.trains_loss else 0.0

    def table_suffix(self, ranks: int = 1) -> str:
        """The label suffix of a run in this mode (empty for the paper's setting on one rank)."""
        return "" if self.paper and ranks <= 1 else f", {self.label}"


MODES: dict[str, BalancingMode] = {m.name: m for m in (
    BalancingMode("pooled", trains_loss=True, router_bias=False, pools_layers=True, over_ranks=False,
                  step_frequencies=False, label="per-rank LB", paper=True),
    BalancingMode("per_layer", trains_loss=True, router_bias=False, pools_layers=False, over_ranks=False,
                  step_frequencies=False, label="per-layer LB",
                  export_note="this run's balance loss was the mean of per-layer losses (moe.lb_mode=per_layer); "
                              "{model_type}'s router_aux_loss_coef applies transformers' loss pooled over all "
                              "layers' tokens, so a fine-tune of the export balances another statistic"),
    BalancingMode("global_batch", trains_loss=True, router_bias=False, pools_layers=True, over_ranks=True,
                  step_frequencies=True, label="global-batch LB"),
    BalancingMode("aux_free", trains_loss=False, router_bias=True, pools_layers=True, over_ranks=False,
                  step_frequencies=False, label="aux-free",
                  export_note="router_aux_loss_coef is written as 0: this run balanced with aux_free's routing bias "
                              "and trained no balance loss, which {model_type} would otherwise add when fine-tuned"),
)}
NAMES = tuple(MODES)


def mode(name: str) -> BalancingMode:
    """The entry of `moe.lb_mode=name` (validated by `MoEConfig`, so unknown names only come from code)."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"moe.lb_mode={name!r} is unknown; choose one of {NAMES}") from None
