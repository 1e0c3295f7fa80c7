"""dropup-upcycle: tiny Llama checkpoints (built from configs, no downloads) converted to Mixtral and checked."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dropup import shards, upcycle
from dropup.upcycle import convert as upcycle_convert, output as upcycle_output
from dropup.config import ModelConfig, MoEConfig
from dropup.hf import from_hf, hf_config, to_hf
from dropup.init import STRATEGIES, build_moe_state
from dropup.model import Transformer

MODEL = ModelConfig(name="t", vocab_size=97, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2)
MOE = MoEConfig(enabled=True, num_experts=8, top_k=2)


def save_llama(path: Path, seed: int, shard: str | None = None, model: ModelConfig = MODEL) -> Path:
    """A tiny HF Llama directory (random weights from `seed`), sharded when `shard` is given, with a tokenizer."""
    from tokenizers import Tokenizer, models

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(hf_config(model, bos_token_id=1, eos_token_id=2))
    llama.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> list[Path]:
    """Four dense models of one architecture; the first is sharded (50 KB shards, with an index)."""
    root = tmp_path_factory.mktemp("dense")
    return [save_llama(root / f"llama{i}", seed=i, shard="50KB" if i == 0 else None) for i in range(4)]


def run(*args) -> int:
    return upcycle.main([str(a) for a in args])


def convert(dense_dirs, out: Path, *args) -> Path:
    rc = run(*[x for d in dense_dirs for x in ("--dense", d)], "--out", out, *args)
    assert rc == 0
    return out


def hf_state(directory: Path) -> dict:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def tokens(n=2, seq=16):
    return torch.randint(0, MODEL.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


CASES = {  # id: (CLI options, strategy, number of dense models)
    "scratch": (["--init", "scratch"], STRATEGIES["scratch"](), 1),
    "naive": (["--init", "naive"], STRATEGIES["naive"](), 1),
    "drop-shared": (["--init", "drop", "--ratio", "0.5"], STRATEGIES["drop"](ratio=0.5), 1),
    "drop-per-matrix": (["--init", "drop", "--ratio", "0.5", "--index-mode", "per-matrix"],
                        STRATEGIES["drop"](ratio=0.5, index_mode="per_matrix"), 1),
    "noise": (["--init", "noise", "--ratio", "0.25"], STRATEGIES["noise"](ratio=0.25), 1),
    "btx": (["--init", "btx"], STRATEGIES["btx"](), 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converter_writes_exactly_what_build_moe_state_builds_and_transformers_loads_it(dense, tmp_path, case):
    options, strategy, n = CASES[case]
    out = convert(dense[:n], tmp_path / "moe", *options, "--seed", "3", "--shard-size", "60KB")
    written = from_hf(hf_state(out))
    sources = [] if case == "scratch" else [from_hf(hf_state(d)) for d in dense[:n]]
    expected = build_moe_state(strategy, sources, MODEL, MOE, seed=3)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert len(list(out.glob("model-*.safetensors"))) > 1  # really sharded
    config = json.loads((out / "config.json").read_text())
    assert (config["router_aux_loss_coef"], config["output_router_logits"]) == (0.02, True)
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["eos_token_id"]) == (8, 2, 2)
    assert (out / "tokenizer.json").read_bytes() == (dense[0] / "tokenizer.json").read_bytes()
    assert not list(out.glob(".*")) and not list(out.glob("*.partial"))
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.isfinite(moe(tokens()).logits).all()


@pytest.mark.parametrize("options", [["--init", "naive"], ["--init", "drop", "--ratio", "0"]], ids=["naive", "drop-r0"])
def test_r0_mixtral_logits_equal_the_llama_logits(dense, tmp_path, options):
    out = convert(dense[:1], tmp_path / "moe", *options)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    llama = AutoModelForCausalLM.from_pretrained(dense[0], dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert_close(moe(x).logits, llama(x).logits)


def expert_matrices(state, layer, e):
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
    return state[prefix + "w1.weight"], state[prefix + "w3.weight"], state[prefix + "w2.weight"].t()


def decode(bitmask: str, size: int) -> list[int]:
    import base64

    import numpy as np

    bits = np.unpackbits(np.frombuffer(base64.b64decode(bitmask), dtype=np.uint8), bitorder="little")[:size]
    return np.nonzero(bits)[0].tolist()


@pytest.mark.parametrize("mode", ["shared", "per-matrix"])
def test_drop_properties_hold_on_the_written_files_and_match_the_manifest(dense, tmp_path, mode):
    r = 0.3
    out = convert(dense[:1], tmp_path / "moe", "--init", "drop", "--ratio", r, "--index-mode", mode)
    state, source = hf_state(out), hf_state(dense[0])
    manifest = json.loads((out / upcycle.MANIFEST).read_text())
    n = math.floor(r * MODEL.d_ff)
    assert manifest["reinitialized"]["count"] == n
    for layer in range(MODEL.n_layers):
        dense_ffn = [source[f"model.layers.{layer}.mlp.{w}_proj.weight"] for w in ("gate", "up")] + \
                    [source[f"model.layers.{layer}.mlp.down_proj.weight"].t()]
        for e in range(MOE.num_experts):
            changed = [upcycle.changed_neurons(new, old).tolist()
                       for new, old in zip(expert_matrices(state, layer, e), dense_ffn)]
            assert [len(c) for c in changed] == [n, n, n]
            recorded = manifest["reinitialized"]["layers"][layer][e]
            if mode == "shared":
                assert changed[0] == changed[1] == changed[2] == decode(recorded["gate_up_down"], MODEL.d_ff)
            else:
                assert changed == [decode(recorded[m], MODEL.d_ff) for m in ("gate", "up", "down")]
                assert changed[0] != changed[1]
    # every tensor's checksum in the manifest is that of its bytes in the file
    for entry in manifest["tensors"][:5]:
        _, digests = shards.file_digests(out / entry["file"])
        assert digests[entry["name"]] == entry["sha256"]


def test_btx_from_four_models_places_each_ffn_and_averages_the_rest(dense, tmp_path):
    out = convert(dense, tmp_path / "moe", "--init", "btx")
    state, sources = hf_state(out), [hf_state(d) for d in dense]
    for e in range(MOE.num_experts):
        gate, _, down_t = expert_matrices(state, 1, e)
        assert torch.equal(gate, sources[e // 2]["model.layers.1.mlp.gate_proj.weight"])
        assert torch.equal(down_t.t(), sources[e // 2]["model.layers.1.mlp.down_proj.weight"])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert_close(state[name], torch.stack([s[name] for s in sources]).mean(0))


def test_both_layouts_load_and_compute_the_same_function(dense, tmp_path):
    x = tokens()
    logits = []
    for layout in ("per-expert", "stacked", "fused"):  # fused: stacked's older name
        out = convert(dense[:1], tmp_path / layout, "--init", "drop", "--layout", layout)
        names = set(json.loads((out / upcycle.INDEX).read_text())["weight_map"])
        assert ("model.layers.0.mlp.experts.gate_up_proj" in names) == (layout != "per-expert")
        with torch.no_grad():
            logits.append(AutoModelForCausalLM.from_pretrained(out).eval()(x).logits)
    assert_close(logits[0], logits[1])
    assert files_of(tmp_path / "stacked") == files_of(tmp_path / "fused")


def test_dtype_and_fine_grained_options(dense, tmp_path):
    out = convert(dense[:1], tmp_path / "moe", "--init", "naive", "--dtype", "bf16", "--granularity", "2",
                  "--experts", "4")
    state = hf_state(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    w1 = state["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    assert torch.equal(w1, hf_state(dense[0])["model.layers.0.mlp.gate_proj.weight"][32:].bfloat16())
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 32
    AutoModelForCausalLM.from_pretrained(out)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the converter catches it."""


def _kill_after(monkeypatch, cls, method, calls):
    original = getattr(cls, method)
    seen = [0]

    def dying(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] > calls:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, dying)


def _kill_before_config(patch):
    original = upcycle_output.atomic_write

    def dying(path, data):
        if path.name == "config.json":
            raise Killed
        original(path, data)

    patch.setattr(upcycle_output, "atomic_write", dying)


@pytest.mark.parametrize("where", ["after-2-shards", "inside-a-shard", "before-recording-a-shard",
                                   "before-config-json"])
def test_a_killed_conversion_resumes_to_byte_identical_files(dense, tmp_path, monkeypatch, where):
    args = ("--init", "drop", "--ratio", "0.5", "--shard-size", "60KB", "--seed", "1")
    clean = convert(dense[:1], tmp_path / "clean", *args)
    with monkeypatch.context() as patch:
        if where == "after-2-shards":
            _kill_after(patch, upcycle_output.Progress, "record", 2)
        elif where == "inside-a-shard":
            _kill_after(patch, shards.ShardWriter, "write", 20)
        elif where == "before-recording-a-shard":  # renamed into place, not yet in the progress file
            _kill_after(patch, upcycle_output.Progress, "record", 1)
        else:  # every shard, the manifest and the index are written
            _kill_before_config(patch)
        with pytest.raises(Killed):
            run("--dense", dense[0], "--out", tmp_path / "resumed", *args)
    partial = tmp_path / "resumed"
    assert (partial / upcycle.PROGRESS).is_file() and not (partial / "config.json").exists()
    if where == "inside-a-shard":
        assert list(partial.glob("*.partial"))
    assert convert(dense[:1], partial, *args)
    assert files_of(partial) == files_of(clean)


def test_partial_output_with_other_arguments_and_complete_output_need_force(dense, tmp_path, monkeypatch, capsys):
    out = tmp_path / "moe"
    with monkeypatch.context() as patch:
        _kill_after(patch, upcycle_output.Progress, "record", 1)
        with pytest.raises(Killed):
            run("--dense", dense[0], "--out", out, "--init", "drop", "--shard-size", "60KB")
    capsys.readouterr()
    assert run("--dense", dense[0], "--out", out, "--init", "naive", "--shard-size", "60KB") == 2
    err = capsys.readouterr().err
    assert "unfinished conversion with other arguments" in err and "init: 'drop' -> 'naive'" in err
    assert "--force" in err
    convert(dense[:1], out, "--init", "naive", "--force")
    assert run("--dense", dense[0], "--out", out, "--init", "naive") == 2
    assert "already holds a converted model" in capsys.readouterr().err
    convert(dense[:1], out, "--init", "naive", "--force")


def test_dropup_run_directory_as_input(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    dense_model = Transformer(MODEL).eval()
    save_file(dense_model.state_dict(), str(run_dir / "model.safetensors"))
    from omegaconf import OmegaConf

    OmegaConf.save({"model": MODEL.__dict__, "moe": {"enabled": False}}, run_dir / "config.yaml")
    (run_dir / "results.json").write_text(json.dumps({"status": "completed"}))
    out = convert([run_dir], tmp_path / "moe", "--init", "naive", "--verify")
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        assert_close(moe(x).logits, dense_model(x).logits)


def test_verify_reports_the_reinitialized_share_and_r0_logits(dense, tmp_path, capsys):
    convert(dense[:1], tmp_path / "drop", "--init", "drop", "--ratio", "0.25", "--verify")
    out = capsys.readouterr().out
    assert "0.2500   0.2500   0.2500" in out and "OK: in every layer" in out and "FAIL" not in out
    convert(dense[:1], tmp_path / "naive", "--init", "naive", "--verify")
    out = capsys.readouterr().out
    assert "OK: logits of the MoE equal the dense model's" in out and "Upcycled" in out


def test_verify_passes_a_permuted_r0_drop_by_its_function(dense, tmp_path, capsys):
    """drop r=0 with shuffle: each expert is the dense FFN with its neurons relabelled, so the MoE computes the
    dense function while its weights, compared neuron by neuron with the dense ones, differ."""
    out = convert(dense[:1], tmp_path / "shuffled", "--init", "drop", "--ratio", "0", "--shuffle", "--verify")
    text = capsys.readouterr().out
    assert "OK: every expert's output equals its dense FFN slice's" in text
    assert "OK: logits of the MoE equal the dense model's" in text and "FAIL" not in text
    # the plausible wrong check, neuron by neuron against the dense FFN as it is, would fail here
    gate_name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"  # Mixtral's per-expert W_gate
    written, source = hf_state(out)[gate_name], hf_state(dense[0])["model.layers.0.mlp.gate_proj.weight"]
    assert upcycle.changed_neurons(written, source).numel() > 0


def _not_llama(d: Path):
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(config))


def _drop_shard(d: Path):
    next(d.glob("model-*.safetensors")).unlink()


def _truncate_shard(d: Path):
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _pickled(d: Path):
    for f in d.glob("*.safetensors*"):
        f.unlink()
    torch.save({}, d / "pytorch_model.bin")


DROP = ["--init", "drop"]


@pytest.mark.parametrize("damage,options,message", [
    (_not_llama, DROP, "model_type='gpt2' is not supported"),
    (_drop_shard, DROP, "listed in model.safetensors.index.json is missing"),
    (_truncate_shard, DROP, "truncated or corrupt"),
    (_pickled, DROP, "never unpickles"),
    (None, [*DROP, "--ratio", "1.5"], r"ratio=1.5 is outside \[0, 1\]"),
    (None, ["--init", "naive", "--ratio", "0.5"], "--ratio applies to --init drop and noise only"),
    (None, [*DROP, "--router-init", "gauss"], "router init 'gauss' is not understood"),
    (None, ["--init", "btx", "--experts", "6"], "btx with 4 dense models cannot fill 6"),
    (None, [*DROP, "--granularity", "3", "--experts", "6"], "--granularity=3 does not divide model.d_ff=64"),
    (None, [*DROP, "--top-k", "9"], "--top-k=9 must be between 1 and --experts=8"),
], ids=["not-llama", "missing-shard", "truncated-shard", "bin-checkpoint", "ratio", "ratio-for-naive",
        "router", "btx-count", "granularity", "top-k"])
def test_bad_input_gives_one_clear_error_and_leaves_nothing(dense, tmp_path, capsys, damage, options, message):
    src = save_llama(tmp_path / "llama", seed=0, shard="50KB")
    if damage is not None:
        damage(src)
    dirs = [src, *dense[1:]] if "btx" in options else [src]
    assert run(*[x for d in dirs for x in ("--dense", d)], "--out", tmp_path / "moe", *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "moe").exists()


def test_btx_models_of_different_shapes_are_refused(dense, tmp_path, capsys):
    wider = save_llama(tmp_path / "wider", seed=9, model=ModelConfig(**{**MODEL.__dict__, "d_ff": 128}))
    assert run("--dense", dense[0], "--dense", wider, "--out", tmp_path / "moe", "--init", "btx") == 2
    err = capsys.readouterr().err
    assert "differs from --dense" in err and "d_ff=128 (vs 64)" in err and err.count("\n") == 1


def test_a_tensor_with_no_place_in_llama_is_refused(dense, tmp_path, capsys):
    src = save_llama(tmp_path / "llama", seed=0)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert run("--dense", src, "--out", tmp_path / "moe", "--init", "naive") == 2
    assert "model.layers.0.mlp.extra.weight is not part of a dense llama model" in capsys.readouterr().err


def test_an_output_directory_with_foreign_files_is_never_touched(dense, tmp_path, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run("--dense", dense[0], "--out", out, "--init", "naive", "--force") == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_written_shards_are_valid_safetensors_for_the_reference_reader(dense, tmp_path):
    out = convert(dense[:1], tmp_path / "moe", "--init", "noise", "--dtype", "bf16")
    for file in out.glob("model-*.safetensors"):
        loaded = load_file(file)  # safetensors' own validation of header, offsets and size
        assert loaded and all(t.dtype == torch.bfloat16 for t in loaded.values())
    reference = to_hf(build_moe_state(STRATEGIES["noise"](), [from_hf(hf_state(dense[0]))], MODEL, MOE, 0,
                                      torch.bfloat16), MOE, layout="per-expert")
    written = hf_state(out)
    assert written.keys() == reference.keys() and all(torch.equal(written[k], reference[k]) for k in reference)


def test_the_lazy_reader_reads_nothing_to_check_shapes_or_membership(dense):
    reader = upcycle.open_dense(dense[0]).reader()
    from dropup.init.shapes import check_sources

    check_sources([reader], MODEL)
    assert "tok_emb.weight" in reader and "nothing" not in reader
    assert reader.consumed_names() == frozenset()
    assert reader["norm.weight"].shape == (MODEL.d_model,)
    assert reader.consumed_names() == {"norm.weight"}


def test_out_overlapping_a_dense_directory_is_refused_even_with_force(dense, tmp_path, capsys):
    src = save_llama(tmp_path / "llama", seed=0)
    before = files_of(src)
    assert run("--dense", src, "--out", src, "--init", "naive", "--force") == 2
    assert "overlaps --dense" in capsys.readouterr().err
    other = save_llama(tmp_path / "other-model", seed=1)  # a model this tool did not write: never replaced
    assert run("--dense", src, "--out", other, "--init", "naive", "--force") == 2
    assert "did not write" in capsys.readouterr().err
    assert files_of(src) == before and (other / "model.safetensors").is_file()


@pytest.mark.parametrize("direct", [True, False])
def test_streamed_shards_read_back_exactly_with_safetensors(tmp_path, monkeypatch, direct):
    """Direct (page-aligned blocks, padded tail, truncated back) or buffered: safetensors reads every tensor back."""
    monkeypatch.setattr(shards.DirectFile, "STAGE", 2 * shards.DirectFile.ALIGN)  # many block writes
    tensors = {"a": torch.randn(3, 1000), "b": torch.randn(7).bfloat16(), "c": torch.randn(64, 65)}
    planned = [shards.PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = shards.ShardWriter(tmp_path / "ours.safetensors", planned, direct=direct)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    _, digests = shards.file_digests(tmp_path / "ours.safetensors")
    assert digests == dict(zip(tensors, writer.digests))


def test_a_target_tensor_never_produced_fails_and_nothing_looks_complete(dense, tmp_path, monkeypatch, capsys):
    original = upcycle_convert.moe_tensors

    def losing_one(*args, **kwargs):
        return ((name, t) for name, t in original(*args, **kwargs) if name != "layers.1.attn.wo.weight")

    monkeypatch.setattr(upcycle_convert, "moe_tensors", losing_one)
    assert run("--dense", dense[0], "--out", tmp_path / "moe", "--init", "naive") == 1
    err = capsys.readouterr().err
    assert "the next planned tensor is model.layers.1.self_attn.o_proj.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "moe" / "config.json").exists()


def test_a_source_tensor_never_read_fails_the_accounting(dense, tmp_path, monkeypatch, capsys):
    original = shards.CheckpointReader.consumed_names
    monkeypatch.setattr(shards.CheckpointReader, "consumed_names",
                        lambda self: original(self) - {"layers.0.ffn_norm.weight"})
    assert run("--dense", dense[0], "--out", tmp_path / "moe", "--init", "naive") == 1
    assert "tensor layers.0.ffn_norm.weight (and 0 more) was never used" in capsys.readouterr().err
    assert not (tmp_path / "moe" / "config.json").exists()


def test_verify_compares_in_the_output_dtype(dense, tmp_path, capsys):
    convert(dense[:1], tmp_path / "drop", "--init", "drop", "--ratio", "0.5", "--dtype", "bf16", "--verify",
            "--index-mode", "per-matrix", "--layout", "fused")
    out = capsys.readouterr().out
    assert "0.5000   0.5000   0.5000" in out and "OK: in every layer" in out and "FAIL" not in out
    convert(dense[:1], tmp_path / "naive", "--init", "naive", "--dtype", "bf16", "--verify")
    out = capsys.readouterr().out
    assert "OK: logits of the MoE equal the dense model's" in out and "FAIL" not in out
