"""--verify: the written checkpoint against the dense model(s), streaming index-set checks and logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dropup import families
from dropup.config import ModelConfig
from dropup.flops import human_count, param_counts
from dropup.hf import hf_config, to_hf
from dropup.init.base import PERMUTED, ExpertKey
from dropup.init.shared_expert import output_scales
from dropup.init.virtual_groups import expert_source
from dropup.shards import INDEX, CheckpointReader, scan
from dropup.upcycle.common import VERIFY_MAX_PARAMS
from dropup.upcycle.inputs import Dense
from dropup.upcycle.plan import Job


def _output_reader(out: Path, family: str, layout: str) -> CheckpointReader:
    """The written MoE under our names, read through the family's tensor mapping (either layout, any family)."""
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    stored = scan(sorted({out / f for f in weight_map.values()}))
    return CheckpointReader(families.family(family).mapper("moe", layout).sources(stored))


def _output_experts(output: CheckpointReader, layer: int, d_f: int, n: int) -> list[tuple]:
    """(W_gate (F, D), W_up (F, D), W_down (D, F)) of every expert of one layer, as written."""
    gate_up, down = output[f"layers.{layer}.ffn.w_gate_up"], output[f"layers.{layer}.ffn.w_down"]
    return [(gate_up[e, :d_f], gate_up[e, d_f:], down[e]) for e in range(n)]


def changed_neurons(new_FD: torch.Tensor, old_FD: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the neurons (rows in the (F, D) layout) where an expert differs from its source."""
    return (new_FD != old_FD).any(dim=1).nonzero().flatten()


def verify(job: Job) -> list[str]:
    """Check the written files against the dense model(s); lines starting with FAIL mark a failed check.

    1. Streaming, any size (inits that read dense models): in every expert and matrix, exactly the neurons of the
       strategy's index set differ from the source FFN slice (none for naive and BTX), the slice taken in the
       expert's own neuron order where the strategy relabels neurons (`neuron_permutation`); prints the
       re-initialized share per expert and matrix. Where the strategy keeps the dense function in permuted order,
       also every expert's output against its slice's on probe inputs: the function, whatever the order.
    2. When small enough to load twice in fp32: logits of the MoE (transformers) vs the dense model -- equal up
       to rounding where the strategy keeps the dense function, finite otherwise."""
    lines = _verify_index_sets(job) if job.strategy.reads_dense else []
    total = param_counts(job.model, job.moe)["total_params"]
    if total > VERIFY_MAX_PARAMS:
        return [*lines, f"logits: not compared ({human_count(total)} parameters; transformers runs both models only "
                        f"below {human_count(VERIFY_MAX_PARAMS)})"]
    return lines + _verify_logits(job)


def _ffn(x_PD: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_FD: torch.Tensor) -> torch.Tensor:
    """A SwiGLU FFN in fp32, W_down given neuron-major (F, D)."""
    gate_FD, up_FD, down_FD = gate_FD.float(), up_FD.float(), down_FD.float()
    return (F.silu(x_PD @ gate_FD.T) * (x_PD @ up_FD.T)) @ down_FD


def _verify_index_sets(job: Job) -> list[str]:
    model, moe, strategy, seed = job.model, job.moe, job.strategy, job.options["seed"]
    d_f, n_e, n_l = moe.expert_d_ff(model), moe.num_experts, model.n_layers
    output = _output_reader(job.out, model.family, job.options["layout"])
    readers = [d.reader() for d in job.inputs]
    share = np.zeros((n_e, 3))  # changed neurons / d_f, mean over layers, per (expert, gate/up/down)
    routed_scale = output_scales(moe, strategy.uses_virtual_groups(moe))[0]
    check_function = strategy.dense_order(d_f) == PERMUTED
    x_PD = torch.randn(16, model.d_model, generator=torch.Generator().manual_seed(seed))
    mismatches, worst, relabelled = [], 0.0, False
    for layer in range(n_l):
        ffn = {}
        for e, written in enumerate(_output_experts(output, layer, d_f, n_e)):
            m, part = expert_source(e, n_e, moe.granularity, len(readers))
            if m not in ffn:
                ffn[m] = [readers[m][f"layers.{layer}.ffn.{w}.weight"].to(job.dtype)
                          for w in ("w_gate", "w_up", "w_down")]
            cols = slice(part * d_f, (part + 1) * d_f)
            key = ExpertKey(seed, layer, e)
            # beside a shared expert or in virtual groups the routed experts' W_down carry a factor
            source = (ffn[m][0][cols], ffn[m][1][cols], ffn[m][2][:, cols].t() * routed_scale)
            new = (written[0], written[1], written[2].t())
            if check_function:
                want_PD = _ffn(x_PD, *source)
                diff = float((_ffn(x_PD, *new) - want_PD).abs().max() / (1 + want_PD.abs().max()))
                worst = max(worst, diff)
            perm = strategy.neuron_permutation(d_f, key)
            if perm is not None:  # compare with the slice in the expert's own neuron order
                source, relabelled = tuple(w[perm] for w in source), True
            expected = strategy.redrawn_neurons(d_f, key)
            for j, matrix in enumerate(("gate", "up", "down")):
                changed = changed_neurons(new[j], source[j])
                share[e, j] += changed.numel() / d_f / n_l
                if not torch.equal(changed, expected[matrix]):
                    mismatches.append(f"layer {layer} expert {e} {matrix}")
    count = strategy.redrawn_count(d_f)
    lines = [f"re-initialized share of each expert's d_ff={d_f} neurons, mean over {n_l} layers "
             f"(the init sets floor(r * d_f) / d_f = {count / d_f:.4f}):",
             "  expert   gate     up       down"]
    lines += [f"  {e:<6}   {share[e, 0]:.4f}   {share[e, 1]:.4f}   {share[e, 2]:.4f}" for e in range(n_e)]
    if check_function:
        lines.append(f"{'OK' if worst <= 1e-4 else 'FAIL'}: every expert's output equals its dense FFN slice's "
                     f"(neurons permuted; {x_PD.shape[0]} probe inputs): max relative difference {worst:.3g}")
    if mismatches:
        return [*lines, f"FAIL: changed neurons differ from the init's index sets in {len(mismatches)} "
                        f"place(s), first {mismatches[0]}"]
    order = " (in each expert's permuted neuron order)" if relabelled else ""
    return [*lines, "OK: in every layer, expert and matrix exactly the init's neuron set differs from the dense "
                    f"source{order} (the sets in the manifest)"]


def _dense_transformers(dense: Dense, model: ModelConfig):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if dense.kind == "hf":
        return AutoModelForCausalLM.from_pretrained(dense.path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_config(hf_config(model))
    state = to_hf(load_file(dense.path / "model.safetensors"), family=model.family)
    reference.load_state_dict({k: v.float() for k, v in state.items()}, strict=not model.tie_embeddings)
    return reference


def _verify_logits(job: Job) -> list[str]:
    """Both models in fp32; the dense weights are first rounded to the output dtype, as the MoE's were."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out, dense, model, moe, strategy = job.out, job.inputs[0], job.model, job.moe, job.strategy
    seed, d_f = job.options["seed"], moe.expert_d_ff(job.model)
    tokens = torch.randint(0, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        moe_logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
        if not torch.isfinite(moe_logits).all():
            return ["FAIL: the MoE's logits are not finite"]
        if not strategy.reads_dense:
            return ["logits: the MoE loads with transformers and its logits are finite"]
        reference = _dense_transformers(dense, model).eval()
        for param in reference.parameters():
            param.copy_(param.to(job.dtype))
        dense_logits = reference(tokens).logits
    diff = (moe_logits - dense_logits).abs().max().item()
    grouped = moe.granularity == 1 or strategy.uses_virtual_groups(moe)
    copies = strategy.dense_order(d_f) is not None  # every expert computes its slice's function
    dense_function = grouped and copies
    if copies and not grouped:
        return [f"logits: max |MoE - dense ({dense.path.name})| = {diff:.3g}: NOT the dense function -- without "
                f"virtual groups the {moe.top_k} chosen parts of granularity {moe.granularity} are averaged, not "
                "summed (--virtual-groups makes naive upcycling exact)"]
    if dense_function and 0 < moe.shared_expert_d_ff < model.d_ff:
        return [f"logits: max |MoE - dense ({dense.path.name})| = {diff:.3g} (not 0: a shared expert narrower than "
                f"d_ff={model.d_ff} keeps only {moe.shared_expert_d_ff} of the dense FFN's neurons)"]
    if not dense_function:
        return [f"logits: max |MoE - dense ({dense.path.name})| = {diff:.3g} (not expected to be 0 for this init)"]
    scale = dense_logits.abs().max().item()
    verdict = "OK" if diff <= 1e-4 * (1 + scale) else "FAIL"
    return [(f"{verdict}: logits of the MoE equal the dense model's (r = 0): max |difference| = {diff:.3g} "
             f"(max |logit| {scale:.3g})")]
