"""vitkern.swiglu / vitkern.swiglu_mlp on the "triton" backend: the SwiGLU GEMM (gate and value
accumulators a tile, ``silu(g) * v`` stored, the packed pre-activation kept for backward), fc2 with
linear's residual epilogue, and the dH GEMM whose epilogue writes the packed (dg, dv). Forward and
every gradient against the fp64 reference (error <= 2 x PyTorch's own error in the same dtype + a
small atol), the packed (timm GluMlp) and the separate-weights (timm SwiGLU) layouts, the kernels
straight into poisoned outputs, opcheck, torch.compile(fullgraph=True), argument errors. Against
timm's modules: tests/nn/test_modules.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.ops.swiglu import swiglu_mlp_ref, swiglu_ref
from vitkern.testing.numerics import assert_2x_torch, poisoned

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def make_inputs(m, k, hidden, n, dtype, device, *, packed=True, bias=True, residual=None, scale=False,
                row_scale=False, fc2=True, lead=None):
    g = torch.Generator().manual_seed(977 + m + k + hidden + n)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(True)

    shape = lead + (k,) if lead is not None else (m, k)
    rows = 2 * hidden if packed else hidden
    args = dict(x=rnd(*shape), fc1_weight=rnd(rows, k, std=max(k, 1) ** -0.5),
                fc1_bias=rnd(rows, std=0.5) if bias else None)
    kw = {}
    if not packed:
        kw["value_weight"] = rnd(hidden, k, std=max(k, 1) ** -0.5)
        kw["value_bias"] = rnd(hidden, std=0.5) if bias else None
    if fc2:
        args["fc2_weight"] = rnd(n, hidden, std=hidden ** -0.5)
        args["fc2_bias"] = rnd(n, std=0.5) if bias else None
    if residual is not None:
        kw["residual"] = rnd(*(shape[:-1] + (n,)), dt=residual)
        if scale:
            kw["residual_scale"] = rnd(n, std=0.5)
        if row_scale:
            count = torch.tensor(shape[:-1]).prod().item()
            kw["row_scale"] = (torch.rand(count, generator=g) < 0.7).float().div(0.7).to(device)
    return args, kw


def run_case(args, kw, dtype):
    """The triton backend against the reference in ``dtype`` and in float64, forward and every
    gradient; returns the output."""
    ins = {**args, **kw}
    names = [k for k, v in ins.items() if v is not None and v.requires_grad]
    fc2 = "fc2_weight" in args

    def call(backend, cast=None):
        leaves = {k: (None if v is None else (v.detach() if cast is None else v.detach().to(cast))
                      .requires_grad_(v.requires_grad)) for k, v in ins.items()}
        a = [leaves[k] for k in args]
        b = {k: leaves[k] for k in kw}
        if backend == "reference":
            y = (swiglu_mlp_ref if fc2 else swiglu_ref)(*a, **b)
        else:
            with vitkern.use_backend(backend):
                y = (vitkern.swiglu_mlp if fc2 else vitkern.swiglu)(*a, **b)
        return y, leaves

    y, lv = call("triton")
    y_t, lv_t = call("reference")
    y_64, lv_64 = call("reference", F64)
    assert_2x_torch("y", y, y_64, y_t, dtype)
    g = torch.randn_like(y_64).to(y.dtype)
    gr = torch.autograd.grad(y, [lv[n] for n in names], g)
    gr_t = torch.autograd.grad(y_t, [lv_t[n] for n in names], g)
    gr_64 = torch.autograd.grad(y_64, [lv_64[n] for n in names], g.double())
    for n_, a, b, c in zip(names, gr, gr_t, gr_64):
        assert_2x_torch(f"d{n_}", a, c, b, dtype)
    return y


# (m, k, hidden, n, dtype, packed, bias, residual dtype, residual_scale, row_scale)
CASES = [
    (197, 80, 200, 80, BF16, True, True, F32, True, True),     # fp32 residual stream, drop path, LayerScale
    (197, 72, 136, 72, F16, False, True, F16, False, False),   # separate weights (timm SwiGLU)
    (50, 64, 96, 48, F32, True, False, None, False, False),    # no biases, no residual
    (1, 72, 80, 100, F32, False, True, F32, True, True),       # one row
    (97, 48, 72, 40, BF16, False, False, BF16, True, False),   # separate, no bias, 16-bit stream
    (97, 48, 72, 40, BF16, True, True, None, True, True),      # the scaled branch, its add deferred
]


@pytest.mark.parametrize("m,k,hidden,n,dtype,packed,bias,res,scale,rs", CASES)
def test_swiglu_mlp_forward_backward(device, m, k, hidden, n, dtype, packed, bias, res, scale, rs):
    args, kw = make_inputs(m, k, hidden, n, dtype, device, packed=packed, bias=bias, residual=res, scale=scale,
                           row_scale=rs)
    run_case(args, kw, dtype)


@pytest.mark.parametrize("m,k,hidden,dtype,packed,bias", [
    (197, 72, 200, BF16, True, True), (50, 80, 96, F32, False, False), (33, 72, 40, F16, False, True)])
def test_swiglu_gate_alone(device, m, k, hidden, dtype, packed, bias):
    """``swiglu`` (the gate without fc2, where a norm follows): the SwiGLU GEMM forward, the
    elementwise gate backward, then fc1's dX / dW GEMMs."""
    args, kw = make_inputs(m, k, hidden, 0, dtype, device, packed=packed, bias=bias, fc2=False)
    run_case(args, kw, dtype)


def test_swiglu_leading_dims_and_strided_x(device):
    args, kw = make_inputs(0, 72, 80, 72, F32, device, residual=F32, scale=True, row_scale=True, lead=(2, 7))
    x = torch.randn(2, 7, 144, device=device)[..., ::2].requires_grad_(True)  # a strided view
    args["x"] = x
    y = run_case(args, kw, F32)
    assert y.shape == (2, 7, 72)


def test_swiglu_partial_grads(device):
    args, kw = make_inputs(37, 48, 56, 40, BF16, device, packed=False, residual=F32, scale=True, row_scale=True)
    for k in ("fc1_weight", "fc2_weight", "x"):
        args[k].requires_grad_(False)
    kw["value_bias"].requires_grad_(False)
    run_case(args, kw, BF16)


def test_swiglu_saves_pre_only_when_training(device):
    from vitkern.ops.swiglu import launch as sw_launch

    args, kw = make_inputs(20, 32, 48, 32, F32, device)
    seen = []
    real = sw_launch.swiglu_gemm
    try:
        sw_launch.swiglu_gemm = lambda *a, **k: seen.append(a[6] is not None) or real(*a, **k)
        with torch.no_grad(), vitkern.use_backend("triton"):
            vitkern.swiglu_mlp(*args.values())
        with vitkern.use_backend("triton"):
            vitkern.swiglu_mlp(*args.values())
    finally:
        sw_launch.swiglu_gemm = real
    assert seen == [False, True]


def test_swiglu_empty(device):
    with vitkern.use_backend("triton"):
        args, _ = make_inputs(0, 32, 48, 16, F32, device)
        y = vitkern.swiglu_mlp(*args.values())
        assert y.shape == (0, 16)
        y.sum().backward()
        assert torch.equal(args["fc1_weight"].grad, torch.zeros_like(args["fc1_weight"]))
        args, kw = make_inputs(5, 0, 8, 4, F32, device, packed=False)  # K = 0: the gate of the biases
        y = vitkern.swiglu_mlp(*args.values(), **kw)
    ref = swiglu_mlp_ref(*args.values(), **kw)
    torch.testing.assert_close(y, ref)


def test_swiglu_kernels_into_poisoned_outputs(device):
    """The GEMM core's SwiGLU pieces straight: the forward GEMM (the h store and the packed
    pre-activation), the dH GEMM's gradient epilogue and the elementwise backward, every element
    written; against float64 PyTorch on the same (rounded) operands."""
    from vitkern.ops.gemm import Epilogue
    from vitkern.ops.gemm.launch import gemm, swiglu_bwd, swiglu_gemm

    m, k, hidden, n = 197, 72, 200, 48
    for dtype in (BF16, F32):
        x = torch.randn(m, k, device=device).to(dtype)
        w = (torch.randn(2 * hidden, k, device=device) * k ** -0.5).to(dtype)
        b = torch.randn(2 * hidden, device=device).to(dtype)
        h, pre = poisoned((m, hidden), dtype, device), poisoned((m, 2 * hidden), dtype, device)
        swiglu_gemm(x, w[:hidden], w[hidden:], h, b[:hidden], b[hidden:], pre)
        p64 = x.double() @ w.double().T + b.double()
        g64, v64 = p64.chunk(2, -1)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == BF16 else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pre.double(), p64, **tol)
        torch.testing.assert_close(h.double(), F.silu(g64) * v64, **tol)
        dy = torch.randn(m, n, device=device).to(dtype)
        w2 = (torch.randn(n, hidden, device=device) * hidden ** -0.5).to(dtype)
        dh64 = dy.double() @ w2.double()
        gq, vq = pre.double().chunk(2, -1)
        s = torch.sigmoid(gq)
        want = torch.cat((dh64 * vq * s * (1 + gq * (1 - s)), dh64 * gq * s), dim=1)
        dpre = poisoned((m, 2 * hidden), dtype, device)
        gemm(dy, w2.t(), dpre, Epilogue(glu_grad=True, aux=pre))
        torch.testing.assert_close(dpre.double(), want, **tol)
        dpre2 = swiglu_bwd(dh64.to(dtype), pre, dtype)
        torch.testing.assert_close(dpre2.double(), want, **tol)


def test_swiglu_opcheck(device):
    for dtype, packed in ((F32, True), (BF16, False)):
        args, kw = make_inputs(37, 48, 40, 24, dtype, device, packed=packed, residual=F32, scale=True, row_scale=True)
        x, w1, b1, w2, b2 = (args[k] for k in ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
        wv, bv = kw.get("value_weight"), kw.get("value_bias")
        op = torch.ops.vitkern.swiglu_fwd.default
        torch.library.opcheck(op, (x, w1, b1, wv, bv, w2, b2, kw["residual"], kw["residual_scale"], kw["row_scale"],
                                   True))
        torch.library.opcheck(op, (x, w1, b1, wv, bv, None, None, None, None, None, True))
        plain = [t.detach() if t is not None else None for t in (x, w1, b1, wv, bv)]
        torch.library.opcheck(op, (*plain, None, None, None, None, None, False))  # inference: nothing saved
        d = [t.detach() if t is not None else None for t in (x, w1, wv, w2, b2)]
        _, pre, h = op(x.detach(), w1.detach(), b1.detach(), None if wv is None else wv.detach(),
                       None if bv is None else bv.detach(), d[3], d[4], None, None, None, True)
        grad = torch.randn(37, 24, device=device)
        bwd = (grad, *d, kw["residual_scale"].detach(), kw["row_scale"].detach(), pre, h,
               True, True, True, not packed, not packed, True, True, True, True)
        torch.library.opcheck(torch.ops.vitkern.swiglu_bwd.default, bwd)


def test_swiglu_torch_compile(device):
    import torch._dynamo

    torch._dynamo.reset()
    args, kw = make_inputs(40, 32, 48, 32, F32, device, packed=False, residual=F32, scale=True, row_scale=True)

    def f(x, w1, b1, w2, b2, wv, bv, res, gamma, rs):
        y = vitkern.swiglu_mlp(x, w1, b1, w2, b2, value_weight=wv, value_bias=bv, residual=res,
                               residual_scale=gamma, row_scale=rs)
        return y + vitkern.swiglu(x, w1, b1, value_weight=wv, value_bias=bv).sum(-1, keepdim=True)

    ins = [*args.values(), kw["value_weight"], kw["value_bias"], kw["residual"], kw["residual_scale"],
           kw["row_scale"]]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    with vitkern.use_backend("triton"):
        y, y_e = cf(*ins), f(*ins)
        torch.testing.assert_close(y, y_e)
        leaves = [t for t in ins if t.requires_grad]
        for p, q in zip(torch.autograd.grad(y.square().sum(), leaves),
                        torch.autograd.grad(y_e.square().sum(), leaves)):
            torch.testing.assert_close(p, q)


def test_swiglu_autocast(device):
    args, kw = make_inputs(33, 32, 40, 32, F32, device, residual=F32, scale=True)
    with vitkern.use_backend("triton"), torch.autocast(device.type, dtype=BF16):
        y = vitkern.swiglu_mlp(*args.values(), **kw)
    assert y.dtype == F32
    with vitkern.use_backend("reference"), torch.autocast(device.type, dtype=BF16):
        y_ref = vitkern.swiglu_mlp(*args.values(), **kw)
    torch.testing.assert_close(y, y_ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_swiglu_other_backends(device, backend):
    args, kw = make_inputs(29, 24, 40, 16, F32, device, packed=False, residual=F32, scale=True)
    with vitkern.use_backend(backend):
        y = vitkern.swiglu_mlp(*args.values(), **kw)
        h = vitkern.swiglu(args["x"], args["fc1_weight"], args["fc1_bias"], value_weight=kw["value_weight"],
                           value_bias=kw["value_bias"])
    torch.testing.assert_close(y, swiglu_mlp_ref(*args.values(), **kw))
    torch.testing.assert_close(h, swiglu_ref(args["x"], args["fc1_weight"], args["fc1_bias"],
                                             value_weight=kw["value_weight"], value_bias=kw["value_bias"]))


def test_swiglu_bad_input_names_the_argument(device):
    x = torch.randn(4, 8, device=device)
    w_odd = torch.randn(7, 8, device=device)
    w = torch.randn(10, 8, device=device)
    w2 = torch.randn(3, 5, device=device)
    with pytest.raises(ValueError, match="fc1_weight.*even"):
        vitkern.swiglu(x, w_odd)
    with pytest.raises(ValueError, match="fc1_weight"):
        vitkern.swiglu(x, torch.randn(10, 9, device=device))
    with pytest.raises(ValueError, match="fc1_bias"):
        vitkern.swiglu(x, w, torch.randn(5, device=device))
    with pytest.raises(ValueError, match="value_weight"):
        vitkern.swiglu(x, w, value_weight=torch.randn(9, 8, device=device))
    with pytest.raises(ValueError, match="value_bias"):
        vitkern.swiglu(x, w, value_bias=torch.randn(5, device=device))
    with pytest.raises(ValueError, match="fc2_weight"):
        vitkern.swiglu_mlp(x, w, None, torch.randn(3, 10, device=device), None)
    with pytest.raises(ValueError, match="fc2_bias"):
        vitkern.swiglu_mlp(x, w, None, w2, torch.randn(4, device=device))
    with pytest.raises(TypeError, match="fc1_weight"):
        vitkern.swiglu_mlp(x, w.half(), None, w2, None)
    with pytest.raises(ValueError, match="residual"):
        vitkern.swiglu_mlp(x, w, None, w2, None, residual=torch.randn(4, 4, device=device))
