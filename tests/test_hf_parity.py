"""Same weights -> same logits and losses as transformers' own Llama and Mixtral."""

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from dropup import families
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


@pytest.mark.parametrize("layout", ["stacked", "fused", "per-expert"])  # fused: the old name of stacked
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


def test_a_per_expert_checkpoint_streams_into_our_stacked_experts(gqa_model, moe8, tmp_path):
    """The streaming reader stacks per-expert matrices as from_hf does, and a value transform applies both ways
    (in memory and streamed): the one mapper serves every direction."""
    from safetensors.torch import save_file

    from dropup.families.base import ATTENTION, MLP, TOP
    from dropup.families.mapping import Mapper, T, Transform
    from dropup.shards import CheckpointReader, scan

    state = Transformer(gqa_model, moe8).state_dict()
    hf_state = to_hf(state, moe8, layout="per-expert")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp_path / "moe.safetensors"))
    reader = CheckpointReader(families.family("llama").mapper("any").sources(scan([tmp_path / "moe.safetensors"])))
    assert reader.meta("layers.1.ffn.w_gate_up") == (tuple(state["layers.1.ffn.w_gate_up"].shape), torch.float32)
    assert reader.keys() == state.keys() and all(torch.equal(reader[k], state[k]) for k in state)

    shifted = Transform(to_ours=lambda w: w + 1, to_hf=lambda w: w - 1)  # e.g. (1 + w) norm gains
    layer = (T("input_layernorm.weight", "attn_norm.weight", shifted),) + ATTENTION[1:] + MLP
    mapper = Mapper("test", "dense", TOP, layer)
    dense = Transformer(gqa_model).state_dict()
    written = mapper.to_hf(dense)
    assert torch.equal(written["model.layers.0.input_layernorm.weight"], dense["layers.0.attn_norm.weight"] - 1)
    back = mapper.from_hf(written)
    assert back.keys() == dense.keys() and all(torch.equal(back[k], dense[k]) for k in dense)
    save_file({k: v.contiguous() for k, v in written.items()}, str(tmp_path / "dense.safetensors"))
    streamed = CheckpointReader(mapper.sources(scan([tmp_path / "dense.safetensors"])))
    assert torch.equal(streamed["layers.1.attn_norm.weight"], dense["layers.1.attn_norm.weight"])


def test_a_fused_tensor_needs_all_its_parts_and_the_config_to_split():
    from dropup.config import ModelConfig

    cfg = ModelConfig(name="t", family="phi3", vocab_size=11, n_layers=1, d_model=8, d_ff=12, n_heads=2,
                      n_kv_heads=1)
    state = Transformer(cfg).state_dict()
    hf_state = to_hf(state, family="phi3")
    assert hf_state["model.layers.0.self_attn.qkv_proj.weight"].shape == (16, 8)
    assert torch.equal(hf_state["model.layers.0.mlp.gate_up_proj.weight"],
                       torch.cat([state["layers.0.ffn.w_gate.weight"], state["layers.0.ffn.w_up.weight"]]))
    with pytest.raises(ConfigError, match="needs the model config"):
        from_hf(hf_state, "phi3")
    back = from_hf(hf_state, "phi3", model=cfg)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConfigError, match="attn.wv.weight is missing"):
        to_hf({k: v for k, v in state.items() if k != "layers.0.attn.wv.weight"}, family="phi3")
    with pytest.raises(ConfigError, match="has shape"):  # a config that does not describe the checkpoint
        from_hf(hf_state, "phi3", model=ModelConfig(**{**cfg.__dict__, "n_kv_heads": 2}))
