"""The two registries: init strategies (dropup.init.registry) and balancing modes (dropup.balancing). Each entry's
self-description is checked against what the code it describes does."""

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class

from dropup import balancing, config as dropup_config
from dropup.config import ModelConfig, MoEConfig
from dropup.export import balance_note
from dropup.init import build_moe_state, dense_state
from dropup.init.base import PERMUTED, SAME, ExpertKey, InitStrategy
from dropup.init.registry import STRATEGIES, cli_options, converter_strategies, normalize_options, target
from dropup.init.streaming import step0_ffn_error
from dropup.moe.layer import MoELayer
from dropup.moe.losses import load_balancing_loss
from dropup.resume import conflicts
from dropup.upcycle import build_parser

CONF_INIT = Path(__file__).resolve().parents[1] / "conf" / "init"
MODEL = ModelConfig(name="t", vocab_size=50, n_layers=1, d_model=16, d_ff=32, n_heads=2, n_kv_heads=2)
MOE = MoEConfig(enabled=True, num_experts=4, top_k=2)


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONF_INIT / f"{name}.yaml").read_text())


def _own_target(name: str) -> str:
    """The `_target_` of conf/init/<name>.yaml, following its `defaults` (noise extends drop)."""
    cfg = _yaml(name)
    return cfg.get("_target_") or _own_target(next(d for d in cfg["defaults"] if d != "_self_"))


@pytest.mark.parametrize("path", sorted(CONF_INIT.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_init_config_is_its_registered_class_with_the_class_options(path):
    cls = STRATEGIES[path.stem]
    assert get_class(_own_target(path.stem)) is cls and target(cls) == _own_target(path.stem)
    keys = set(_yaml(path.stem)) - {"_target_", "defaults"}
    assert keys <= {o.name for o in cls.options}, f"{path.name} sets options the registry does not list"
    if issubclass(cls, InitStrategy):
        defaults = cls.defaults()
        for key in keys:
            value = _yaml(path.stem)[key]
            if not (isinstance(value, str) and value.startswith("${")):  # run.py's top-level `ratio`
                assert value == defaults[key] or str(value) == str(defaults[key]), (path.stem, key)


def test_every_registered_strategy_has_its_config():
    assert {p.stem for p in CONF_INIT.glob("*.yaml")} == set(STRATEGIES)


def test_the_converter_offers_every_weight_building_strategy_and_each_of_their_flags():
    parser = build_parser()
    init = next(a for a in parser._actions if a.dest == "init")
    assert set(init.choices) == set(converter_strategies()) and "pretrained" not in init.choices
    flags = {flag for a in parser._actions for flag in a.option_strings}
    for option, takers in cli_options():
        assert option.flag in flags and takers
        assert all(STRATEGIES[t].option(option.name) is not None for t in takers)


@pytest.mark.parametrize("strategy,order", [
    (STRATEGIES["naive"](), SAME), (STRATEGIES["drop"](ratio=0.0), SAME),
    (STRATEGIES["drop"](ratio=0.0, shuffle=True), PERMUTED), (STRATEGIES["noise"](ratio=0.0), SAME),
    (STRATEGIES["drop"](ratio=0.5), None), (STRATEGIES["noise"](ratio=0.5, shuffle=True), None),
], ids=["naive", "drop-r0", "drop-r0-shuffled", "noise-r0", "drop-r0.5", "noise-r0.5-shuffled"])
def test_dense_order_says_whether_the_built_layer_is_the_dense_ffn_and_in_which_order(strategy, order):
    d_f = MOE.expert_d_ff(MODEL)
    assert strategy.dense_order(d_f) == order
    dense = dense_state(MODEL, 0)
    error = step0_ffn_error(strategy, [dense], MODEL, MOE, seed=0)
    assert (error < 1e-5) == (order is not None)
    state = build_moe_state(strategy, [dense], MODEL, MOE, seed=0)
    same_weights = torch.equal(state["layers.0.ffn.w_gate_up"][0, :d_f], dense["layers.0.ffn.w_gate.weight"])
    assert same_weights == (order == SAME)


@pytest.mark.parametrize("strategy", [STRATEGIES["naive"](), STRATEGIES["drop"](ratio=0.25),
                                      STRATEGIES["drop"](ratio=0.25, index_mode="per_matrix", shuffle=True),
                                      STRATEGIES["noise"](ratio=0.5), STRATEGIES["btx"]()],
                         ids=["naive", "drop", "drop-per-matrix-shuffled", "noise", "btx"])
def test_redrawn_neurons_are_exactly_the_neurons_that_differ(strategy):
    d_f, n = MOE.expert_d_ff(MODEL), max(strategy.min_sources, 1)
    sources = [dense_state(MODEL, i) for i in range(n)]
    state = build_moe_state(strategy, sources, MODEL, MOE, seed=3)
    for e in range(MOE.num_experts):
        key, source = ExpertKey(3, 0, e), sources[e * n // MOE.num_experts]
        perm = strategy.neuron_permutation(d_f, key)
        perm = torch.arange(d_f) if perm is None else perm
        expected = strategy.redrawn_neurons(d_f, key)
        written = {"gate": state["layers.0.ffn.w_gate_up"][e, :d_f], "down": state["layers.0.ffn.w_down"][e].t()}
        dense = {"gate": source["layers.0.ffn.w_gate.weight"][perm], "down": source["layers.0.ffn.w_down.weight"].t()[perm]}
        for m in ("gate", "down"):
            changed = (written[m] != dense[m]).any(dim=1).nonzero().flatten()
            assert torch.equal(changed, expected[m]) and changed.numel() == strategy.redrawn_count(d_f)
        if expected["gate"].numel():
            assert strategy.one_neuron_set == torch.equal(expected["gate"], expected["down"])


def test_shared_is_read_as_joint_everywhere_a_run_is_compared():
    joint, old = STRATEGIES["drop"](ratio=0.5), STRATEGIES["drop"](ratio=0.5, index_mode="shared")
    assert old.index_mode == joint.index_mode == "joint"
    dense = dense_state(MODEL, 0)
    assert all(torch.equal(a, b) for a, b in zip(build_moe_state(old, [dense], MODEL, MOE, 0).values(),
                                                  build_moe_state(joint, [dense], MODEL, MOE, 0).values()))
    recorded = {"init": "drop", "init.index_mode": "shared", "seed": 0}
    assert conflicts(recorded, {"init": "drop", "init.index_mode": "joint", "seed": 0}) == []
    assert conflicts(recorded, {"init": "drop", "init.index_mode": "per_matrix", "seed": 0}) == [
        ("init.index_mode", "joint", "per_matrix")]
    assert normalize_options("naive", {"init.index_mode": "shared"}, "init.") == {"init.index_mode": "shared"}


def test_labels_come_from_the_registry():
    assert [STRATEGIES[n].table_label(r) for n, r in
            (("scratch", None), ("naive", 0.0), ("drop", 0.0), ("drop", 0.5), ("noise", 0.0), ("btx", None),
             ("pretrained", None))] == ["FS", "NU", "NU", "DU (r=0.5)", "RNU (r=0)", "BTX", "Pretrained"]


# --- balancing modes --------------------------------------------------------------------------------------------


def test_the_config_validates_lb_mode_against_the_balancing_registry():
    assert dropup_config.LB_MODES == balancing.NAMES == tuple(balancing.MODES)
    with pytest.raises(dropup_config.ConfigError, match="lb_mode"):
        MoEConfig(enabled=True, lb_mode="nope")


@pytest.mark.parametrize("name", balancing.NAMES)
def test_each_modes_description_matches_what_the_layer_and_the_loss_do(name):
    mode = balancing.mode(name)
    moe = MoEConfig(enabled=True, num_experts=4, top_k=2, lb_mode=name)
    assert (MoELayer(16, 8, moe).expert_bias is not None) == mode.router_bias
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(32, 4, generator=g), 3 * torch.randn(32, 4, generator=g)]
    pooled = load_balancing_loss(logits, 2, "pooled")
    per_layer = load_balancing_loss(logits, 2, "per_layer")
    assert not torch.isclose(pooled, per_layer)  # the statistic the test tells apart
    got = load_balancing_loss(logits, 2, name)
    assert torch.equal(got, pooled if mode.pools_layers else per_layer)  # one process: no ranks to reduce over
    assert mode.exported_aux_coef(0.02) == (0.02 if mode.trains_loss else 0.0)
    assert (balance_note(moe, "mixtral") is not None) == (mode.export_note is not None)
    assert mode.table_suffix(1) == ("" if mode.paper else f", {mode.label}") and mode.table_suffix(2)
