"""The Mixtral MoE layer: top-k router, dropless token-choice dispatch, experts as stacked tensors.

Shapes are named in variables: T tokens, D d_model, F expert d_ff, E experts, K top-k, A = T*K assignments.
Expert weights use transformers 5's fused layout, so the Hugging Face mapping is a rename:
`w_gate_up` (E, 2F, D) holds W_gate in [:, :F] and W_up in [:, F:]; `w_down` is (E, D, F). The experts run on
one of the backends of `dropup.moe.backends`.

Routing (paper eq. 3): softmax over the top-k logits, which equals softmax over all E logits, keeping the top k
and renormalizing them -- the form transformers and moe-recipes compute, done here in fp32.

A shared expert (`moe.shared_expert_d_ff` > 0, Qwen2-MoE's layout) is a plain SwiGLU every token passes
through, added to the routed output behind an optional sigmoid gate: y = sum_k w_k E_k(x) + sigmoid(w_g . x) S(x).
It is not routed, so it has no load and takes no part in the balance losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dropup import balancing
from dropup.config import MoEConfig
from dropup.moe.backends import effective_backend, run_experts
from dropup.moe.losses import BalanceStats


def route(x_TD: torch.Tensor, w_router_ED: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None):
    """Return router logits (T, E), the renormalized top-k weights (T, K, fp32) and expert ids (T, K).

    `bias_E` (auxiliary-loss-free balancing) is added to the probabilities to choose the top k only: the weights
    are the chosen experts' unbiased probabilities, renormalized."""
    logits_TE, _, weights_TK, experts_TK = _route(x_TD, w_router_ED, top_k, bias_E)
    return logits_TE, weights_TK, experts_TK


def _route(x_TD, w_router_ED, top_k, bias_E=None):
    """`route`, also returning the fp32 probabilities (T, E) the balance loss needs."""
    logits_TE = F.linear(x_TD, w_router_ED)
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if bias_E is None:
        weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    else:
        experts_TK = torch.topk(probs_TE + bias_E, top_k, dim=-1).indices
        weights_TK = probs_TE.gather(-1, experts_TK)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return logits_TE, probs_TE, weights_TK, experts_TK


class SwiGLU(nn.Module):
    """One SwiGLU FFN (paper eq. 1), weights in torch's (out, in) layout: W_gate, W_up (F, D), W_down (D, F). The
    dense model's FFN, and an MoE's shared expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoELayer(nn.Module):
    """Router + E SwiGLU experts (+ an optional shared expert). `forward` returns the output and the router
    logits (for the aux losses)."""

    def __init__(self, d_model: int, expert_d_ff: int, moe: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k, self.backend = moe.num_experts, moe.top_k, moe.backend
        self.router = nn.Linear(d_model, moe.num_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(moe.num_experts, 2 * expert_d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(moe.num_experts, d_model, expert_d_ff))
        # Assignments per expert in the last forward pass, for routing analysis (no autograd, no sync).
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False)
        self.shared_expert = SwiGLU(d_model, moe.shared_expert_d_ff) if moe.shared_expert_d_ff else None
        self.shared_expert_gate = (nn.Linear(d_model, 1, bias=False)
                                   if self.shared_expert is not None and moe.shared_expert_gate else None)
        # the routing bias of a balancing mode that routes with one (aux_free): state (checkpointed, resumed), not a parameter
        if balancing.mode(moe.lb_mode).router_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's step: lower the bias of every expert above the mean load by `rate`, raise it for those
        below (`load_E`: the step's assignments, summed over ranks so every rank takes the same step)."""
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))

    def forward(self, x_TD: torch.Tensor, choices: list | None = None, balance: list | None = None):
        """The layer's output and router logits. If given, the chosen experts (T, K) are appended to `choices`
        and the balance-loss statistics (`BalanceStats`) to `balance`."""
        y_TD, logits_TE = self.routed(x_TD, choices, balance)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD.to(y_TD.dtype)
        return y_TD, logits_TE

    def routed(self, x_TD: torch.Tensor, choices: list | None = None, balance: list | None = None):
        """The routed experts' weighted sum, and the router logits."""
        logits_TE, probs_TE, weights_TK, experts_TK = _route(x_TD, self.router.weight, self.top_k, self.expert_bias)
        # one count serves the dispatch, the routing analysis and the balance loss
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        if choices is not None:
            choices.append(experts_TK)
        if balance is not None:
            balance.append(BalanceStats(counts_E.float(), probs_TE.sum(dim=0), probs_TE.shape[0]))
        w_gate_up, w_down = self.w_gate_up, self.w_down
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):
            # Grouped GEMMs are not autocast ops: cast explicitly, as autocast does for F.linear.
            dtype = torch.get_autocast_dtype(device_type)
            x_TD, w_gate_up, w_down = x_TD.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        backend = effective_backend(self.backend, x_TD)
        y_TD = run_experts(backend, x_TD, w_gate_up, w_down, weights_TK, experts_TK, counts_E)
        with torch.no_grad():
            self.tokens_per_expert.copy_(counts_E)
        return y_TD, logits_TE
