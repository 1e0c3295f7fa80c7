"""Methods beyond the paper: virtual-group (granular) upcycling, the load-balancing modes, expert similarity."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.flops import param_counts, train_flops
from dropup.init import build_moe_state, dense_state
from dropup.init.streaming import step0_ffn_error
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.init.noise import NoiseUpcycling
from dropup.init.scratch import Scratch
from dropup.model import Transformer
from dropup.moe.layer import MoELayer, route
from dropup.moe.losses import StepLoads, load_balancing_loss

from test_init import structured_dense

MODEL = ModelConfig(name="w", vocab_size=60, n_layers=2, d_model=32, d_ff=256, n_heads=4, n_kv_heads=2)
G4 = MoEConfig(enabled=True, num_experts=32, top_k=8, granularity=4)  # moe=fine_grained's shape
G4_SMALL = MoEConfig(enabled=True, num_experts=8, top_k=4, granularity=4)  # two copies, top-4
G2_SHARED = MoEConfig(enabled=True, num_experts=8, top_k=2, granularity=2, shared_expert_d_ff=256)


def logits(moe, state, x):
    model = Transformer(MODEL, moe).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(x).logits


def tokens():
    return torch.randint(0, MODEL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


# --- virtual groups --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [G4, G4_SMALL, G2_SHARED], ids=["32x-top8", "8x-top4", "g2-shared-expert"])
@pytest.mark.parametrize("strategy", [NaiveUpcycling(), DropUpcycling(ratio=0.0), NoiseUpcycling(ratio=0.0),
                                      DropUpcycling(ratio=0.0, index_mode="per_matrix")],
                         ids=["naive", "drop-r0", "noise-r0", "drop-r0-per-matrix"])
def test_virtual_groups_make_fine_grained_upcycling_the_dense_function(moe, strategy):
    dense = structured_dense(MODEL)
    assert strategy.uses_virtual_groups(moe)  # auto: on for G > 1
    state = build_moe_state(strategy, [dense], MODEL, moe, seed=2)
    assert_close(logits(moe, state, tokens()), logits(None, dense, tokens()), rtol=1e-5, atol=1e-5)
    assert step0_ffn_error(strategy, [dense], MODEL, moe, seed=2) < 1e-5


def test_the_wrong_variants_are_not_the_dense_function():
    """Without virtual groups (today's fine-grained init), with groups but no factor G, or with the factor G but
    independent router rows, the step-0 MoE is far from the dense FFN."""
    dense = structured_dense(MODEL)
    want = logits(None, dense, tokens())
    plain = build_moe_state(NaiveUpcycling(virtual_groups=False), [dense], MODEL, G4, seed=2)
    grouped = build_moe_state(NaiveUpcycling(), [dense], MODEL, G4, seed=2)
    unscaled = {k: (v / 4 if k.endswith("w_down") else v) for k, v in grouped.items()}
    ungrouped_rows = {k: (plain[k] if k.endswith("router.weight") else v) for k, v in grouped.items()}
    for state in (plain, unscaled, ungrouped_rows):
        assert (logits(G4, state, tokens()) - want).abs().max() > 1e-2
    error = step0_ffn_error(NaiveUpcycling(virtual_groups=False), [dense], MODEL, G4, seed=2)
    assert 0.3 < error < 1.0  # the issue measured 0.76 at G = 4


def test_group_members_share_a_router_row_and_groups_do_not():
    state = build_moe_state(NaiveUpcycling(), [dense_state(MODEL, 0)], MODEL, G4, seed=0)
    router = state["layers.0.ffn.router.weight"]
    for copy in range(8):
        group = router[4 * copy: 4 * copy + 4]
        assert torch.equal(group, group[:1].expand_as(group))
    assert not torch.equal(router[0], router[4])
    # G = 1 and virtual_groups=false keep one independent row per expert
    rows = build_moe_state(NaiveUpcycling(virtual_groups=False), [dense_state(MODEL, 0)], MODEL, G4, seed=0)
    assert len({tuple(r.tolist()) for r in rows["layers.0.ffn.router.weight"]}) == 32


def test_drop_in_virtual_groups_draws_from_the_unscaled_sub_block():
    """The re-initialized columns of W_down, divided by the folded G, have the dense sub-block's statistics, like
    the kept columns (a draw left out of the fold would have 1/G of its standard deviation, one folded twice G
    times)."""
    dense = structured_dense(MODEL)
    strategy = DropUpcycling(ratio=0.5)
    state = build_moe_state(strategy, [dense], MODEL, G4_SMALL, seed=5)
    down = state["layers.0.ffn.w_down"] / 4  # (E, D, F)
    width = MODEL.d_ff // 4
    from dropup.init.base import ExpertKey

    for e in range(G4_SMALL.num_experts):
        part = slice((e % 4) * width, (e % 4 + 1) * width)
        cols = strategy.redrawn_neurons(width, ExpertKey(5, 0, e))["down"]
        source = dense["layers.0.ffn.w_down.weight"][:, part][:, cols]
        drawn = down[e][:, cols]
        assert abs(drawn.std() / source.std() - 1) < 0.15
        assert abs(drawn.mean() - source.mean()) < 0.2 * source.std()


def test_virtual_groups_need_top_k_a_multiple_of_g():
    bad = MoEConfig(enabled=True, num_experts=32, top_k=6, granularity=4)
    with pytest.raises(ConfigError, match=r"moe.top_k=6 to be a multiple of moe.granularity=4.*moe.top_k=4"):
        build_moe_state(NaiveUpcycling(), [dense_state(MODEL, 0)], MODEL, bad, seed=0)
    build_moe_state(NaiveUpcycling(virtual_groups=False), [dense_state(MODEL, 0)], MODEL, bad, seed=0)  # allowed
    with pytest.raises(ConfigError, match="reads no dense model"):
        Scratch(virtual_groups=True).validate(0, G4)
    with pytest.raises(ConfigError, match="moe.granularity=1 has none"):
        NaiveUpcycling(virtual_groups=True).check_moe(MoEConfig(enabled=True))
    NaiveUpcycling().check_moe(MoEConfig(enabled=True))  # auto: nothing to group, nothing to refuse
    with pytest.raises(ConfigError, match="not understood"):
        NaiveUpcycling(virtual_groups="maybe")


def test_the_new_options_change_no_count():
    """Virtual groups and the balancing modes change no shape: the parameters of the built models (buffers such as
    aux_free's bias excluded) are what `param_counts` says, and the FLOPs do not move."""
    for moe in (G4, G2_SHARED):
        aux_free = MoEConfig(**{**vars(moe), "lb_mode": "aux_free"})
        assert param_counts(MODEL, aux_free) == param_counts(MODEL, moe)
        assert train_flops(MODEL, aux_free, 10**6, 64) == train_flops(MODEL, moe, 10**6, 64)
        for strategy in (NaiveUpcycling(), NaiveUpcycling(virtual_groups=False)):
            model = Transformer(MODEL, aux_free)
            model.load_state_dict(build_moe_state(strategy, [dense_state(MODEL, 0)], MODEL, aux_free, seed=0))
            assert sum(p.numel() for p in model.parameters()) == param_counts(MODEL, moe)["total_params"]


# --- converter -------------------------------------------------------------------------------------------------

def test_converter_virtual_groups_through_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from test_upcycle import MODEL as SMALL, run, save_llama, tokens as hf_tokens

    llama = save_llama(tmp_path / "llama", seed=0, model=SMALL)
    common = ["--dense", llama, "--init", "naive", "--experts", "8", "--top-k", "4", "--granularity", "4", "--verify"]
    assert run(*common, "--out", tmp_path / "vg") == 0
    out = capsys.readouterr().out
    assert "OK: logits of the MoE equal the dense model's" in out and "virtual groups of 4" in out
    assert json.loads((tmp_path / "vg" / "dropup_manifest.json").read_text())["options"]["virtual_groups"] is True
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "vg", dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(moe(hf_tokens()).logits, dense(hf_tokens()).logits, rtol=1e-5, atol=1e-5)

    assert run(*common, "--out", tmp_path / "plain", "--no-virtual-groups") == 0
    out = capsys.readouterr().out
    assert "NOT the dense function" in out and "WITHOUT virtual groups" in out
    assert json.loads((tmp_path / "plain" / "dropup_manifest.json").read_text())["options"]["virtual_groups"] is False

    assert run("--dense", llama, "--init", "naive", "--experts", "8", "--top-k", "2", "--granularity", "4",
               "--out", tmp_path / "refused") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--top-k=2 to be a multiple of --granularity=4" in err
    assert "--no-virtual-groups" in err and not (tmp_path / "refused").exists()


# --- load balancing --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch_rank(rank: int, port: int, router_weight, x_TD, out_dir: str):
    """One DDP rank: its half of the tokens through a DDP-wrapped router, global_batch loss, backward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    router = torch.nn.Linear(x_TD.shape[1], router_weight.shape[0], bias=False)
    router.weight.data.copy_(router_weight)
    model = DistributedDataParallel(router)
    half = x_TD.shape[0] // 2
    mine = x_TD[rank * half:(rank + 1) * half]
    logits = model(mine)
    loss = load_balancing_loss([logits, logits * 0.5], 2, "global_batch")
    loss.backward()
    # the same step in two micro-batches per rank: each one's loss, with the step's running loads
    step_loads, micro = StepLoads(), []
    for part in mine.chunk(2):
        part_logits = router(part).detach()
        micro.append(load_balancing_loss([part_logits, part_logits * 0.5], 2, "global_batch", step_loads=step_loads))
    single = load_balancing_loss([logits.detach(), logits.detach() * 0.5], 2, "global_batch", step_loads=StepLoads())
    torch.save({"loss": loss.detach(), "grad": router.weight.grad, "micro": torch.stack(micro),
                "one_micro_batch": single}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _switch_loss(frequency_logits: list, probability_logits: list, top_k: int = 2) -> torch.Tensor:
    """E * sum_e f_e P_e with f from the first list's tokens and P from the second's, pooled over layers."""
    def share(logits, fn):
        return sum(fn(torch.softmax(l.float(), -1)) for l in logits) / sum(l.shape[0] for l in logits)

    f = share(frequency_logits, lambda p: torch.zeros_like(p[0]).index_add_(
        0, p.topk(top_k, -1).indices.flatten(), torch.ones(p.shape[0] * top_k)))
    P = share(probability_logits, lambda p: p.sum(0))
    return frequency_logits[0].shape[-1] * (f * P).sum()


def test_global_batch_on_two_ranks_equals_pooled_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    x[:32] += 2.0 * torch.randn(16, generator=g)  # the ranks see differently routed halves
    mp.spawn(_global_batch_rank, args=(_free_port(), weight, x, str(tmp_path)), nprocs=2, join=True)
    router = torch.nn.Linear(16, 8, bias=False)
    router.weight.data.copy_(weight)
    logits = router(x)
    want = load_balancing_loss([logits, logits * 0.5], 2, "pooled")
    want.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(got["loss"], want.detach())
        assert_close(got["grad"], router.weight.grad)  # after DDP's gradient average
    # pooled per rank (the plausible wrong variant) differs on these halves
    per_rank = [load_balancing_loss([router(h), router(h) * 0.5], 2, "pooled") for h in (x[:32], x[32:])]
    assert all(abs(p.item() - want.item()) > 1e-3 for p in per_rank)
    # micro-batches: rank r's micro-batch k is x[32r + 16k : +16]. At the last one (k = 1) the frequencies are the
    # whole step's (all 64 tokens), the probabilities the last micro-batches' of both ranks; at k = 0 both are the
    # first micro-batches'. One micro-batch per step is the loss above.
    with torch.no_grad():
        whole, firsts, lasts = router(x), router(torch.cat([x[:16], x[32:48]])), router(torch.cat([x[16:32], x[48:]]))
    layers = lambda l: [l, l * 0.5]  # noqa: E731  (the two "layers" each rank pooled)
    want_micro = torch.stack([_switch_loss(layers(firsts), layers(firsts)), _switch_loss(layers(whole), layers(lasts))])
    per_micro_batch = _switch_loss(layers(lasts), layers(lasts))  # the wrong variant: the last micro-batch alone
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(got["micro"], want_micro)
        assert abs(got["micro"][1].item() - per_micro_batch.item()) > 1e-3
        assert_close(got["one_micro_batch"], want.detach())


def test_global_batch_over_micro_batches_uses_the_step_frequencies_on_one_process():
    """Four micro-batches of one step: the last one's balance loss has the frequencies of all four (the whole
    step's) and its own probabilities; a step of one micro-batch is today's pooled loss."""
    model = Transformer(MODEL, MoEConfig(enabled=True, num_experts=8, top_k=2, lb_mode="global_batch"))
    x = torch.randint(0, MODEL.vocab_size, (8, 24), generator=torch.Generator().manual_seed(2))
    x[:4] %= 7  # the micro-batches route differently
    with torch.no_grad():
        for block in model.layers:
            block.ffn.router.weight.mul_(30.0)  # a router with preferences, so the frequencies matter
    step_loads = StepLoads()
    with torch.no_grad():
        lb = [model.losses(model(part), part, step_loads)["lb_loss"] for part in x.chunk(4)]
        whole, last = model(x), model(x[6:])
    assert_close(lb[-1], _switch_loss(whole.router_logits, last.router_logits))
    assert abs(lb[-1].item() - _switch_loss(last.router_logits, last.router_logits).item()) > 1e-3
    assert_close(lb[0], _switch_loss(model(x[:2]).router_logits, model(x[:2]).router_logits))
    step_loads.reset()
    one = model.losses(whole, x, step_loads)["lb_loss"]
    assert_close(one, model.losses(whole, x)["lb_loss"])
    assert_close(one, load_balancing_loss(whole.router_logits, 2, "pooled"))


def test_global_batch_on_one_process_is_pooled():
    logits = [torch.randn(40, 8), torch.randn(40, 8)]
    assert_close(load_balancing_loss(logits, 2, "global_batch"), load_balancing_loss(logits, 2, "pooled"))


def test_aux_free_bias_selects_but_never_weights():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 16, generator=g), torch.randn(8, 16, generator=g)
    bias = torch.zeros(8)
    bias[3] = 10.0  # every token now takes expert 3
    logits, weights, experts = route(x, w, 2, bias)
    assert (experts == 3).any(dim=1).all()
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = probs.gather(-1, experts)
    assert_close(weights, chosen / chosen.sum(-1, keepdim=True))  # the unbiased probabilities, renormalized
    plain = route(x, w, 2)
    assert_close(route(x, w, 2, torch.zeros(8))[1], plain[1])


def test_aux_free_bias_balances_a_skewed_router_within_a_few_steps():
    moe = MoEConfig(enabled=True, num_experts=8, top_k=2, lb_mode="aux_free", bias_update_rate=0.02)
    layer = MoELayer(16, 32, moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight[0, 0] += 3.0  # a skewed router: expert 0's logit is 3 higher for every token

    def imbalance():
        layer(x)
        return layer.tokens_per_expert.max().item() / (512 * 2 / 8)

    start = imbalance()
    for _ in range(20):
        layer(x)
        layer.update_expert_bias(layer.tokens_per_expert, moe.bias_update_rate)
    assert start > 3.0 and imbalance() < 0.5 * start
    assert layer.expert_bias[0] < 0 and "expert_bias" in layer.state_dict()
    assert "expert_bias" not in dict(layer.named_parameters())  # state, not a parameter the optimizer moves


def test_aux_free_trains_on_lm_loss_alone_and_logs_the_balance_loss():
    moe = MoEConfig(enabled=True, num_experts=8, top_k=2, lb_mode="aux_free")
    model = Transformer(MODEL, moe)
    x = tokens()
    losses = model.losses(model(x), x)
    assert torch.equal(losses["loss"], losses["lm_loss"]) and losses["lb_loss"] > 0
    pooled = Transformer(MODEL, MoEConfig(enabled=True, num_experts=8, top_k=2))
    pooled.load_state_dict(pooled.complete_state(model.state_dict()), strict=True)  # drops the (zero) bias
    assert not torch.equal(pooled.losses(pooled(x), x)["loss"], pooled.losses(pooled(x), x)["lm_loss"])


@pytest.mark.parametrize("skipped", [True, False], ids=["inf-gradient-skipped", "finite-control"])
def test_an_optimizer_step_the_fp16_scaler_skips_leaves_the_routing_bias(skipped, monkeypatch):
    """Under fp16 a GradScaler skips the update when a gradient is inf/NaN (and lowers its scale): that step did
    not happen, so aux_free's bias must not move either. Lightning refuses fp16 on the CPU, so the plugin's
    step (scaler.step, then scaler.update) is stood in for around LitLM.optimizer_step."""
    from types import SimpleNamespace

    import lightning as L

    from dropup.lit import LitLM

    moe = MoEConfig(enabled=True, num_experts=8, top_k=2, lb_mode="aux_free", bias_update_rate=0.1)
    module = LitLM(MODEL, moe, {}, data=None, data_seed=0)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def fp16_plugin_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        scaler.step(optimizer)
        scaler.update()

    monkeypatch.setattr(L.LightningModule, "optimizer_step", fp16_plugin_step)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler),
                                      strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    x = tokens()
    scaler.scale(module.model.losses(module.model(x), x)["loss"]).backward()
    if skipped:
        module.model.tok_emb.weight.grad[0, 0] = float("inf")
    module._step_load = torch.stack([b.ffn.tokens_per_expert for b in module.model.layers]).clone()
    module.optimizer_step(0, 0, optimizer)
    bias = module.model.layers[0].ffn.expert_bias
    assert (scaler.get_scale() < 2.0 ** 8) == skipped
    assert bool(bias.abs().max() == 0) == skipped


# --- expert similarity -----------------------------------------------------------------------------------------

ZERO_MEAN = ModelConfig(name="z", vocab_size=60, n_layers=2, d_model=64, d_ff=512, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("moe", [MoEConfig(enabled=True, num_experts=8, top_k=2), G4], ids=["G1", "G4"])
@pytest.mark.parametrize("strategy,expected", [
    (NaiveUpcycling(), 1.0), (DropUpcycling(ratio=0.5), 0.25), (DropUpcycling(ratio=0.25), 0.5625),
    (DropUpcycling(ratio=0.5, index_mode="per_matrix"), 0.25), (DropUpcycling(ratio=1.0), 0.0), (Scratch(), 0.0)],
    ids=["naive", "drop-0.5", "drop-0.25", "drop-0.5-per-matrix", "drop-1", "scratch"])
def test_expert_similarity_at_step_0(moe, strategy, expected):
    """1 for copies, about (1 - r)^2 after dropping zero-mean weights (either index mode), about 0 from scratch."""
    sources = [] if strategy.name == "scratch" else [dense_state(ZERO_MEAN, 0)]
    model = Transformer(ZERO_MEAN, moe)
    model.load_state_dict(build_moe_state(strategy, sources, ZERO_MEAN, moe, seed=1))
    got = model.expert_similarity()
    assert len(got) == ZERO_MEAN.n_layers
    assert got == pytest.approx([expected] * len(got), abs=0.03)


def test_expert_similarity_pairs_only_experts_of_the_same_part():
    """At G = 4 the four parts of one FFN are different matrices: pairing across parts (the wrong variant) would
    pull naive upcycling's 1 towards 0."""
    from dropup.moe.similarity import expert_similarity

    model = Transformer(ZERO_MEAN, G4)
    model.load_state_dict(build_moe_state(NaiveUpcycling(), [dense_state(ZERO_MEAN, 0)], ZERO_MEAN, G4, seed=1))
    ffn = model.layers[0].ffn
    assert expert_similarity(ffn.w_gate_up, ffn.w_down, 4) == pytest.approx(1.0, abs=1e-5)
    assert expert_similarity(ffn.w_gate_up, ffn.w_down, 1) < 0.5


# --- through run.py / train ------------------------------------------------------------------------------------

def test_granular_runs_record_virtual_groups_and_say_what_step_0_computes(tmp_path, store, caplog):
    import logging

    from test_train import config, rows
    from dropup.train import train

    caplog.set_level(logging.INFO, logger="dropup.train")
    grouped = train(config(tmp_path / "vg", "init=naive", "moe=fine_grained", *store))
    assert grouped["virtual_groups"] is True and grouped["lb_mode"] == "pooled"
    assert grouped["provenance"]["step0_ffn_error"] < 1e-5
    seed = json.loads((__import__("pathlib").Path(grouped["provenance"]["seed_model"]) / "results.json").read_text())
    step0 = float(rows(tmp_path / "vg")[0]["val_loss"])
    assert step0 == pytest.approx(seed["metrics"]["val_loss"], abs=2e-3)  # the dense seed's function
    assert float(rows(tmp_path / "vg")[0]["expert_similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert "expert_similarity" in grouped["metrics"]
    routing = json.loads((tmp_path / "vg" / "routing.json").read_text())
    assert len(routing["expert_similarity"]) == len(routing["tokens_per_expert"]["ja"])

    caplog.clear()
    plain = train(config(tmp_path / "plain", "init=naive", "moe=fine_grained", "init.virtual_groups=false", *store))
    assert plain["virtual_groups"] is False and plain["provenance"]["step0_ffn_error"] > 0.3
    assert any("NOT the dense function" in r.getMessage() for r in caplog.records)
    assert float(rows(tmp_path / "plain")[0]["val_loss"]) > step0 + 0.01


def test_a_run_asking_for_impossible_virtual_groups_fails_at_once(tmp_path, store):
    from test_train import config
    from dropup.train import train

    with pytest.raises(ConfigError, match="multiple of moe.granularity=4"):
        train(config(tmp_path / "run", "init=naive", "moe=fine_grained", "moe.top_k=6", *store))
    assert not (tmp_path / "run" / "results.json").exists()  # refused before anything was written


def test_aux_free_in_half_precision_storage_is_refused(tmp_path, store):
    from test_train import config
    from dropup.train import train

    with pytest.raises(ConfigError, match="aux_free keeps a routing bias"):
        train(config(tmp_path / "run", "moe.lb_mode=aux_free", "trainer.precision=bf16-true", *store))


def test_aux_free_run_resumes_exactly_and_export_says_it_routes_without_the_bias(tmp_path, store, monkeypatch,
                                                                                 caplog):
    import logging

    from safetensors.torch import load_file

    from test_train import config
    from dropup.train import train
    from dropup.export import export

    aux = ["init=drop", "ratio=0.5", "moe.lb_mode=aux_free", "moe.bias_update_rate=0.01", *store]
    reference = train(config(tmp_path / "ref", *aux))
    monkeypatch.setenv("DROPUP_CRASH_AT_STEP", "13")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "crashed", *aux))
    monkeypatch.delenv("DROPUP_CRASH_AT_STEP")
    resumed = train(config(tmp_path / "crashed", *aux, "resume=true"))
    assert resumed["metrics"] == reference["metrics"] and resumed["provenance"]["resumed_from_step"] > 0
    want, got = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "crashed" / "model.safetensors")
    bias = want["layers.0.ffn.expert_bias"]
    assert bias.abs().max() > 0 and torch.equal(got["layers.0.ffn.expert_bias"], bias)
    from test_train import rows

    logged = [r for r in rows(tmp_path / "ref") if r["lb_loss"]]
    assert logged and all(float(r["lb_loss"]) > 1.9 for r in logged)  # logged (>= top_k = 2), not trained on:
    assert all(r["train_loss"] == r["lm_loss"] for r in logged)

    caplog.set_level(logging.WARNING, logger="dropup.export")
    data_dir = store[0].split("=", 1)[1]
    out = export(tmp_path / "ref", tmp_path / "hf", data_dir)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "routes without them" in message and "differ from the run's by up to" in message
    # the run trained no balance loss: a fine-tune of the export must not add one
    assert json.loads((out / "config.json").read_text())["router_aux_loss_coef"] == 0.0
    assert "router_aux_loss_coef is written as 0" in message


@pytest.mark.parametrize("mode,coef,note", [("pooled", 0.02, None), ("global_batch", 0.02, None),
                                            ("per_layer", 0.02, "pooled over all layers"),
                                            ("aux_free", 0.0, "written as 0")])
def test_the_exported_balance_loss_is_the_one_the_run_trained(mode, coef, note):
    from dropup.export import balance_note
    from dropup.hf import hf_config_dict

    moe = MoEConfig(enabled=True, num_experts=8, top_k=2, lb_mode=mode)
    assert hf_config_dict(MODEL, moe)["router_aux_loss_coef"] == coef
    said = balance_note(moe, "mixtral")
    assert (said is None) if note is None else (note in said)


def test_global_batch_on_two_ddp_ranks_trains_like_pooled_on_one_process(tmp_path, store):
    import subprocess
    import sys

    from test_train import ROOT, TINY, config, rows
    from dropup.train import train

    # a seed store of its own, with a short seed recipe: the DDP run, first, trains its dense seed itself (under
    # trainer=ddp, in the same process before the MoE run: the process group must not outlive that run), and the
    # single process then finds that seed
    data_dir = next(o for o in store if o.startswith("paths.data_dir="))
    common = ["init=naive", "trainer.precision=32-true", *TINY, data_dir, f"paths.seed_store={tmp_path / 'seeds'}",
              "seed_recipe.train.tokens=4096"]
    mode = os.environ.get("DROPUP_TEST_DDP_LB_MODE", "global_batch")  # =pooled: the control, which must fail
    proc = subprocess.run([sys.executable, "run.py", "trainer=ddp", f"moe.lb_mode={mode}", *common,
                           f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = lambda: [p.name for p in (tmp_path / "seeds").iterdir() if p.is_dir()]  # noqa: E731
    assert len(seeds()) == 1  # trained by the DDP run
    train(config(tmp_path / "single", *common))
    assert len(seeds()) == 1  # the single process used the same seed
    # pooled on each rank's half balances other statistics: its logged balance loss differs from the single
    # process's by more than 1e-3 (measured when this control ran beside it), far outside 2e-4
    single = rows(tmp_path / "single")
    assert [r["step"] for r in rows(tmp_path / "ddp")] == [r["step"] for r in single]
    for a, b in zip(rows(tmp_path / "ddp"), single):
        for column in ("lm_loss", "lb_loss", "val_loss"):
            if a[column] or b[column]:
                assert float(a[column]) == pytest.approx(float(b[column]), abs=2e-4), (a["step"], column)
    # this is also the suite's trainer=ddp run through run.py (it used to have a dense one of its own: the DDP
    # path is the same for both): the run completes, and Lightning's own messages reach Hydra's run log (run.py
    # imports Lightning before Hydra sets up logging)
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["status"] == "completed"
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in (tmp_path / "ddp" / "run.log").read_text()
