"""The scaling plan (dropup/tools/scaling/): measured activations, the memory model's relations, the command and its
generated docs."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dropup.tools import scaling
from dropup.config import ModelConfig, MoEConfig
from dropup.flops import param_counts
from dropup.model import Block, ChunkedCrossEntropy
from dropup.schema import compose

ROOT = Path(__file__).resolve().parents[1]
# widths divisible by 4: measured at /4 and /2, extrapolated to full width, compared with full width measured
SMALL = ModelConfig(vocab_size=300, n_layers=3, d_model=128, d_ff=256, n_heads=8, n_kv_heads=4)
SMALL_MOE = MoEConfig(enabled=True, num_experts=4, top_k=2)


def preset(name):
    return scaling.setup_from_config(compose([f"experiment={name}"]), name)


@pytest.mark.parametrize("moe, precision", [(None, "bf16-mixed"), (SMALL_MOE, "bf16-mixed"), (SMALL_MOE, "32-true")],
                         ids=["dense-bf16", "moe-bf16", "moe-fp32"])
def test_extrapolated_activations_equal_hooks_on_the_full_model(moe, precision):
    """Tolerance: none. Measured at widths /4 and /2 with a 128-token vocabulary (and 256 for the slope), the
    profile predicts, byte for byte, what saved_tensors_hooks see on the full 3-layer model with its 300-token
    vocabulary at a (batch, seq_len) it was not fitted on."""
    assert scaling.scale_factors(SMALL, moe) == (4, 2)
    profile = scaling.measure_activations(SMALL, moe, precision)
    model = scaling.build_model(SMALL, moe, precision)
    for batch, seq_len in ((3, 12), (2, 24)):
        assert scaling.saved_bytes(model, batch, seq_len) == profile.kept(batch, seq_len, False)
        kept = scaling.saved_bytes(model, batch, seq_len, checkpointing=True)
        assert kept == profile.kept(batch, seq_len, True)
        # checkpointed, each block keeps its input only: B*S*D in the compute dtype
        itemsize = 2 if precision == "bf16-mixed" else 4
        assert profile.layer_checkpointed(batch, seq_len) == batch * seq_len * SMALL.d_model * itemsize
        assert kept - profile.root_checkpointed(batch, seq_len) == SMALL.n_layers * batch * seq_len * SMALL.d_model \
            * itemsize
    # the logits the loss saves are in the root's bytes: V per token in the compute dtype, and more
    assert profile.root.per_token > SMALL.vocab_size * profile.itemsize


def test_sorted_backends_save_the_same_bytes():
    """The measurement runs the configured backend (grouped on CPU and GPU); sliced, the fallback, saves the same
    activations, less the grouped GEMM's int32 offsets (E per layer)."""
    sizes = {backend: scaling.saved_bytes(scaling.build_model(SMALL, dataclasses.replace(SMALL_MOE, backend=backend),
                                                              "bf16"), 2, 8)
             for backend in ("grouped", "sliced")}
    assert sizes["grouped"] - sizes["sliced"] == SMALL.n_layers * SMALL_MOE.num_experts * 4


def test_loss_chunk_matches_the_model():
    assert scaling.CE_CHUNK_ROWS == ChunkedCrossEntropy.CHUNK_ROWS


def test_parameter_bytes_agree_with_param_counts():
    setup = preset("paper_8x3.7b")
    split = scaling.parameter_split(setup.model, setup.moe)
    assert split["total"] == param_counts(setup.model, setup.moe)["total_params"]
    assert split["root"] + setup.model.n_layers * split["block"] == split["total"]
    with torch.device("meta"):
        block = Block(setup.model, setup.moe)
    assert split["block"] == sum(p.numel() for p in block.parameters())
    memory = scaling.predict_memory(setup.model, setup.moe, gpus=64, micro_batch=1, seq_len=4096,
                                    checkpointing=False)
    c = memory["components"]
    assert c["params_sharded"] * 64 == 4 * split["total"]  # fp32 master shards
    assert c["optimizer_states"] * 64 == 8 * split["total"]  # exp_avg + exp_avg_sq, sharded once
    assert c["params_unsharded"] == 2 * (split["root"] + 2 * split["block"])  # bf16: root + two blocks


def test_sharded_parts_halve_with_twice_the_gpus_and_nothing_else_does():
    """Would fail for an optimizer state divided by N twice (a quarter) or not at all, or activations sharded."""
    setup = preset("paper_8x3.7b")
    kwargs = dict(micro_batch=2, seq_len=4096, checkpointing=True)
    at16 = scaling.predict_memory(setup.model, setup.moe, gpus=16, **kwargs)["components"]
    at32 = scaling.predict_memory(setup.model, setup.moe, gpus=32, **kwargs)["components"]
    sharded = {"params_sharded", "grads_sharded", "optimizer_states", "optimizer_step_temp"}
    for name in at16:
        assert at32[name] == (at16[name] / 2 if name in sharded else at16[name]), name


def test_init_host_memory_falls_with_the_gpus_and_its_shards_sum_to_the_state():
    """The plan's host memory per GPU at initialization (sharded construction): the fp32 shards, 4P/N, plus the
    largest unit being produced and its source. From 8 GPUs on that is the embedding and its dense copy (the rank's
    block of a layer's experts, E/N of them plus one being built, is smaller). Would fail for an unsharded init
    (8P or 4P per rank), for shards divided twice, or for a buffer that grew with N."""
    setup = preset("upcycle_8x8b")
    model, P = setup.model, param_counts(setup.model, setup.moe)["total_params"]
    assert 47e9 < P < 48e9  # an 8-expert upcycle of an 8B Llama (conf/model/8b.yaml)
    unit = 2 * 4 * model.vocab_size * model.d_model
    previous = None
    for gpus in (8, 16, 64):
        init = scaling.plan(setup, {"gpus": gpus})["init_host"]
        assert gpus * init["params"] == pytest.approx(4 * P)  # summed over the ranks: the whole fp32 state
        assert init["full_tensor"] + init["dense_buffer"] == unit
        assert init["total"] == pytest.approx(4 * P / gpus + unit)
        assert init["per_node"] == pytest.approx(8 * init["total"])  # eight GPUs (ranks) share a node's host
        assert previous is None or init["total"] < previous
        previous = init["total"]
    # the figure for a whole 8-GPU node before the sharded construction was 3 TB; now under 0.3 TB
    assert scaling.plan(setup, {"gpus": 8})["init_host"]["per_node"] < 0.3e12
    assert "| host memory / GPU at init | " in scaling.render(scaling.plan(setup, {"gpus": 64}))


def test_logits_and_their_gradient_are_counted():
    """A prediction that forgot the logits would keep less than one (tokens x vocab) tensor at the loss."""
    setup = preset("paper_8x3.7b")
    tokens, V = 4096, setup.model.vocab_size
    memory = scaling.predict_memory(setup.model, setup.moe, gpus=64, micro_batch=1, seq_len=tokens,
                                    checkpointing=True)
    c = memory["components"]
    assert c["logits_grad"] == tokens * V * 2
    profile = scaling.measure_activations(setup.model, setup.moe)
    blocks = setup.model.n_layers * tokens * setup.model.d_model * 2
    assert c["activations"] - blocks >= tokens * V * 2  # the saved logits, beside the block inputs
    assert memory["moments"]["loss_backward"] >= c["params_sharded"] + c["activations"] + c["logits_grad"]
    assert profile.kept(1, tokens, True) == c["activations"]


def test_fp32_precision_and_one_gpu():
    """What the FSDP work compares a CPU step with: 32-true on one or two processes."""
    kwargs = dict(gpus=1, micro_batch=2, seq_len=64, checkpointing=False)
    bf16 = scaling.predict_memory(SMALL, SMALL_MOE, precision="bf16-mixed", **kwargs)["components"]
    fp32 = scaling.predict_memory(SMALL, SMALL_MOE, precision="32-true", **kwargs)["components"]
    split = scaling.parameter_split(SMALL, SMALL_MOE)
    assert fp32["params_unsharded"] == 2 * bf16["params_unsharded"]
    assert fp32["block_grads_unsharded"] == 4 * split["block"]  # fp32 gradients: no bf16 copy to cast
    assert bf16["block_grads_unsharded"] == 6 * split["block"]
    assert fp32["params_sharded"] == bf16["params_sharded"] == 4 * param_counts(SMALL, SMALL_MOE)["total_params"]
    assert fp32["activations"] > bf16["activations"]
    assert fp32["activations"] == scaling.saved_bytes(scaling.build_model(SMALL, SMALL_MOE, "fp32"), 2, 64)
    assert scaling.comm_bytes_per_micro_batch(split, 1, "32-true") == 0
    at2 = scaling.predict_memory(SMALL, SMALL_MOE, precision="32-true", **{**kwargs, "gpus": 2})["components"]
    assert at2["optimizer_states"] * 2 == fp32["optimizer_states"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_largest_micro_batch_fits_and_one_more_does_not(checkpointing):
    setup = preset("paper_8x3.7b")
    capacity = (80 - 4) * scaling.GIB
    kwargs = dict(gpus=64, seq_len=4096, checkpointing=checkpointing)
    largest = scaling.max_micro_batch(setup.model, setup.moe, capacity=capacity, **kwargs)
    assert largest >= 1
    assert scaling.predict_memory(setup.model, setup.moe, micro_batch=largest, **kwargs)["peak"] <= capacity
    assert scaling.predict_memory(setup.model, setup.moe, micro_batch=largest + 1, **kwargs)["peak"] > capacity


def test_ep_threshold_formula():
    """bf16 without checkpointing: EP moves fewer bytes below 3 E F / k tokens per micro-batch, times the ratio of
    the two collectives' (N-1)/N factors."""
    setup = preset("paper_8x3.7b")
    ep = scaling.ep_bytes(setup.model, setup.moe, gpus=64, micro_batch=2, seq_len=4096, n_micro=8,
                          checkpointing=False, precision="bf16-mixed")
    E, F, k = 8, setup.model.d_ff, 2
    assert ep["breakeven_tokens_per_micro_batch"] == pytest.approx(3 * E * F / k * (63 / 64) / (7 / 8))
    assert ep["pays"] == (2 * 4096 < ep["breakeven_tokens_per_micro_batch"])


def test_command_prints_a_table_and_json_last(capsys):
    assert scaling.main(["experiment=paper_8x3.7b", "gpus=64", "gpu_mem_gib=80"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| quantity | value |")
    result = json.loads(out[-1])
    for key in ("gpus", "gpu_mem_gib", "total_params", "activation_bytes_per_token", "max_micro_batch",
                "micro_batch", "checkpointing", "fits", "memory", "comm_bytes_per_step", "compute_s", "comm_s",
                "step_s", "step_s_no_overlap", "run_days", "run_days_no_overlap", "throughput", "ep", "init_host"):
        assert key in result, key
    assert result["gpus"] == 64 and result["fits"] and result["micro_batch"] >= 1
    assert result["throughput"].startswith("assumed mfu=0.35")
    assert set(result["memory"]) >= {"peak", "params", "grads", "optimizer", "activations", "moments"}
    parts = sum(result["memory"][k] for k in ("params", "grads", "optimizer", "activations"))
    assert parts == pytest.approx(result["memory"]["peak"])
    assert result["step_s"] == max(result["compute_s"], result["comm_s"])
    assert result["ep"]["pays_from_gpus"] is not None
    # train.activation_checkpointing=true in the config is what auto plans with
    assert scaling.main(["experiment=paper_8x3.7b", "gpus=64", "train.activation_checkpointing=true"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpointing"] is True
    # a measured throughput replaces the assumed MFU, and the output says so
    assert scaling.main(["experiment=paper_8x3.7b", "gpus=64", "tokens_per_s=2000"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["throughput"] == "measured tokens_per_s=2000 per GPU"
    assert result["compute_s"] == pytest.approx(16 * 4096 / 2000)


@pytest.mark.parametrize("args, words", [
    (["gpus=0"], ["gpus=0", "at least 1"]),
    (["gpus_typo=3"], ["gpus_typo", "did you mean gpus", "scaling knobs are"]),
    (["gpus=abc"], ["gpus='abc'", "int"]),
    (["experiment=paper_8x3.7b", "gpus=48"], ["gpus=48", "divides the batch"]),
    (["experiment=paper_8x3.7b", "gpus=64", "micro_batch=3"], ["micro_batch=3", "divisor of 16"]),
    (["experiment=paper_8x3.7b", "gpus=64", "micro_batch=0"], ["micro_batch=0", "divisor of 16"]),
    (["train.batch_sise=3"], ["batch_sise"]),
])
def test_bad_arguments_are_one_error_line(args, words, capsys):
    assert scaling.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_command_line_error_exits_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "dropup.scaling", "gpus_typo=3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]


def test_docs_tables_equal_the_command_output():
    """docs/scaling.md's generated section is what `python -m dropup.scaling --docs` writes now."""
    text = scaling.DOCS.read_text()
    begin, end = text.index(scaling.BEGIN) + len(scaling.BEGIN), text.index(scaling.END)
    assert text[begin:end].strip("\n") == scaling.docs_section(), \
        "docs/scaling.md is stale (the model's saved bytes or the plan changed): run python -m dropup.scaling --docs"
    assert "## Measured on this machine" in text
