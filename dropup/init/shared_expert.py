"""The shared expert of an upcycled MoE, and the factors that keep the step-0 function the dense one.

A shared expert S (moe.shared_expert_d_ff = d_s > 0), y = sum_k w_k E_k(x) + g(x) S(x), is made the same way by
every strategy that reads dense models, whatever it does to the routed experts (drop, noise and BTX act on those
only): S is the sources' FFN (their mean for several, like every other non-expert tensor) resized to d_s neurons
by `resize_ffn`, which keeps the FFN's function for d_s >= d_ff; its gate w_g is 0, so g = sigmoid(0) = 1/2 for
every token. To make the step-0 function the dense one, `output_scales` folds 1/2 into the routed experts' W_down
(after the strategy built them from the unscaled dense FFN: a dropped neuron's statistics are the dense ones) and
1/2 into S's W_down only where there is no gate: naive Upcycling then computes 1/2 FFN + 1/2 FFN = FFN, and an
exported checkpoint computes the same. From scratch, S and w_g are drawn like any weight matrix.
"""

from __future__ import annotations

import torch

from dropup.config import ModelConfig, MoEConfig
from dropup.init.base import average
from dropup.init.virtual_groups import group_scale


def output_scales(moe: MoEConfig, virtual_groups: bool = False) -> tuple[float, float]:
    """(routed, shared) factors folded into W_down of an upcycled MoE so that naive Upcycling computes the dense
    FFN at step 0. Beside a shared expert, the routed experts' weights sum to 1 and each computes the FFN, so they
    give 1/2 FFN at 1/2; the shared expert gives 1/2 FFN through its zero gate (sigmoid(0) = 1/2) at 1, or at 1/2
    without a gate. Virtual groups of G parts multiply the routed factor by G (`dropup.init.virtual_groups`).
    Otherwise (1, 1)."""
    routed, shared = 1.0, 1.0
    if moe.shared_expert_d_ff:
        routed, shared = 0.5, 1.0 if moe.shared_expert_gate else 0.5
    return routed * group_scale(moe, virtual_groups), shared


def resize_ffn(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, width: int):
    """A SwiGLU FFN as one of `width` neurons: neuron j is the FFN's neuron j mod d_ff, and its W_down column is
    divided by the number of copies of that neuron, so every neuron's contribution sums to the original one. For
    width >= d_ff the function is unchanged (width = d_ff: a copy); narrower keeps the first `width` neurons and
    is not the FFN's function."""
    neuron = torch.arange(width) % gate_FD.shape[0]
    copies = torch.bincount(neuron, minlength=gate_FD.shape[0])[neuron]
    down = (down_DF[:, neuron].float() / copies).to(down_DF.dtype)
    return gate_FD[neuron], up_FD[neuron], down


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
