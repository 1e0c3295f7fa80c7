"""Shared experts (moe.shared_expert_d_ff): the layer against transformers' Qwen2-MoE, the step-0 function of every
upcycling, parameters and FLOPs against the real model, and the converter's option and its refusals."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from dropup import upcycle
from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.flops import forward_flops_per_sequence, param_counts
from dropup.hf import configs_from_hf, from_hf, hf_config, to_hf_model
from dropup.init import STRATEGIES, build_moe_state
from dropup.init import shared_expert as init_shared_expert
from dropup.init import streaming as init_streaming
from dropup.init.shared_expert import resize_ffn
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.init.noise import NoiseUpcycling
from dropup.model import Transformer
from tests.test_families import hf_dense, ours_from, randomized, tokens
from tests.test_init import WIDE, structured_dense

SMALL = ModelConfig(name="s", vocab_size=97, n_layers=2, d_model=32, d_ff=64, n_heads=4, n_kv_heads=2)


def shared_moe(d_s=64, gate=True, experts=8, top_k=2) -> MoEConfig:
    return MoEConfig(enabled=True, num_experts=experts, top_k=top_k, shared_expert_d_ff=d_s, shared_expert_gate=gate)


def logits(model_cfg, moe, state, x):
    model = Transformer(model_cfg, moe).eval()
    model.load_state_dict(state, strict=True)
    return model(x).logits


@pytest.mark.parametrize("strategy", [NaiveUpcycling(), DropUpcycling(ratio=0.0), NoiseUpcycling(ratio=0.0),
                                      DropUpcycling(ratio=0.0, shuffle=True)], ids=["naive", "drop", "noise", "shuffle"])
@pytest.mark.parametrize("moe", [shared_moe(), shared_moe(gate=False), shared_moe(d_s=96),
                                 shared_moe(d_s=128, top_k=1), shared_moe(experts=7, top_k=1)],
                         ids=["gated", "ungated", "1.5x", "2x-top1", "7-top1"])
def test_upcycled_with_a_shared_expert_computes_the_dense_function(strategy, moe):
    dense = structured_dense(SMALL)
    x = tokens(SMALL.vocab_size)
    state = build_moe_state(strategy, [dense], SMALL, moe, seed=0)
    assert_close(logits(SMALL, moe, state, x), logits(SMALL, None, dense, x), rtol=1e-5, atol=1e-5)


def test_without_the_halving_the_step0_function_is_not_the_dense_one(monkeypatch):
    """The plausible wrong variants: no folded scales (routed + shared = 1.5 FFN), or the gate's 1/2 forgotten."""
    dense = structured_dense(SMALL)
    x = tokens(SMALL.vocab_size)
    want = logits(SMALL, None, dense, x)
    for wrong in ((1.0, 1.0), (0.5, 0.5)):
        scales = lambda moe, virtual_groups=False, wrong=wrong: wrong  # noqa: E731
        # the routed experts' factor is applied while streaming, the shared expert's where it is built
        monkeypatch.setattr(init_streaming, "output_scales", scales)
        monkeypatch.setattr(init_shared_expert, "output_scales", scales)
        state = build_moe_state(NaiveUpcycling(), [dense], SMALL, shared_moe(), seed=0)
        assert (logits(SMALL, shared_moe(), state, x) - want).abs().max() > 1e-2


def test_a_narrower_shared_expert_keeps_the_first_neurons_and_is_not_the_dense_function():
    dense = structured_dense(SMALL)
    moe = shared_moe(d_s=16)
    state = build_moe_state(NaiveUpcycling(), [dense], SMALL, moe, seed=0)
    assert torch.equal(state["layers.0.ffn.shared_expert.w_gate.weight"], dense["layers.0.ffn.w_gate.weight"][:16])
    x = tokens(SMALL.vocab_size)
    assert (logits(SMALL, moe, state, x) - logits(SMALL, None, dense, x)).abs().max() > 1e-3


@pytest.mark.parametrize("width", [64, 80, 128, 200])
def test_resize_keeps_the_ffn_function_for_any_wider_width(width):
    dense = structured_dense(SMALL)
    gate, up, down = (dense[f"layers.0.ffn.{w}.weight"] for w in ("w_gate", "w_up", "w_down"))
    x = torch.randn(10, SMALL.d_model)
    ffn = lambda g, u, d: (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T  # noqa: E731
    g2, u2, d2 = resize_ffn(gate, up, down, width)
    assert g2.shape == (width, SMALL.d_model) and d2.shape == (SMALL.d_model, width)
    assert_close(ffn(g2, u2, d2), ffn(gate, up, down), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_drop_reinitializes_routed_experts_only_and_the_shared_expert_is_the_dense_ffn(ratio):
    """DU with a shared expert = DU without one (same seed: same index sets and draws, from the unscaled dense
    sub-blocks), with the routed W_down halved; the shared expert is the dense FFN untouched, its gate 0."""
    dense = structured_dense(WIDE)
    moe = shared_moe(d_s=WIDE.d_ff)
    plain = MoEConfig(enabled=True, num_experts=8, top_k=2)
    with_shared = build_moe_state(DropUpcycling(ratio=ratio), [dense], WIDE, moe, seed=4)
    without = build_moe_state(DropUpcycling(ratio=ratio), [dense], WIDE, plain, seed=4)
    for layer in range(WIDE.n_layers):
        p = f"layers.{layer}.ffn."
        assert torch.equal(with_shared[p + "w_gate_up"], without[p + "w_gate_up"])
        assert torch.equal(with_shared[p + "w_down"], 0.5 * without[p + "w_down"])
        assert not torch.equal(without[p + "w_gate_up"][0, :WIDE.d_ff], dense[p + "w_gate.weight"])  # it did drop
        for ours in ("w_gate", "w_up", "w_down"):
            assert torch.equal(with_shared[f"{p}shared_expert.{ours}.weight"], dense[f"{p}{ours}.weight"])
        assert torch.equal(with_shared[p + "shared_expert_gate.weight"], torch.zeros(1, WIDE.d_model))


def test_btx_shared_expert_is_the_mean_ffn_and_scratch_draws_it_like_any_weight():
    sources = [structured_dense(SMALL, seed=s) for s in range(4)]
    moe = shared_moe()
    btx = build_moe_state(STRATEGIES["btx"](), sources, SMALL, moe, seed=0)
    mean = torch.stack([s["layers.1.ffn.w_up.weight"] for s in sources]).mean(0)
    assert_close(btx["layers.1.ffn.shared_expert.w_up.weight"], mean)
    scratch = build_moe_state(STRATEGIES["scratch"](), [], SMALL, moe, seed=0)
    for name in ("layers.0.ffn.shared_expert.w_gate.weight", "layers.0.ffn.shared_expert_gate.weight"):
        w = scratch[name]
        assert abs(w.std().item() - 0.02) < 0.02 * (0.3 if w.numel() > 1000 else 0.6) and w.abs().max() > 0
    assert scratch["layers.0.ffn.w_down"].std().item() == pytest.approx(0.02, rel=0.1)  # routed: not halved


def test_the_layer_equals_transformers_qwen2_moe_logits_and_aux_loss():
    """A random Qwen2-MoE with a real shared expert and gate: same weights -> same logits and balance loss."""
    cfg = ours_from(hf_dense("qwen2"))[1]
    moe = shared_moe(d_s=40, experts=4, top_k=2)
    torch.manual_seed(5)
    ours = randomized(Transformer(cfg, moe)).eval()
    theirs = AutoModelForCausalLM.from_config(hf_config(cfg, moe)).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_model(ours.state_dict(), cfg, moe), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    assert theirs.model.layers[0].mlp.shared_expert.down_proj.weight.shape == (cfg.d_model, 40)
    x = tokens(cfg.vocab_size)
    out, ref = ours(x), theirs(x, labels=x, output_router_logits=True)
    assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    losses = ours.losses(type(out)(out.logits[:, :-1], out.router_logits), x[:, 1:])
    assert_close(losses["lb_loss"], ref.aux_loss)
    with torch.no_grad():  # the gate counts: without it the function changes
        ours.layers[0].ffn.shared_expert_gate.weight.zero_()
    assert (ours(x).logits - out.logits).abs().max() > 1e-4


def test_upcycled_qwen2_moe_computes_the_dense_function_and_round_trips(tmp_path):
    dense = hf_dense("qwen2")
    ours, cfg = ours_from(dense)
    moe = shared_moe(d_s=cfg.d_ff, experts=4, top_k=2)
    state = build_moe_state(DropUpcycling(ratio=0.0), [ours.state_dict()], cfg, moe, seed=0)
    theirs = AutoModelForCausalLM.from_config(hf_config(cfg, moe)).eval()
    theirs.load_state_dict(to_hf_model(state, cfg, moe), strict=False)
    x = tokens(cfg.vocab_size)
    assert_close(theirs(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path)  # per expert, as transformers writes it
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == cfg.d_ff
    reread, moe_back = configs_from_hf(config)
    assert (moe_back.shared_expert_d_ff, moe_back.shared_expert_gate) == (cfg.d_ff, True)
    from safetensors.torch import load_file

    back = from_hf(load_file(tmp_path / "model.safetensors"), reread.family, reread.tie_embeddings)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_families_without_a_shared_expert_refuse_one_and_qwen2_moe_needs_the_gate():
    for case in ("llama", "mistral", "qwen3"):
        cfg = ours_from(hf_dense(case))[1]
        with pytest.raises(ConfigError, match="has no shared expert"):
            hf_config(cfg, shared_moe(d_s=cfg.d_ff))
    cfg = ours_from(hf_dense("qwen2"))[1]
    with pytest.raises(ConfigError, match="shared_expert_gate=true"):
        hf_config(cfg, shared_moe(d_s=cfg.d_ff, gate=False))


@pytest.mark.parametrize("gate", [True, False])
def test_parameter_counts_and_flops_equal_the_real_model(gate):
    moe = shared_moe(d_s=96, gate=gate, experts=7, top_k=1)
    model = Transformer(SMALL, moe)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    counts = param_counts(SMALL, moe)
    assert counts["total_params"] == sum(numel.values())
    routed = sum(v for n, v in numel.items() if ".ffn.w_gate_up" in n or ".ffn.w_down" in n)
    assert counts["active_params"] == sum(numel.values()) - routed * (moe.num_experts - moe.top_k) // moe.num_experts
    # the shared path's FLOPs, counted by torch on a forward pass, are what flops.py adds to Table 3
    seq = 16
    x = torch.randn(seq, SMALL.d_model)
    with FlopCounterMode(display=False) as counter:
        for block in model.layers:
            block.ffn.shared_expert(x)
            if block.ffn.shared_expert_gate is not None:
                block.ffn.shared_expert_gate(x)
    no_shared = MoEConfig(enabled=True, num_experts=7, top_k=1)
    added = forward_flops_per_sequence(SMALL, moe, seq) - forward_flops_per_sequence(SMALL, no_shared, seq)
    assert added == counter.get_total_flops()


def test_the_shared_preset_at_matched_parameters_equals_mixtral_counts():
    """sweeps/shared.yaml's matching: 7 routed top-1 + a gated shared expert of d_ff = mixtral's total and active."""
    mixtral = param_counts(SMALL, MoEConfig(enabled=True))
    assert param_counts(SMALL, shared_moe(d_s=SMALL.d_ff, experts=7, top_k=1)) == mixtral


def _qwen2_dir(tmp_path):
    dense = hf_dense("qwen2")
    dense.config.bos_token_id, dense.config.eos_token_id = 1, 2
    dense.save_pretrained(tmp_path / "dense")
    return dense


def test_converter_writes_a_qwen2_moe_with_a_shared_expert(tmp_path, capsys):
    dense = _qwen2_dir(tmp_path)
    ours, cfg = ours_from(dense)
    code = upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--init", "naive",
                         "--experts", "4", "--shared-expert", "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK: logits of the MoE equal the dense model's" in out and "a shared expert of width 48" in out
    assert "OK: in every layer, expert and matrix exactly the init's neuron set differs" in out
    manifest = json.loads((tmp_path / "moe" / "dropup_manifest.json").read_text())
    assert manifest["options"]["shared_expert_d_ff"] == cfg.d_ff
    x = tokens(cfg.vocab_size)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert_close(loaded(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    # at r = 0.5 and a wider shared expert the files hold exactly what run.py's init builds
    assert upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "drop"), "--init", "drop",
                         "--ratio", "0.5", "--experts", "4", "--shared-expert-d-ff", "72", "--seed", "2"]) == 0
    from safetensors.torch import load_file

    written = {k: v for f in sorted((tmp_path / "drop").glob("model-*.safetensors")) for k, v in load_file(f).items()}
    expected = build_moe_state(DropUpcycling(ratio=0.5), [ours.state_dict()], cfg, shared_moe(72, experts=4), seed=2)
    converted = from_hf(written, cfg.family)
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("case,options,message", [
    ("llama", ["--shared-expert"], "a mixtral has no shared expert, so a llama cannot be upcycled with one"),
    ("qwen3", ["--shared-expert-d-ff", "64"], "a qwen3_moe has no shared expert"),
    ("qwen2", ["--shared-expert-d-ff", "0"], "--shared-expert-d-ff 0 must be a positive width"),
])
def test_converter_refuses_a_shared_expert_where_it_cannot_be_held(case, options, message, tmp_path, capsys):
    dense = hf_dense(case)
    dense.save_pretrained(tmp_path / "dense")
    code = upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--init", "naive",
                         *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(re.escape(message), err), err
    assert "drop --shared-expert" in err or "positive width" in err
    assert not (tmp_path / "moe").exists()


def test_a_run_with_a_shared_expert_starts_as_its_seed_and_exports_as_qwen2_moe(tmp_path, store):
    """End to end through train(): naive upcycling with a shared expert starts where the dense seed ended, the
    run records the shared expert, and a Qwen2-family run exports as a Qwen2-MoE computing our logits."""
    from safetensors.torch import load_file

    from dropup.config import architecture
    from dropup.export import export
    from dropup.train import train
    from tests.test_train import config, rows

    # the shared data, but a seed store of its own: other tests count the seeds in the shared one
    store = [store[0], f"paths.seed_store={tmp_path / 'seeds'}"]
    cfg = config(tmp_path / "run", "moe=shared_expert", "init=naive", "model.family=qwen2", *store)
    results = train(cfg)
    assert results["status"] == "completed"
    assert results["shared_expert_d_ff"] == cfg.model.d_ff
    model_cfg, moe_cfg = architecture(cfg)
    assert results["total_params"] == param_counts(model_cfg, moe_cfg)["total_params"]
    seed = json.loads((Path(results["provenance"]["seed_model"]) / "results.json").read_text())
    step0 = next(r for r in rows(tmp_path / "run") if r["step"] == "0" and r["val_loss"])
    assert float(step0["val_loss"]) == pytest.approx(seed["metrics"]["val_loss"], abs=2e-3)

    out = export(tmp_path / "run", tmp_path / "hf", cfg.paths.data_dir)
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == cfg.model.d_ff
    ours = Transformer(model_cfg, moe_cfg).eval()
    ours.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    x = tokens(model_cfg.vocab_size)
    assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(x).logits, ours(x).logits)
    # the exported Qwen2-MoE continues training as it is (init=pretrained), and only with its shared expert
    again = train(config(tmp_path / "again", "model=hf", "moe=shared_expert", "init=pretrained", f"seed_model={out}",
                         *store))
    assert again["status"] == "completed" and again["shared_expert_d_ff"] == cfg.model.d_ff
    with pytest.raises(ConfigError, match=f"set moe.shared_expert_d_ff={cfg.model.d_ff}"):
        train(config(tmp_path / "plain", "model=hf", "init=pretrained", f"seed_model={out}", *store))


def test_a_llama_run_with_a_shared_expert_cannot_be_exported_as_mixtral(tmp_path):
    from dropup.export import export

    run = tmp_path / "run"
    run.mkdir()
    model = ModelConfig(name="t", vocab_size=97, n_layers=1, d_model=16, d_ff=32, n_heads=2, n_kv_heads=2)
    moe = shared_moe(d_s=32, experts=4)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(json.dumps({"model": model.__dict__, "moe": moe.__dict__}))
    from safetensors.torch import save_file

    save_file(Transformer(model, moe).state_dict(), str(run / "model.safetensors"))
    (run / "results.json").write_text(json.dumps({"provenance": {}}))
    with pytest.raises(ConfigError, match="a mixtral has no shared expert"):
        export(run, tmp_path / "hf", tmp_path / "data")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
