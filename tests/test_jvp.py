"""JVPs through the UNet (docs/method.md Sec. 15; sCM arXiv 2410.11081): forward-mode AD against central
finite differences in float64 on a tiny UNet with an active, unfused LoRA; the attention path taken
under forward AD (and only there); lcm.objectives.jvp's two methods."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import models.unet as unet_module
from lcm.objectives.jvp import jvp
from models.lora import adapters_disabled, fuse_lora, inject_lora
from models.unet import CrossAttention, UNetModel, attention_math

TINY = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
            transformer_depth=[1, 1], transformer_depth_middle=1, num_heads=2, context_dim=32,
            use_linear_in_transformer=True)                    # conf/experiment/smoke.yaml model.unet
T = (377.3, 41.6)                                              # float t away from integers, one per sample


def tiny_unet(dropout: float = 0.0) -> UNetModel:
    """float64; every weight nonzero (LDM zero-inits the output layers); LoRA on, B != 0, trainable.
    Weights on a 2^-12 grid: fuse_lora sums W0 + (alpha/r) B A in float32, exactly for these."""
    unet = UNetModel(**TINY, dropout=dropout).double()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        lora = inject_lora(unet, rank=4, alpha=4)                # (A, B) per layer; B = 0 at injection
        for up in lora[1::2]:
            up.normal_(0, 0.05)
        for p in unet.parameters():
            p.copy_((p * 4096).round() / 4096)
    return unet


def inputs():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    return x, torch.tensor(T, dtype=torch.float64), torch.randn(2, 3, 32, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def central(fn, primals, tangents, h):
    """[fn(p + h v) - fn(p - h v)] / 2h, by hand (independent of lcm.objectives.jvp)."""
    with torch.no_grad():
        return (fn(*(p + h * v for p, v in zip(primals, tangents)))
                - fn(*(p - h * v for p, v in zip(primals, tangents)))) / (2 * h)

#----------------------------------------------------------------------------
# Forward AD vs finite differences (float64).


def test_jvp_in_x_and_context_matches_central_difference():
    unet, (x, t, c) = tiny_unet(), inputs()
    fn = lambda x, t, c: unet(x, t, c)
    with torch.no_grad():
        plain = fn(x, t, c)
    for tangents in [(torch.randn_like(x), torch.zeros_like(t), torch.zeros_like(c)),
                     (torch.zeros_like(x), torch.zeros_like(t), torch.randn_like(c))]:  # context: k, v carry it
        out, d = jvp(fn, (x, t, c), tangents)
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)   # the softmax path computes the same F
        assert rel(central(fn, (x, t, c), tangents, 1e-5), d) < 1e-6


def test_central_difference_is_second_order():
    """Halving the step divides the error by 4 (truncation-dominated at these steps in float64)."""
    unet, (x, t, c) = tiny_unet(), inputs()
    fn, v = (lambda x: unet(x, t, c)), torch.randn_like(x)
    _, exact = jvp(fn, (x,), (v,))
    e1, e2 = (rel(jvp(fn, (x,), (v,), method="fd", fd_eps=eps)[1], exact) for eps in (1e-2, 5e-3))
    assert 3.8 < e1 / e2 < 4.2 and e2 < 1e-3, (e1, e2)


def test_time_only_tangent_is_nonzero_and_matches_central_difference():
    """An int cast or a snapped t would give exactly 0. The tolerance is set by the UNet's time
    embedding, which runs in float32 (timestep_embedding: ulp(377) = 3e-5): FD noise ~ 1e-5 / h
    against O(h^2) truncation; h = 0.03 balances them (float64 embedding: 1e-9)."""
    unet, (x, t, c) = tiny_unet(), inputs()
    fn = lambda x, t: unet(x, t, c)
    out, d = jvp(fn, (x, t), (torch.zeros_like(x), torch.ones_like(t)))
    assert d.norm() > 1e-2 * out.norm()
    assert rel(central(fn, (x, t), (torch.zeros_like(x), torch.ones_like(t)), 0.03), d) < 1e-3


def test_jvp_is_linear_in_the_tangent():
    unet, (x, t, c) = tiny_unet(), inputs()
    fn = lambda x, t: unet(x, t, c)
    v1, v2 = (torch.randn_like(x), torch.tensor([0.5, -1.25], dtype=x.dtype)), (torch.randn_like(x), torch.ones_like(t))
    d1, d2 = jvp(fn, (x, t), v1)[1], jvp(fn, (x, t), v2)[1]
    d12 = jvp(fn, (x, t), tuple(a + 2.5 * b for a, b in zip(v1, v2)))[1]
    assert rel(d12, d1 + 2.5 * d2) < 1e-6 and d1.norm() > 0    # 1e-6: the t part runs in float32


def test_jvp_with_lora_unfused_equals_fused():
    unet, (x, t, c) = tiny_unet(), inputs()
    fn = lambda x, t: unet(x, t, c)
    tangents = (torch.randn_like(x), torch.ones_like(t))
    _, d_unfused = jvp(fn, (x, t), tangents)
    with adapters_disabled(unet):
        _, d_base = jvp(fn, (x, t), tangents)
    fuse_lora(unet)
    _, d_fused = jvp(fn, (x, t), tangents)
    assert rel(d_fused, d_unfused) < 1e-10
    assert rel(d_base, d_unfused) > 1e-3                        # the LoRA does change the JVP


@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_outputs_are_detached_while_grad_is_on(method):
    unet, (x, t, c) = tiny_unet(), inputs()
    assert torch.is_grad_enabled() and all(p.requires_grad for p in unet.parameters())
    out, d = jvp(lambda x: unet(x, t, c), (x.requires_grad_(),), (torch.randn_like(x),), method=method)
    assert out.grad_fn is None and d.grad_fn is None and not d.requires_grad

#----------------------------------------------------------------------------
# The attention path: softmax under forward AD only.


def test_attention_math_equals_sdpa_and_its_math_jvp():
    q, v = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
    k, dq, dk, dv = torch.randn_like(v), torch.randn_like(q), torch.randn_like(v), torch.randn_like(v)
    torch.testing.assert_close(attention_math(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))[1]
    torch.testing.assert_close(torch.func.jvp(attention_math, (q, k, v), (dq, dk, dv))[1], ref, rtol=1e-12, atol=1e-12)


def test_softmax_path_only_under_forward_ad(monkeypatch):
    unet, (x, t, c) = tiny_unet(), inputs()
    n = sum(isinstance(m, CrossAttention) for m in unet.modules())
    calls = {"fused": 0, "math": 0}

    def spy(name, f):
        def g(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return g
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy("fused", F.scaled_dot_product_attention))
    monkeypatch.setattr(unet_module, "attention_math", spy("math", attention_math))

    def count(run):
        calls.update(fused=0, math=0)
        with torch.no_grad():
            run()
        return calls["fused"], calls["math"]
    v = torch.randn_like(x)
    assert count(lambda: unet(x, t, c)) == (n, 0)
    assert count(lambda: torch.func.jvp(lambda x: unet(x, t, c), (x,), (v,))) == (0, n)
    with fwAD.dual_level():
        assert count(lambda: unet(fwAD.make_dual(x, v), t, c)) == (0, n)
        assert count(lambda: unet(x, t, c)) == (n, 0)             # inside a dual level, no dual input
    # tangent in the context only: the first self-attention has none (fused), the first cross-attention
    # gets it through k and v only; every later block through the residual stream
    assert count(lambda: torch.func.jvp(lambda c: unet(x, t, c), (c,), (torch.randn_like(c),))) == (1, n - 1)


def test_compiled_code_takes_the_same_paths():
    """torch.compile(fullgraph=True) of an ordinary call keeps SDPA alone (the check leaves no op: dynamo
    guards on the dual level); compiled around torch.func.jvp or a dual level, the graph holds the softmax.
    (Forward AD *around* an already compiled module is not traced by dynamo: fullgraph=True raises
    Unsupported, otherwise the frame runs eagerly, where the check holds.)"""
    attn = CrossAttention(16, 8, 2, 8).double()
    x, c = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    out, d = torch.func.jvp(lambda x: attn(x, c), (x,), (v,))

    def dual(x):
        with fwAD.dual_level():
            return fwAD.unpack_dual(attn(fwAD.make_dual(x, v), c)).tangent
    for f, want, kernel in [(lambda x: attn(x, c), out, "scaled_dot_product_attention"),
                            (lambda x: torch.func.jvp(lambda x: attn(x, c), (x,), (v,))[1], d, "softmax"),
                            (dual, d, "softmax")]:
        graphs = []
        backend = lambda gm, _: graphs.append({str(n.target) for n in gm.graph.nodes}) or gm
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend=backend)(x), want, rtol=1e-12, atol=1e-12)
        [ops] = graphs
        assert [kernel] == [k for k in ("scaled_dot_product_attention", "softmax") if any(k in o for o in ops)]


def test_fused_kernel_has_no_forward_ad(monkeypatch):
    """Why the guard exists (pytorch#128971). If this fails, torch now differentiates its fused CPU
    kernel forward: the softmax path in models/unet.py can go."""
    unet, (x, t, c) = tiny_unet(), inputs()
    monkeypatch.setattr(unet_module, "has_tangent", lambda *ts: False)
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp(lambda x: unet(x, t, c), (x,), (torch.randn_like(x),))

#----------------------------------------------------------------------------
# lcm.objectives.jvp: method="fd", dropout masks, arguments.


def test_fd_method_agrees_with_autograd():
    unet, (x, t, c) = tiny_unet(), inputs()
    fn, tangents = (lambda x, c: unet(x, t, c)), (torch.randn_like(x), torch.randn_like(c))
    out, d = jvp(fn, (x, c), tangents)
    out_fd, d_fd = jvp(fn, (x, c), tangents, method="fd")      # fd_eps = 1e-3: O(h^2) ~ 1e-5 here
    torch.testing.assert_close(out_fd, out, rtol=1e-12, atol=1e-12)   # fused vs softmax attention: rounding
    assert rel(d_fd, d) < 1e-4


@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_every_evaluation_and_the_next_forward_share_dropout_masks(method):
    unet, (x, t, c) = tiny_unet(dropout=0.5).train(), inputs()
    fn, v = (lambda x: unet(x, t, c)), torch.randn_like(x)
    out, d = jvp(fn, (x,), (v,), method=method)
    _, exact = jvp(fn, (x,), (v,))                              # the RNG state was left as it was: same masks
    assert rel(d, exact) < 1e-4                                 # fd: plus and minus drew the same masks too
    with torch.no_grad():
        torch.testing.assert_close(fn(x), out, rtol=1e-12, atol=1e-12)   # the caller's next forward: same masks
        assert rel(fn(x), out) > 1e-2                           # (dropout is on: a new draw differs)


def test_bad_arguments_raise():
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be one of"):
        jvp(torch.sin, (x,), (x,), method="forward")
    with pytest.raises(ValueError, match="tangents must match"):
        jvp(torch.sin, (x,), (x[:2],), method="fd")


def test_jvp_through_frozen_storage_equals_the_rounded_fp32_unet():
    """train.frozen_storage=float16: the casting layers' custom Functions carry a jvp rule (torch.func needs
    setup_context), the CPU conv fast path steps aside; the JVP equals the fp32 UNet's whose frozen weights
    are the fp16-rounded ones (weights on a 2^-12 grid of |w| < 1: exact in fp16)."""
    import copy

    from models.storage import store_frozen
    ref = tiny_unet().float().requires_grad_(False)
    stored = copy.deepcopy(ref)
    store_frozen(stored, torch.float16)
    assert {p.dtype for p in stored.parameters()} == {torch.float16, torch.float32}
    x, t, c = (v.float() for v in inputs())
    primals, tangents = (x, t, c), (torch.randn_like(x), torch.ones_like(t), torch.zeros_like(c))
    out_r, dot_r = jvp(lambda *a: ref(*a), primals, tangents)
    out_s, dot_s = jvp(lambda *a: stored(*a), primals, tangents)
    assert rel(out_s, out_r) < 1e-5 and rel(dot_s, dot_r) < 1e-4
