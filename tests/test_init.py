"""The mathematical properties of every init strategy."""

import math

import pytest
import torch
from torch.testing import assert_close

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.init import build_moe_state, dense_state
from dropup.init.streaming import layer_experts
from dropup.init.btx import BranchTrainMix
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.init.noise import NoiseUpcycling
from dropup.init.scratch import Scratch
from dropup.init import router as router_init
from dropup.model import Transformer

# d_ff >= 256 so index-set statistics are meaningful
WIDE = ModelConfig(name="wide", vocab_size=50, n_layers=2, d_model=32, d_ff=256, n_heads=4, n_kv_heads=2)
MOE = MoEConfig(enabled=True, num_experts=8, top_k=2)
FFN_KEYS = ("w_gate_up", "w_down")


def structured_dense(model: ModelConfig, seed=0):
    """A dense state whose FFN neurons differ from each other, as trained ones do: each W_gate/W_up row and each
    W_down column has its own mean (in +-0.05) and scale (x0.2 to x5). Sub-block, whole-matrix and per-neuron
    statistics then disagree, so a test can tell them apart (with i.i.d. entries they coincide)."""
    state = dense_state(model, seed)
    g = torch.Generator().manual_seed(seed + 200)
    for name in state:
        if ".ffn." not in name:
            continue
        w = state[name]
        neurons = w.shape[0] if "w_down" not in name else w.shape[1]
        scale = torch.exp(torch.empty(neurons).uniform_(math.log(0.2), math.log(5.0), generator=g))
        shift = torch.empty(neurons).uniform_(-0.05, 0.05, generator=g)
        if "w_down" in name:
            state[name] = w * scale[None, :] + shift[None, :]
        else:
            state[name] = w * scale[:, None] + shift[:, None]
    return state


def split(state, layer):
    gate_up, down = state[f"layers.{layer}.ffn.w_gate_up"], state[f"layers.{layer}.ffn.w_down"]
    f = down.shape[-1]
    return gate_up[:, :f], gate_up[:, f:], down


def logits(model_cfg, moe, state, x):
    model = Transformer(model_cfg, moe).eval()
    model.load_state_dict(state, strict=True)
    return model(x).logits


@pytest.mark.parametrize(
    "strategy", [NaiveUpcycling(), DropUpcycling(ratio=0.0), DropUpcycling(ratio=0.0, index_mode="per_matrix"),
                 NoiseUpcycling(ratio=0.0), DropUpcycling(ratio=0.0, shuffle=True)],
    ids=["naive", "drop-r0", "drop-r0-per-matrix", "noise-r0", "drop-r0-shuffled"],
)
def test_r0_upcycling_computes_the_dense_function(strategy):
    dense = structured_dense(WIDE)
    moe_state = build_moe_state(strategy, [dense], WIDE, MOE, seed=3)
    x = torch.randint(0, WIDE.vocab_size, (2, 16))
    assert_close(logits(WIDE, MOE, moe_state, x), logits(WIDE, None, dense, x), rtol=1e-5, atol=1e-5)


def test_naive_and_drop_r0_give_identical_weights():
    dense = structured_dense(WIDE)
    a = build_moe_state(NaiveUpcycling(), [dense], WIDE, MOE, seed=1)
    b = build_moe_state(DropUpcycling(ratio=0.0), [dense], WIDE, MOE, seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed_neurons(expert_w_FD, dense_w_FD):
    return set(torch.nonzero((expert_w_FD != dense_w_FD).any(dim=1)).flatten().tolist())


def test_shared_mode_reinitializes_the_same_floor_r_df_neurons_in_all_three_matrices():
    r = 0.3
    dense = structured_dense(WIDE)
    state = build_moe_state(DropUpcycling(ratio=r), [dense], WIDE, MOE, seed=0)
    n = math.floor(r * WIDE.d_ff)
    for layer in range(WIDE.n_layers):
        gate, up, down = split(state, layer)
        d_gate, d_up, d_down = (dense[f"layers.{layer}.ffn.{m}.weight"] for m in ("w_gate", "w_up", "w_down"))
        sets = []
        for e in range(MOE.num_experts):
            s_gate, s_up = changed_neurons(gate[e], d_gate), changed_neurons(up[e], d_up)
            s_down = changed_neurons(down[e].t(), d_down.t())
            assert len(s_gate) == n
            assert s_gate == s_up == s_down
            # only rows/columns in S changed: the rest is an exact copy
            keep = sorted(set(range(WIDE.d_ff)) - s_gate)
            assert torch.equal(gate[e][keep], d_gate[keep]) and torch.equal(down[e][:, keep], d_down[:, keep])
            sets.append(frozenset(s_gate))
        assert len(set(sets)) == MOE.num_experts  # different sets across experts


def test_reinitialized_values_follow_the_source_sub_block_statistics():
    dense = structured_dense(WIDE)
    strategy = DropUpcycling(ratio=0.5)
    state = build_moe_state(strategy, [dense], WIDE, MOE, seed=0)
    gate, _, down = split(state, 0)
    d_gate, d_down = dense["layers.0.ffn.w_gate.weight"], dense["layers.0.ffn.w_down.weight"]
    for e in range(MOE.num_experts):
        s = sorted(changed_neurons(gate[e], d_gate))
        for new, old in ((gate[e][s], d_gate[s]), (down[e][:, s], d_down[:, s])):
            # 128 x 32 = 4096 draws: the sample mean is within ~4 standard errors
            assert abs(new.mean() - old.mean()) < 4 * old.std() / math.sqrt(new.numel())
            assert abs(new.std() / old.std() - 1) < 0.05


def test_per_matrix_mode_draws_three_independent_sets():
    dense = structured_dense(WIDE)
    state = build_moe_state(DropUpcycling(ratio=0.5, index_mode="per_matrix"), [dense], WIDE, MOE, seed=0)
    gate, up, down = split(state, 0)
    n = WIDE.d_ff // 2
    for e in range(MOE.num_experts):
        s = [changed_neurons(gate[e], dense["layers.0.ffn.w_gate.weight"]),
             changed_neurons(up[e], dense["layers.0.ffn.w_up.weight"]),
             changed_neurons(down[e].t(), dense["layers.0.ffn.w_down.weight"].t())]
        assert [len(x) for x in s] == [n, n, n]
        assert s[0] != s[1] and s[1] != s[2]
        # three independent halves all share about an eighth of d_ff (r^3), where shared mode would share a half
        assert abs(len(s[0] & s[1] & s[2]) / WIDE.d_ff - 0.125) < 0.08


def test_r1_reinitializes_every_ffn_weight_and_nothing_else():
    dense = structured_dense(WIDE)
    state = build_moe_state(DropUpcycling(ratio=1.0), [dense], WIDE, MOE, seed=0)
    for name, tensor in state.items():
        if name.endswith(FFN_KEYS):
            layer = int(name.split(".")[1])
            for new, src in zip(split(state, layer), (dense[f"layers.{layer}.ffn.{m}.weight"] for m in
                                                      ("w_gate", "w_up", "w_down"))):
                assert not (new == src).any()
                assert abs(new.std() / src.std() - 1) < 0.05  # whole-matrix statistics
                assert abs(new.mean() - src.mean()) < 0.1 * src.std()
        elif "router" not in name:
            assert torch.equal(tensor, dense[name]), name


def test_noise_adds_small_noise_to_the_selected_neurons_only():
    dense = structured_dense(WIDE)
    state = build_moe_state(NoiseUpcycling(ratio=0.25, std=0.02), [dense], WIDE, MOE, seed=0)
    gate, _, _ = split(state, 1)
    d_gate = dense["layers.1.ffn.w_gate.weight"]
    s = sorted(changed_neurons(gate[0], d_gate))
    assert len(s) == WIDE.d_ff // 4
    delta = gate[0][s] - d_gate[s]
    assert abs(delta.std() - 0.02) < 0.002 and abs(delta.mean()) < 0.002


def test_btx_places_each_models_ffn_and_averages_the_rest():
    sources = [structured_dense(WIDE, seed=s) for s in range(4)]
    state = build_moe_state(BranchTrainMix(), sources, WIDE, MOE, seed=0)
    for layer in range(WIDE.n_layers):
        gate, up, down = split(state, layer)
        for e in range(8):
            src = sources[e // 2]  # floor(e * 4 / 8)
            assert torch.equal(gate[e], src[f"layers.{layer}.ffn.w_gate.weight"])
            assert torch.equal(up[e], src[f"layers.{layer}.ffn.w_up.weight"])
            assert torch.equal(down[e], src[f"layers.{layer}.ffn.w_down.weight"])
    for name in ("tok_emb.weight", "layers.1.attn.wq.weight", "norm.weight", "lm_head.weight"):
        assert_close(state[name], torch.stack([s[name] for s in sources]).mean(0))
        if name != "norm.weight":  # gains are all 1 in every source
            assert not torch.equal(state[name], sources[0][name])


def test_fine_grained_experts_take_their_part_of_the_dense_ffn():
    moe = MoEConfig(enabled=True, num_experts=8, top_k=4, granularity=4)
    dense = structured_dense(WIDE)
    width = WIDE.d_ff // 4
    for virtual_groups, scale in ((False, 1.0), (True, 4.0)):  # in virtual groups W_down carries the factor G
        state = build_moe_state(NaiveUpcycling(virtual_groups=virtual_groups), [dense], WIDE, moe, seed=0)
        gate, _, down = split(state, 0)
        assert gate.shape == (8, width, WIDE.d_model)
        for e in range(8):
            part = slice((e % 4) * width, (e % 4 + 1) * width)
            assert torch.equal(gate[e], dense["layers.0.ffn.w_gate.weight"][part])
            assert torch.equal(down[e], dense["layers.0.ffn.w_down.weight"][:, part] * scale)
    # drop inside each part: floor(r * d_f / G) neurons per expert
    dropped = build_moe_state(DropUpcycling(ratio=0.5), [dense], WIDE, moe, seed=0)
    g2, _, _ = split(dropped, 0)
    assert len(changed_neurons(g2[1], dense["layers.0.ffn.w_gate.weight"][width: 2 * width])) == width // 2


def test_scratch_statistics():
    state = build_moe_state(Scratch(), [], WIDE, MOE, seed=0)
    assert torch.equal(state["layers.0.attn_norm.weight"], torch.ones(WIDE.d_model))
    for name in ("tok_emb.weight", "layers.0.ffn.w_gate_up", "layers.1.attn.wo.weight"):
        assert abs(state[name].std() - 0.02) < 0.002 and abs(state[name].mean()) < 0.002
    experts = state["layers.0.ffn.w_gate_up"]
    assert not torch.equal(experts[0], experts[1])


def test_scratch_router_is_normal_like_every_other_weight():
    """Section 4: FS uses the dense initialization N(0, 0.02^2) for all parameters, the router included (not the
    upcycling inits' U(-0.0346, 0.0346), which has the same std but is bounded)."""
    from tests.test_configs import compose_with
    from dropup.upcycle import build_parser, make_strategy

    big = ModelConfig(name="big", vocab_size=50, n_layers=1, d_model=512, d_ff=64, n_heads=4, n_kv_heads=2)
    router = build_moe_state(Scratch(), [], big, MOE, seed=0)["layers.0.ffn.router.weight"]
    assert torch.equal(router, router_init.draw("normal:0.02", (8, 512), 0, 0, -1, "router"))
    assert router.abs().max() > 0.0346 * 1.5  # a bounded uniform would never get there
    assert compose_with("init=scratch").init.router == "normal:0.02"  # run.py
    args = build_parser().parse_args(["--dense", "x", "--out", "y", "--init", "scratch"])
    assert make_strategy(args).router == "normal:0.02"  # the converter
    args = build_parser().parse_args(["--dense", "x", "--out", "y", "--init", "naive"])
    assert make_strategy(args).router == "uniform:0.0346"  # upcycling keeps the paper's Table 8 row 3


@pytest.mark.parametrize("spec,low,high,std", [
    ("uniform:0.0346", -0.0346, 0.0346, 0.02), ("uniform01", 0.0, 1.0, 0.2887), ("uniform:0.5", -0.5, 0.5, 0.2887),
    ("normal:0.02", None, None, 0.02), ("normal:0.2887", None, None, 0.2887),
])
def test_router_init_variants_of_table8(spec, low, high, std):
    w = router_init.draw(spec, (64, 512), 0, 0, -1, "router")
    assert abs(w.std().item() / std - 1) < 0.03
    if low is not None:
        assert low <= w.min().item() and w.max().item() <= high


def test_same_seed_same_weights_different_seed_different():
    dense = structured_dense(WIDE)
    a = build_moe_state(DropUpcycling(ratio=0.5), [dense], WIDE, MOE, seed=7)
    b = build_moe_state(DropUpcycling(ratio=0.5), [dense], WIDE, MOE, seed=7)
    c = build_moe_state(DropUpcycling(ratio=0.5), [dense], WIDE, MOE, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.ffn.w_gate_up"], c["layers.0.ffn.w_gate_up"])
    assert not torch.equal(a["layers.0.ffn.router.weight"], c["layers.0.ffn.router.weight"])


def test_a_layer_built_alone_equals_the_same_layer_built_in_sequence():
    """Order independence: the converter may build layers in any order, or resume in the middle."""
    dense = structured_dense(WIDE)
    strategy = DropUpcycling(ratio=0.5, shuffle=True)
    full = build_moe_state(strategy, [dense], WIDE, MOE, seed=5)
    gate_up, down = layer_experts(strategy, 1, [dense], WIDE, MOE, seed=5)
    assert torch.equal(gate_up, full["layers.1.ffn.w_gate_up"]) and torch.equal(down, full["layers.1.ffn.w_down"])


@pytest.mark.parametrize("gate_up_block,down_block", [
    ((slice(None), slice(3, 40), slice(None)), (slice(None), slice(0, 5), slice(None))),  # rows across gate|up
    ((slice(1, 3), slice(None), slice(None)), (slice(2, 4), slice(None), slice(None))),  # a few experts each
    ((slice(None), slice(0, 0), slice(None)), (slice(None), slice(None), slice(7, 9))),  # an empty block
])
def test_a_rank_block_of_the_experts_is_the_same_block_of_the_whole_layer(gate_up_block, down_block):
    """Sharded construction builds only a rank's block of each stacked tensor: the same bits as slicing the whole
    one (DU's statistics are still taken over each expert's whole sub-block, not the block)."""
    dense = structured_dense(WIDE)
    strategy = DropUpcycling(ratio=0.5, shuffle=True)
    gate_up, down = layer_experts(strategy, 1, [dense], WIDE, MOE, seed=5)
    gate_up_part, down_part = layer_experts(strategy, 1, [dense], WIDE, MOE, seed=5,
                                            regions=(gate_up_block, down_block))
    assert torch.equal(gate_up_part, gate_up[gate_up_block]) and torch.equal(down_part, down[down_block])


def test_bf16_sources_keep_their_dtype():
    dense = {k: v.bfloat16() for k, v in structured_dense(WIDE).items()}
    state = build_moe_state(DropUpcycling(ratio=0.5), [dense], WIDE, MOE, seed=0)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


@pytest.mark.parametrize("make,message", [
    (lambda: DropUpcycling(ratio=1.5), "outside \\[0, 1\\]"),
    (lambda: DropUpcycling(ratio=-0.1), "outside \\[0, 1\\]"),
    (lambda: DropUpcycling(index_mode="rows"), "index_mode"),
    (lambda: NaiveUpcycling(router="gaussian"), "router init"),
    (lambda: MoEConfig(enabled=True, num_experts=4, top_k=5), "top_k=5"),
])
def test_bad_strategy_arguments(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_granularity_that_does_not_divide_d_ff():
    moe = MoEConfig(enabled=True, num_experts=6, top_k=2, granularity=3)
    with pytest.raises(ConfigError, match="does not divide model.d_ff=256"):
        build_moe_state(NaiveUpcycling(), [dense_state(WIDE, 0)], WIDE, moe, seed=0)


def test_dense_model_with_other_shapes_is_refused():
    other = ModelConfig(name="other", vocab_size=50, n_layers=2, d_model=32, d_ff=128, n_heads=4, n_kv_heads=2)
    with pytest.raises(ConfigError, match="has shape .* expects"):
        build_moe_state(NaiveUpcycling(), [dense_state(other, 0)], WIDE, MOE, seed=0)


def test_btx_model_count_must_divide_the_experts():
    sources = [dense_state(WIDE, s) for s in range(3)]
    with pytest.raises(ConfigError, match="does not divide|cannot fill"):
        build_moe_state(BranchTrainMix(), sources, WIDE, MOE, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        build_moe_state(BranchTrainMix(), sources[:1], WIDE, MOE, seed=0)


def test_upcycling_into_a_dense_config_is_refused():
    with pytest.raises(ConfigError, match="moe=mixtral"):
        build_moe_state(NaiveUpcycling(), [dense_state(WIDE, 0)], WIDE, MoEConfig(enabled=False), seed=0)


# --- the statistics of Drop-Upcycling's draws, exactly ------------------------------------------------------------


def captured_draws(monkeypatch, strategy, dense, seed=0):
    """Build the MoE, recording every normal draw of dropup.init.drop: {key: (shape, mean, std)}."""
    from dropup.init import drop

    draws = {}
    real = drop.rng.normal

    def spy(shape, mean, std, *key):
        draws[key] = (tuple(shape), float(mean), float(std))
        return real(shape, mean, std, *key)

    monkeypatch.setattr(drop.rng, "normal", spy)
    build_moe_state(strategy, [dense], WIDE, MOE, seed=seed)
    return draws


def assert_sub_block_statistics(draws, strategy, dense, seed=0):
    """Each (layer, expert, matrix) drew once, from N(mu, sigma^2) with mu and the N-1 sigma of exactly the
    selected sub-block of the original dense matrix (rows S x all d_h for gate/up; all d_h x columns S for down)."""
    from dropup.init.base import ExpertKey

    assert len(draws) == WIDE.n_layers * MOE.num_experts * 3
    for layer in range(WIDE.n_layers):
        mats = {m: dense[f"layers.{layer}.ffn.w_{m}.weight"].double() for m in ("gate", "up", "down")}
        for e in range(MOE.num_experts):
            idx = strategy.redrawn_neurons(WIDE.d_ff, ExpertKey(seed, layer, e))
            for m, w in mats.items():
                block = w[idx[m]] if m != "down" else w[:, idx[m]].t()
                n = block.numel()
                mu = block.sum() / n
                sigma = math.sqrt(((block - mu) ** 2).sum() / (n - 1))
                shape, got_mu, got_sigma = draws[(seed, layer, e, m)]
                assert shape == tuple(block.shape)
                assert got_mu == pytest.approx(mu.item(), rel=1e-5, abs=1e-9), (layer, e, m)
                assert got_sigma == pytest.approx(sigma, rel=1e-6), (layer, e, m)


@pytest.mark.parametrize("index_mode", ["shared", "per_matrix"])
@pytest.mark.parametrize("ratio", [0.03, 0.5])  # 0.03: a block of 7 neurons, where N and N-1 differ by 8 %
def test_drop_draws_from_exact_sub_block_statistics(monkeypatch, ratio, index_mode):
    dense = structured_dense(WIDE)
    strategy = DropUpcycling(ratio=ratio, index_mode=index_mode)
    assert_sub_block_statistics(captured_draws(monkeypatch, strategy, dense), strategy, dense)


def _whole_matrix(w_FX, rows, key):
    from dropup import rng

    out = w_FX.clone()
    out[rows] = rng.normal((len(rows), w_FX.shape[1]), w_FX.mean().item(), w_FX.std().item(), *key)
    return out


def _biased_std(w_FX, rows, key):
    from dropup import rng

    block, out = w_FX[rows].float(), w_FX.clone()
    out[rows] = rng.normal(tuple(block.shape), block.mean().item(), block.std(correction=0).item(), *key)
    return out


def _per_neuron(w_FX, rows, key):
    from dropup import rng

    block, out = w_FX[rows].float(), w_FX.clone()
    z = rng.normal(tuple(block.shape), 0.0, 1.0, *key)
    out[rows] = z * block.std(dim=1, keepdim=True) + block.mean(dim=1, keepdim=True)
    return out


@pytest.mark.parametrize("wrong", [_whole_matrix, _biased_std, _per_neuron], ids=lambda f: f.__name__[1:])
def test_the_statistics_test_rejects_the_plausible_wrong_variants(monkeypatch, wrong):
    """The exact test above fails on whole-matrix statistics, a biased (N) std and per-neuron statistics."""
    from dropup.init import drop

    dense = structured_dense(WIDE)
    strategy = DropUpcycling(ratio=0.03)
    monkeypatch.setattr(drop, "replace_rows", wrong)
    with pytest.raises(AssertionError):
        assert_sub_block_statistics(captured_draws(monkeypatch, strategy, dense), strategy, dense)


def test_structured_fixture_tells_sub_block_from_whole_matrix_in_the_output():
    """On the weights themselves: with neurons of different scales, the re-initialized block's spread follows
    its own sub-block, not the whole matrix (with the old i.i.d. fixture both were the same)."""
    dense = structured_dense(WIDE)
    state = build_moe_state(DropUpcycling(ratio=0.05), [dense], WIDE, MOE, seed=0)
    gate, _, _ = split(state, 0)
    d_gate = dense["layers.0.ffn.w_gate.weight"]
    ratios = []
    for e in range(MOE.num_experts):
        s = sorted(changed_neurons(gate[e], d_gate))
        new, old = gate[e][s], d_gate[s]
        assert abs(new.std() / old.std() - 1) < 0.1
        ratios.append(old.std() / d_gate.std())
    assert max(abs(r - 1) for r in ratios) > 0.2  # the sub-blocks really differ from the whole matrix
