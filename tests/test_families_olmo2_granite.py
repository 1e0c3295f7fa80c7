"""What the OLMo-2 and Granite adapters refuse or write beyond tests/test_families.py's shared checks (their CASES
run there): FlexOlmo's routing switch, and the features each family holds or cannot hold."""

from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dropup.config import ConfigError, MoEConfig
from dropup.hf import configs_from_hf, hf_config, hf_config_dict, to_hf_model
from dropup.model import Transformer
from tests.test_families import BASE, CASES, randomized, tokens

MOE = MoEConfig(enabled=True, num_experts=4, top_k=2)


def dense_cfg(case):
    return configs_from_hf({**BASE, **CASES[case], "model_type": case})[0]


def test_flex_olmo_is_written_to_renormalize_and_refused_when_it_does_not():
    """FlexOlmoConfig defaults to norm_topk_prob=false (top-k softmax weights not renormalized, unlike eq. 3)."""
    written = hf_config_dict(dense_cfg("olmo2"), MOE)
    assert written["model_type"] == "flex_olmo" and written["norm_topk_prob"] is True
    assert written["pad_token_id"] is None  # FlexOlmoConfig's 100277 lies outside small vocabularies
    assert configs_from_hf(written)[1] == replace(MOE, lb_coef=written["router_aux_loss_coef"])
    with pytest.raises(ConfigError, match="norm_topk_prob=false") as err:
        configs_from_hf({**written, "norm_topk_prob": False})
    assert "\n" not in str(err.value)


def test_granite_writes_the_softmax_scale_it_computes_with():
    """GraniteConfig's attention_multiplier defaults to 1.0, not 1/sqrt(head width): a model of ours without one
    is written with 1/sqrt(K), and a config's 1.0 is read as 1.0."""
    cfg = replace(dense_cfg("granite"), attention_multiplier=None)
    ours = randomized(Transformer(cfg).eval())
    theirs = AutoModelForCausalLM.from_config(hf_config(cfg)).eval()
    theirs.load_state_dict(to_hf_model(ours.state_dict(), cfg, None), strict=False)
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        assert_close(theirs(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
    assert hf_config_dict(cfg, MOE)["attention_multiplier"] == pytest.approx(cfg.d_head ** -0.5)
    plain = configs_from_hf({**BASE, "model_type": "granite"})[0]
    assert (plain.attention_multiplier, plain.embedding_multiplier, plain.logits_scaling) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("case,changes,match", [
    ("olmo2", dict(post_norm=False), "post-norm blocks and full-width q/k norms"),
    ("olmo2", dict(qk_norm_width="head"), "post-norm blocks and full-width q/k norms"),
    ("olmo2", dict(residual_multiplier=0.5), "cannot hold model.residual_multiplier=0.5"),
    ("olmo2", dict(sliding_window=4), "cannot hold model.sliding_window=4"),
    ("granite", dict(post_norm=True), "cannot hold model.post_norm=True"),
    ("granite", dict(qk_norm=True), "cannot hold model.qk_norm=True"),
    ("granite", dict(attn_bias=True), "cannot hold model.attn_bias=True"),
])
def test_what_a_family_cannot_hold_is_one_error_line(case, changes, match):
    with pytest.raises(ConfigError, match=match) as err:
        hf_config_dict(replace(dense_cfg(case), **changes))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case,field", [("olmo2", "attention_bias"), ("granite", "attention_bias"),
                                        ("granite", "mlp_bias")])
def test_biases_the_model_cannot_hold_are_refused(case, field):
    with pytest.raises(ConfigError, match=f"{field}=true"):
        configs_from_hf({**BASE, **CASES[case], "model_type": case, field: True})
