"""The benchmark scripts run end to end at tiny shapes on the CPU (the GPU suite included), so a device run
finds them working; their figures are not checked here."""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.vocab_size=256", "model.n_heads=2",
        "model.n_kv_heads=1"]


def run_in_process(capsys, monkeypatch, script: str, *args) -> list[dict]:
    """A benchmark run as `python <script> <args>` would, in this process: a new interpreter's imports would cost
    more than the smoke test itself. The runs a memory benchmark measures are still processes of their own."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:  # `raise SystemExit(main())`: only a failure's code matters
        assert exit_.code in (0, None), exit_.code
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_the_gpu_suite_runs_on_the_cpu_at_tiny_shapes(capsys, monkeypatch):
    overrides = [arg for o in TINY for arg in ("--override", o)]
    lines = run_in_process(capsys, monkeypatch, "benchmarks/train_step.py", "--suite", "gpu", "--device", "cpu", "--precision", "fp32",
                           "--seq-len", "16", "--batch-size", "2", "--reps", "1", "--warmup", "1", "--gemm-n", "128",
                           *overrides)
    configs, summary = lines[:-1], lines[-1]
    assert [c["config"] for c in configs] == ["152m-dense", "8x152m-moe", "1.5b-6L-dense", "8x1.5b-6L-moe"]
    for line in configs:
        assert line["tokens_per_s"] > 0 and line["hf_tokens_per_s"] > 0 and line["mfu"] > 0
        assert line["speedup_vs_hf"] == round(line["tokens_per_s"] / line["hf_tokens_per_s"], 3)
    moe = configs[1]
    assert moe["total_params"] > moe["active_params"]  # the MoE config really is one
    assert moe["hf_eager_tokens_per_s"] > 0 and moe["hf_experts_implementation"]
    assert "hf_eager_tokens_per_s" not in configs[0]
    assert set(summary["moe_mfu_vs_dense"]) == {"152m", "1.5b-6L"}


def test_the_cpu_step_benchmark_compares_moe_with_dense(capsys, monkeypatch):
    overrides = [arg for o in TINY for arg in ("--override", o)]
    (result,) = run_in_process(capsys, monkeypatch, "benchmarks/train_step.py", "--model", "small", "--moe", "mixtral", "--compare-dense",
                               "--precision", "fp32", "--seq-len", "16", "--batch-size", "2", "--reps", "1",
                               "--warmup", "1", "--gemm-n", "128", *overrides)
    assert result["moe_vs_dense"] == round(result["moe"]["mfu"] / result["dense"]["mfu"], 3)


def test_the_layer_benchmark_checks_every_fallback_against_grouped(capsys, monkeypatch):
    (result,) = run_in_process(capsys, monkeypatch, "benchmarks/moe_layer.py", "--tokens", "64", "--d-model", "32", "--d-ff", "48",
                               "--dtype", "fp32", "--reps", "1", "--warmup", "1", "--skew", "1",
                               "--also", "sliced,padded,loop")
    for backend in ("sliced", "padded", "loop"):
        assert result[f"ours_{backend}_max_abs_diff"] < 1e-5
        assert result[f"ours_{backend}_ms"] > 0
    assert result["tokens_per_expert_max_over_mean"] > 1.2  # the skew made loads uneven


def test_the_step_memory_benchmark_measures_and_predicts(store, capsys, monkeypatch):
    # one configuration (checkpointing on: the path with more to get wrong) of the default two
    overrides = ["model=tiny", "model.vocab_size=512", "data=fixture", *store]
    lines = run_in_process(capsys, monkeypatch, "benchmarks/step_memory.py", "--ranks", "1", "--checkpointing", "on",
                           "--steps", "1", "--batch", "4", "--micro-batch", "2",
                           *[arg for o in overrides for arg in ("--override", o)])
    assert [(line["ranks"], line["checkpointing"]) for line in lines] == [(1, True)]
    for line in lines:
        assert line["measured_gib"] > 0 and line["predicted_gib"] > 0 and line["micro_batch"] == 2
        assert line["predicted_total_gib"] > line["predicted_gib"]  # the parameter shards were resident already


def test_the_init_memory_benchmark_measures_and_compares_with_one_process(store, capsys, monkeypatch):
    # a 2-layer synthetic seed, FSDP on one process against the single-process init (no FSDP)
    reference, line = run_in_process(capsys, monkeypatch, "benchmarks/init_memory.py", "--ranks", "1", "--layers", "2",
                                     "--d-model", "32", "--d-ff", "64", "--vocab", "512",
                                     *[a for o in store for a in ("--override", o)])
    assert reference["reference"] == "single process, no FSDP" and reference["peak_init_gib"] > 0
    assert line["ranks"] == 1 and line["matches_single_process"] is True and line["goal"] == 1.3
    assert line["moe_state_gib"] == reference["moe_state_gib"] > 0 and line["per_rank_gib"] == [line["peak_init_gib"]]
