"""The static memory model (dropup/memory.py): its terms, and the start-of-run check naming the setting to change."""

from dataclasses import replace

import pytest

from dropup.config import ModelConfig, MoEConfig
from dropup.flops import param_counts
from dropup.memory import GIB, Available, RunShape, check_fits, init_host_memory, predict

# Llama 3.1 8B's shape (conf/model/8b.yaml) upcycled to 8 experts: 47.5B parameters
BIG = ModelConfig(vocab_size=128256, n_layers=32, d_model=4096, d_ff=14336, n_heads=32, n_kv_heads=8)
MOE = MoEConfig(enabled=True, num_experts=8, top_k=2)
P = param_counts(BIG, MOE)["total_params"]
GPU_RUN = RunShape(ranks=64, ranks_per_node=8, sharded=True, on_gpu=True, precision="bf16-mixed", micro_batch=1,
                   seq_len=4096, rank_batch=16)


def peak(kind: str, run=GPU_RUN, **changes) -> float:
    return predict(BIG, MOE, replace(run, **changes))[kind]


def test_init_host_memory_is_the_shards_plus_one_layers_expert_block_and_their_dense_source():
    layer, expert = 4 * 3 * 8 * 4096 * 14336, 4 * 3 * 4096 * 14336  # w_gate_up and w_down, fp32
    one = init_host_memory(BIG, MOE, ranks=1)
    assert one["params"] == 4 * P
    assert one["full_tensor"] == layer + expert  # the whole layer as the block, and the expert being built
    assert one["dense_buffer"] == 4 * 3 * 4096 * 14336  # the seed's gate, up and down
    two = init_host_memory(BIG, MOE, ranks=2)
    assert two["full_tensor"] == layer / 2 + expert  # a rank builds only its block of the layer's experts
    previous = one["total"]
    for ranks in (2, 8, 64):
        r = init_host_memory(BIG, MOE, ranks=ranks)
        assert ranks * r["params"] == pytest.approx(4 * P)  # the shards sum to the state over the ranks
        assert r["total"] < previous  # falls with the rank count
        previous = r["total"]
    embedding = init_host_memory(BIG, MOE, ranks=64)
    assert embedding["full_tensor"] == 4 * 128256 * 4096  # many ranks: the whole embedding is the largest unit
    unsharded = init_host_memory(BIG, MOE, ranks=64, sharded=False)
    assert unsharded["params"] == 4 * P and unsharded["full_tensor"] == layer  # the whole model; a whole layer
    dense = init_host_memory(BIG, None, ranks=1, dense_sources=0)
    assert dense["full_tensor"] == 4 * 128256 * 4096 and dense["dense_buffer"] == 0  # the embedding, from scratch


def test_training_states_shard_only_under_fsdp():
    sharded = predict(BIG, MOE, GPU_RUN)["states"]
    whole = predict(BIG, MOE, replace(GPU_RUN, sharded=False))["states"]
    assert whole["params"] + whole["grads"] + whole["optimizer"] == 16 * P
    assert sharded["params"] + sharded["grads"] + sharded["optimizer"] == pytest.approx(16 * P / 64)
    # under fsdp the gathered bf16 working copies exist; without it they do not
    assert sharded["working_copies"] > 0 and "working_copies" not in whole


def test_a_run_that_fits_passes():
    assert check_fits(BIG, MOE, GPU_RUN, Available(host=1024 * GIB, device=80 * GIB)) is None
    assert check_fits(BIG, MOE, GPU_RUN, Available()) is None  # nothing known: nothing to say


def _one_line(message):
    assert message is not None and "\n" not in message
    return message


def test_unsharded_states_name_trainer_fsdp():
    run = replace(GPU_RUN, sharded=False)
    message = _one_line(check_fits(BIG, MOE, run, Available(device=80 * GIB)))
    assert "GPU memory" in message and message.endswith("set trainer=fsdp (it shards the training states and the "
                                                         "initial weights over the 64 ranks)")


def test_too_few_gpus_names_the_fewest_that_fit():
    run = replace(GPU_RUN, ranks=8)
    message = _one_line(check_fits(BIG, MOE, run, Available(device=80 * GIB)))
    needed = int(message.rsplit("at least ", 1)[1].split(" GPUs")[0])
    assert peak("device_peak", ranks=needed) <= 80 * GIB < peak("device_peak", ranks=needed - 1)  # the fewest
    assert "trainer.devices x trainer.num_nodes" in message


def test_large_activations_name_a_smaller_micro_batch():
    # 16 x 4096 tokens: the logits and their gradient alone are 2 x 16 x 4096 x 128256 x 2 bytes = 31 GiB
    run = replace(GPU_RUN, micro_batch=16)
    message = _one_line(check_fits(BIG, MOE, run, Available(device=60 * GIB)))
    micro = int(message.rsplit("train.micro_batch_size=", 1)[1])
    assert 16 % micro == 0  # the largest divisor that fits:
    assert peak("device_peak", micro_batch=micro) <= 60 * GIB < peak("device_peak", micro_batch=2 * micro)


def test_host_at_initialization_counts_every_rank_on_the_node():
    # 8 ranks on a node, each holding its share of the state plus the largest unit, the whole embedding and its
    # source (3.9 GiB): one node would hold the whole state (4P = 177 GiB) plus 8 units (31 GiB); two nodes
    # halve the state per node (89 + 31 GiB), which fits a 128 GiB host
    message = _one_line(check_fits(BIG, MOE, replace(GPU_RUN, ranks=8), Available(host=128 * GIB)))
    assert "host memory" in message and "at initialization" in message and "8 rank(s) on this node" in message
    nodes = int(message.split("trainer.num_nodes=")[1].split()[0])
    assert nodes == 2 and peak("host_peak_per_node", ranks=8 * nodes) <= 128 * GIB \
        < peak("host_peak_per_node", ranks=8 * (nodes - 1))


def test_cpu_runs_hold_training_on_the_host():
    small = ModelConfig(vocab_size=512, n_layers=2, d_model=64, d_ff=128, n_heads=2, n_kv_heads=2)
    run = RunShape(ranks=2, ranks_per_node=2, sharded=False, micro_batch=4, seq_len=64, rank_batch=4)
    p = predict(small, MOE, run)
    assert p["device_peak"] is None
    assert p["host_peak"] == sum(p["states"].values()) + sum(p["activations"].values())  # more than the init
    assert p["host_peak_per_node"] == 2 * p["host_peak"]
    assert check_fits(small, MOE, run, Available(host=p["host_peak_per_node"])) is None
    message = _one_line(check_fits(small, MOE, run, Available(host=p["host_peak_per_node"] - 1)))
    assert "at training" in message and "trainer=fsdp" in message


def test_run_shape_reads_the_trainer_config_and_settings():
    run = RunShape.of({"accelerator": "gpu", "devices": 8, "num_nodes": 4, "strategy": "fsdp",
                       "precision": "bf16-mixed"}, {"micro_batch_size": 2, "seq_len": 4096, "batch_size": 1024})
    assert (run.ranks, run.ranks_per_node, run.sharded, run.on_gpu, run.rank_batch) == (32, 8, True, True, 32)
    cpu = RunShape.of({"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"},
                      {"micro_batch_size": 4, "seq_len": 64, "batch_size": 8})
    assert not cpu.sharded and not cpu.on_gpu and cpu.ranks == 1
