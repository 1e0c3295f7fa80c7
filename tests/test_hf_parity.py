"""Same weights -> same logits and losses as transformers' own Llama and Mixtral."""

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from dropup.config import ConfigError, MoEConfig
from dropup.hf import configs_from_hf, from_hf, hf_config, to_hf
from dropup.model import Transformer


def tokens(vocab, batch=3, seq=24):
    return torch.randint(0, vocab, (batch, seq))


def test_dense_matches_llama(gqa_model):
    ours = Transformer(gqa_model).eval()
    theirs = LlamaForCausalLM(hf_config(gqa_model)).eval()
    theirs.load_state_dict(to_hf(ours.state_dict()), strict=True)
    x = tokens(gqa_model.vocab_size)
    assert_close(ours(x).logits, theirs(x).logits)


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_moe_matches_mixtral_logits_and_losses(gqa_model, backend):
    moe = MoEConfig(enabled=True, num_experts=4, top_k=2, backend=backend)
    ours = Transformer(gqa_model, moe).eval()
    theirs = MixtralForCausalLM(hf_config(gqa_model, moe)).eval()
    theirs.load_state_dict(to_hf(ours.state_dict()), strict=True)
    x = tokens(gqa_model.vocab_size)
    out = ours(x)
    ref = theirs(x, labels=x, output_router_logits=True)
    assert_close(out.logits, ref.logits)
    # transformers shifts the labels inside its loss; give ours the shifted pair.
    losses = ours.losses(type(out)(out.logits[:, :-1], out.router_logits), x[:, 1:])
    assert_close(losses["lb_loss"], ref.aux_loss)
    assert_close(losses["loss"], ref.loss)
    assert theirs.config.router_aux_loss_coef == pytest.approx(0.02)


def test_pooled_lb_loss_equals_transformers_function():
    from dropup.moe import load_balancing_loss

    logits = tuple(torch.randn(50, 8) * 3 for _ in range(4))
    assert_close(load_balancing_loss(list(logits), 2, "pooled"), load_balancing_loss_func(logits, 8, 2))


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_both_expert_layouts_round_trip(gqa_model, moe8, layout):
    ours = Transformer(gqa_model, moe8)
    hf_state = to_hf(ours.state_dict(), moe8, layout=layout)
    if layout == "per-expert":
        assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in hf_state
    back = from_hf(hf_state)
    assert back.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_reads_what_transformers_save_pretrained_writes(gqa_model, moe8, tmp_path):
    ours = Transformer(gqa_model, moe8).eval()
    theirs = MixtralForCausalLM(hf_config(gqa_model, moe8))
    theirs.load_state_dict(to_hf(ours.state_dict()), strict=True)
    theirs.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    model_cfg, moe_cfg = configs_from_hf(theirs.config.to_dict())
    reread = Transformer(model_cfg, moe_cfg).eval()
    reread.load_state_dict(from_hf(written), strict=True)
    x = tokens(gqa_model.vocab_size)
    assert_close(reread(x).logits, ours(x).logits)
    # and the reverse: what we write in the per-expert layout, transformers loads.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(loaded(x).logits, ours(x).logits)


def test_unknown_tensor_is_an_error():
    with pytest.raises(ConfigError, match="not part of a llama model"):
        from_hf({"model.layers.0.mlp.adapter.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="not part of a qwen3 model"):  # Qwen3-MoE has no shared expert
        from_hf({"model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(4, 2)}, family="qwen3")


@pytest.mark.parametrize(
    "field,value,match",
    [("attention_bias", True, "attention_bias"), ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "yarn"),
     ("model_type", "gpt2", "gpt2")],
)
def test_unrepresentable_hf_configs_are_refused(gqa_model, field, value, match):
    config = hf_config(gqa_model).to_dict()
    config[field] = value
    with pytest.raises(ConfigError, match=match):
        configs_from_hf(config)
