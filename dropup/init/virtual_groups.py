"""Fine-grained experts (granularity G > 1) and their *virtual groups* (He et al. 2024, "Upcycling Large Language
Models into Mixture of Experts"): which FFN part each expert is built from, and the two changes that make naive
Upcycling compute the dense function.

Expert e of E with granularity G reads part p = e mod G of the FFN of source model m = floor((e div G) N / (E/G)):
for G = 1 that is BTX's m = floor(e N / E), and with one source every expert reads the same FFN.

The G experts e = cG .. cG+G-1 that hold the G parts of one FFN copy c form a group whose router rows are one
draw, repeated, so the group's members get equal logits. When top-k is a multiple of G, a token's top k are then
k/G whole groups (a group splits only if two groups' logits tie exactly: never seen in fp32, but bf16 router
logits under autocast tie for about 0.2% of tokens at d_model 256, so there step 0 is the dense function up to
those tokens), each member of group g weighted p_g / (G sum_g' p_g') after renormalization, so the layer computes
sum_g (p_g / sum_g' p_g') FFN / G = FFN / G; a factor G folded into every routed W_down (after the strategy built
the expert from its unscaled slice) makes it the FFN again. Naive Upcycling then computes the dense function at
step 0, in our model and in an exported checkpoint alike. Without virtual groups (`virtual_groups: false`) the
top k are any k parts, averaged rather than summed: the step-0 function is not the dense one
(`dropup.init.streaming.step0_ffn_error` measures by how much). `virtual_groups: auto` turns them on for G > 1.
"""

from __future__ import annotations

import torch

from dropup.config import ConfigError, MoEConfig
from dropup.init import router as router_init


def parse_virtual_groups(value) -> bool | str:
    """`init.virtual_groups` as "auto", True or False."""
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise ConfigError(f"init.virtual_groups={value!r} is not understood: use auto (on for moe.granularity > 1), "
                      "true or false")


def expert_source(expert: int, num_experts: int, granularity: int, n_sources: int) -> tuple[int, int]:
    """(source model index, FFN part index) that expert `expert` is built from."""
    copies = num_experts // granularity
    return (expert // granularity) * n_sources // copies, expert % granularity


def group_scale(moe: MoEConfig, virtual_groups: bool) -> int:
    """The factor folded into every routed W_down: G in virtual groups (a token's chosen groups sum their G
    parts' outputs at 1/G each), else 1."""
    return moe.granularity if virtual_groups else 1


def grouped_router(spec: str, shape: tuple, moe: MoEConfig, virtual_groups: bool, *key: object) -> torch.Tensor:
    """A router (E, D) drawn as `spec` says; in virtual groups one row per group of G experts, repeated, so a
    group's members tie."""
    if not virtual_groups:
        return router_init.draw(spec, shape, *key)
    rows = router_init.draw(spec, (shape[0] // moe.granularity, shape[1]), *key)
    return rows.repeat_interleave(moe.granularity, dim=0)
