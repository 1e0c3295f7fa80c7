"""The MoE layer: routing as eq. 3, backends that agree, and the auxiliary losses."""

import importlib.util

import pytest
import torch
from torch.testing import assert_close

from dropup.config import MoEConfig
from dropup.moe import backends as moe_backends
from dropup.moe.backends import combine, grouped_mm_works, swiglu
from dropup.moe.layer import MoELayer, route
from dropup.moe.losses import load_balancing_loss, router_z_loss


def make_layer(backend, experts=8, top_k=2, d=32, f=48):
    layer = MoELayer(d, f, MoEConfig(enabled=True, num_experts=experts, top_k=top_k, backend=backend))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def test_routing_is_softmax_over_the_top_k_logits():
    x, w = torch.randn(40, 16), torch.randn(6, 16)
    logits, weights, experts = route(x, w, 3)
    top_logits = logits.gather(1, experts)
    assert_close(weights, torch.softmax(top_logits, dim=-1))  # eq. 3
    assert torch.equal(experts, logits.topk(3).indices)


def run_backend(backend, x, layer_state, dtype=torch.float32):
    layer = make_layer(backend).to(dtype)
    layer.load_state_dict(layer_state)
    x = x.clone().to(dtype).requires_grad_(True)
    y, logits = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
    return y, x.grad, {n: p.grad for n, p in layer.named_parameters()}, layer.tokens_per_expert.clone()


@pytest.mark.parametrize("backend", ["grouped", "sliced", "padded"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, {}), (torch.bfloat16, {"atol": 3e-2, "rtol": 3e-2})])
def test_backends_equal_the_loop_in_outputs_and_gradients(backend, dtype, tol):
    state = make_layer("loop").state_dict()
    with torch.no_grad():  # uneven loads, one expert left empty: padding and empty slices are exercised
        state["router.weight"][3] = -100.0
        state["router.weight"] += 0.5 * torch.arange(8.0)[:, None]
    x = torch.randn(100, 32).abs()
    ref = run_backend("loop", x, state, dtype)
    assert ref[3][3] == 0 and ref[3].max() > 1.5 * ref[3].float().mean()
    got = run_backend(backend, x, state, dtype)
    assert_close(got[0], ref[0], **tol)
    assert_close(got[1], ref[1], **tol)
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], **tol, msg=name)
    assert torch.equal(got[3], ref[3])
    assert int(got[3].sum()) == 100 * 2


@pytest.fixture
def fresh_probe():
    """The backend probe and its log lines forgotten before and after (they are cached per process)."""
    grouped_mm_works.cache_clear()
    moe_backends.announce_backends_again()
    yield
    grouped_mm_works.cache_clear()
    moe_backends.announce_backends_again()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backend_that_runs_is_probed_and_logged(fresh_probe, dtype, caplog):
    assert grouped_mm_works(torch.device("cpu"), dtype)
    with caplog.at_level("INFO", logger="dropup.moe"):
        make_layer("grouped").to(dtype)(torch.randn(10, 32, dtype=dtype))
        make_layer("grouped").to(dtype)(torch.randn(10, 32, dtype=dtype))
    lines = [r.getMessage() for r in caplog.records if r.name == "dropup.moe"]
    assert lines == [f"MoE experts on cpu in {str(dtype)[6:]}: backend grouped"]  # once per device and dtype


@pytest.mark.parametrize("broken", ["raises", "wrong"])
def test_where_the_grouped_gemm_fails_the_fallback_runs_instead(fresh_probe, monkeypatch, caplog, broken):
    """A kernel that is missing (raises) or wrong (here: zeros) on a device is found by the probe, and the layer
    then computes the loop's function on the fallback backend, and says so."""
    def fake(x, w, offs=None):
        if broken == "raises":
            raise RuntimeError("grouped gemm is not supported on this device")
        return torch.zeros(x.shape[0], w.shape[-1], dtype=x.dtype)

    state = make_layer("loop").state_dict()
    x = torch.randn(50, 32)
    ref = run_backend("loop", x, state)
    monkeypatch.setattr(torch, "_grouped_mm", fake)
    assert not grouped_mm_works(torch.device("cpu"), torch.float32)
    with caplog.at_level("INFO", logger="dropup.moe"):
        got = run_backend("grouped", x, state)
    assert_close(got[0], ref[0])
    assert_close(got[1], ref[1])
    assert any(f"backend {moe_backends.FALLBACK} (torch._grouped_mm does not run here" in r.getMessage()
               for r in caplog.records)


def test_an_expert_with_no_tokens_is_fine():
    layer = make_layer("grouped", experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0  # every token picks expert 2 (positive inputs)
    y, _ = layer(torch.rand(10, 32))
    assert layer.tokens_per_expert.tolist() == [0, 0, 10, 0]
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", ["grouped", "sliced", "padded", "loop"])
def test_no_tokens_give_no_output(backend):
    y, logits = make_layer(backend)(torch.zeros(0, 32))
    assert y.shape == (0, 32) and logits.shape == (0, 8)


def test_autocast_bf16_runs_grouped_in_bf16():
    layer = make_layer("grouped")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(torch.randn(20, 32))
    assert y.dtype == torch.bfloat16


def test_combine_is_fp32_under_bf16_autocast():
    """The weighted sum of a token's k outputs runs in fp32 (autocast would run bmm in bf16, rounding the router
    weights), and is rounded to the activation dtype once."""
    g = torch.Generator().manual_seed(0)
    weights_TK = torch.softmax(torch.randn(64, 2, generator=g), dim=-1)
    out_TKD = torch.randn(64, 2, 48, generator=g).bfloat16()
    expected = (weights_TK[:, :, None] * out_TKD.float()).sum(dim=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = combine(weights_TK, out_TKD, torch.bfloat16)
        in_bf16 = torch.bmm(weights_TK.unsqueeze(1), out_TKD.float()).squeeze(1).bfloat16()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert not torch.equal(in_bf16, expected)  # what the bmm gives when autocast is left on


@pytest.mark.skipif(importlib.util.find_spec("megablocks") is None or not torch.cuda.is_available(),
                    reason="megablocks is optional and CUDA-only; not installed here")
def test_megablocks_equals_loop():  # pragma: no cover - runs only where megablocks imports
    state = make_layer("loop").state_dict()
    x = torch.randn(128, 32).cuda()
    ref = make_layer("loop").cuda().bfloat16()
    ref.load_state_dict(state)
    got = make_layer("megablocks").cuda().bfloat16()
    got.load_state_dict(state)
    assert_close(got(x.bfloat16())[0], ref(x.bfloat16())[0], atol=3e-2, rtol=3e-2)


def test_lb_loss_is_top_k_at_perfect_balance_and_larger_when_collapsed():
    # 8 tokens, each expert first choice of exactly 2 (top_k=2 over 8 experts), identical probabilities
    logits = torch.zeros(8, 8)
    for t in range(8):
        logits[t, t] = logits[t, (t + 1) % 8] = 1e-3
    assert load_balancing_loss([logits], 2).item() == pytest.approx(2.0, abs=1e-3)
    collapsed = torch.zeros(8, 8)
    collapsed[:, :2] = 10.0
    assert load_balancing_loss([collapsed], 2).item() > 7.9  # E * (1 * 0.5 + 1 * 0.5) = 8


def test_per_layer_mode_averages_the_same_formula():
    layers = [torch.randn(30, 8) * 2 for _ in range(3)]
    each = [load_balancing_loss([l], 2) for l in layers]
    assert_close(load_balancing_loss(layers, 2, "per_layer"), torch.stack(each).mean())
    assert_close(load_balancing_loss(layers[:1], 2, "pooled"), load_balancing_loss(layers[:1], 2, "per_layer"))
    assert not torch.allclose(load_balancing_loss(layers, 2, "pooled"), load_balancing_loss(layers, 2, "per_layer"))


def test_z_loss():
    logits = torch.randn(10, 4)
    assert_close(router_z_loss([logits, logits]), torch.logsumexp(logits, -1).square().mean())


def test_model_z_loss_weighting(gqa_model):
    from dropup.model import Transformer

    moe = MoEConfig(enabled=True, num_experts=4, top_k=2, z_coef=1e-3)
    model = Transformer(gqa_model, moe)
    x = torch.randint(0, gqa_model.vocab_size, (2, 8))
    losses = model.losses(model(x), x)
    assert_close(losses["loss"], losses["lm_loss"] + 0.02 * losses["lb_loss"] + 1e-3 * losses["z_loss"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch(dtype):
    from dropup.model import ChunkedCrossEntropy, cross_entropy

    logits = (torch.randn(2, 700, 50) * 3).to(dtype).requires_grad_(True)  # 1400 rows: several chunks
    targets = torch.randint(0, 50, (2, 700))
    ours = cross_entropy(logits, targets)
    (ours * 2).backward()
    ours_grad = logits.grad.clone()
    logits.grad = None
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (ref * 2).backward()
    assert ChunkedCrossEntropy.CHUNK_ROWS < 1400
    assert_close(ours, ref)
    tol = {} if dtype == torch.float32 else {"atol": 1e-4, "rtol": 1e-2}
    assert_close(ours_grad, logits.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_equals_autograd_of_its_definition(dtype):
    """The experts' activation (its own backward, to save memory traffic) gives autograd's value and gradient of
    silu(gate) * up bit for bit, and passes a numerical gradient check in fp64."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(64, 2 * 40, generator=g)).to(dtype).requires_grad_(True)
    grad_out = torch.randn(64, 40, generator=g).to(dtype)
    y = swiglu(h)
    (got,) = torch.autograd.grad(y, h, grad_out)
    gate, up = h.chunk(2, dim=-1)
    y_ref = F.silu(gate) * up
    (want,) = torch.autograd.grad(y_ref, h, grad_out)
    assert torch.equal(y, y_ref) and torch.equal(got, want)
    h64 = torch.randn(6, 8, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(swiglu, (h64,))
    with torch.no_grad():  # inference takes the plain expression
        assert torch.equal(swiglu(h), y_ref)


@pytest.mark.parametrize("mode", ["pooled", "per_layer", "aux_free"])
def test_balance_loss_from_routing_equals_the_one_recomputed_from_logits(gqa_model, mode):
    """The layers record the balance loss's counts and probability sums while routing; the loss (and its
    gradient) equals the definition recomputed from the logits and the choices made. aux_free's bias makes the
    choices differ from the logits' top k, so the counts must be those of the experts actually chosen."""
    from dropup.model import Transformer

    torch.manual_seed(0)
    model = Transformer(gqa_model, MoEConfig(enabled=True, num_experts=4, top_k=2, lb_mode=mode))
    if mode == "aux_free":
        with torch.no_grad():
            for block in model.layers:
                block.ffn.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.1, 0.0]))
    out = model(torch.randint(0, gqa_model.vocab_size, (2, 16)))
    assert len(out.router_balance) == gqa_model.n_layers
    recorded = load_balancing_loss(out.router_logits, 2, mode, out.router_experts, out.router_balance)
    recomputed = load_balancing_loss(out.router_logits, 2, mode, out.router_experts)
    assert_close(recorded, recomputed)
    routers = [b.ffn.router.weight for b in model.layers]
    for got, want in zip(torch.autograd.grad(recorded, routers, retain_graph=True),
                         torch.autograd.grad(recomputed, routers)):
        assert_close(got, want)
    if mode == "aux_free":  # the logits' own top k would count other experts
        assert not torch.allclose(load_balancing_loss(out.router_logits, 2, mode), recorded)
