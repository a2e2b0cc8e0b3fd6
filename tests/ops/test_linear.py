"""vitkern.linear on the "triton" backend (the GEMM core of vitkern.ops.gemm): forward and every
gradient against the fp64 reference, for all dtypes and activations, with and without bias,
residual, residual_scale and row_scale, at ViT shapes and awkward ones; opcheck of the registered
ops; torch.compile(fullgraph=True); autocast. Without a GPU the kernels run through Triton's
interpreter on CPU tensors, so shapes stay small; the full matrix is under ``slow``.

Tolerance (DESIGN.md): the kernel's error against fp64 is at most twice the error of PyTorch in
the same dtype (the reference implementation run in that dtype) plus a small atol.
"""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern.ops.linear import linear_ref
from vitkern.testing.numerics import assert_2x_torch

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def make_inputs(m, n, k, dtype, device, *, bias=True, residual=None, scale=False, row_scale=False, lead=None,
                grad=True):
    """x (lead..., k) or (m, k); weight (n, k) ~ nn.Linear init scale; residual of dtype ``residual``."""
    g = torch.Generator().manual_seed(1234 + m + n + k)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

    shape = lead + (k,) if lead is not None else (m, k)
    args = dict(x=rnd(*shape), weight=rnd(n, k, std=k ** -0.5), bias=rnd(n, std=0.5) if bias else None)
    kw = {}
    if residual is not None:
        kw["residual"] = rnd(*(shape[:-1] + (n,)), dt=residual)
        if scale:
            kw["residual_scale"] = rnd(n, std=0.5)
        if row_scale:
            rows = torch.tensor(shape[:-1]).prod().item()
            kw["row_scale"] = (torch.rand(rows, generator=g) < 0.7).float().div(0.7).to(device)
    if grad:
        for t in (*args.values(), *kw.values()):
            if t is not None and t.is_floating_point():
                t.requires_grad_(True)
    return args, kw


def run_case(args, kw, activation, dtype, *, check_grads=True, loss_grad=None):
    """Triton vs reference (in dtype) vs reference (fp64): forward and every requested grad."""
    names = [k for k, v in {**args, **kw}.items() if v is not None and v.requires_grad]
    ins = {**args, **kw}

    def call(backend, cast=None):
        with vitkern.use_backend(backend):
            if cast is None:
                leaves = {k: (v.detach().requires_grad_(v.requires_grad) if v is not None else None)
                          for k, v in ins.items()}
            else:
                leaves = {k: (v.detach().to(cast).requires_grad_(v.requires_grad) if v is not None else None)
                          for k, v in ins.items()}
            a = {k: leaves[k] for k in args}
            b = {k: leaves[k] for k in kw}
            if backend == "reference":
                y = linear_ref(a["x"], a["weight"], a["bias"], activation=activation, **b)
            else:
                y = vitkern.linear(a["x"], a["weight"], a["bias"], activation=activation, **b)
        return y, leaves

    y, leaves = call("triton")
    y_t, leaves_t = call("reference")
    y_64, leaves_64 = call("reference", F64)
    assert_2x_torch("y", y, y_64, y_t, dtype)
    if not check_grads or not names:
        return y
    g = loss_grad if loss_grad is not None else torch.randn_like(y_64).to(y.dtype)
    gr = torch.autograd.grad(y, [leaves[n] for n in names], g.expand_as(y))
    gr_t = torch.autograd.grad(y_t, [leaves_t[n] for n in names], g.expand_as(y_t))
    gr_64 = torch.autograd.grad(y_64, [leaves_64[n] for n in names], g.double().expand_as(y_64))
    for n_, a, b, c in zip(names, gr, gr_t, gr_64):
        assert_2x_torch(f"d{n_}", a, c, b, dtype)
    return y


@pytest.fixture(autouse=True)
def _triton_backend():
    with vitkern.use_backend("triton"):
        yield


# (m, n, k, dtype, activation, bias, residual dtype, residual_scale, row_scale)
DEFAULT_CASES = [
    (197, 576, 192, BF16, None, True, None, False, False),         # qkv, ViT-Ti
    (197, 768, 192, BF16, "gelu", True, None, False, False),       # fc1, ViT-Ti
    (394, 192, 768, BF16, None, True, F32, True, True),            # fc2 + LayerScale + drop path, fp32 stream
    (197, 384, 384, F16, "gelu_tanh", True, F16, True, False),
    (197, 384, 1536, F16, None, False, F16, False, True),
    (1, 1000, 768, BF16, None, True, None, False, False),          # classifier head, batch 1
    (37, 100, 588, F32, "gelu", True, F32, True, True),            # K = 588 (plain loads), N = 100
    (197, 192, 192, F32, None, True, F32, False, False),
    (50, 1000, 384, F16, "gelu", False, None, False, False),
    (197, 3072, 768, BF16, "gelu", True, None, False, False),       # fc1, ViT-B
    (1000, 192, 768, BF16, None, True, F32, True, True),           # fc2, ViT-Ti, M = 1000
    (197, 768, 192, BF16, "quick_gelu", True, None, False, False),  # fc1, OpenAI CLIP
    (37, 100, 64, F32, "quick_gelu", True, F32, True, True),       # fp32, with the residual epilogue
    (394, 192, 768, BF16, None, True, None, True, True),           # proj's scaled branch, its add deferred
    (37, 100, 64, F32, "gelu", True, None, True, False),           # LayerScale alone, no residual
]


@pytest.mark.parametrize("m,n,k,dtype,activation,bias,res,scale,rs", DEFAULT_CASES)
def test_linear_forward_backward(device, m, n, k, dtype, activation, bias, res, scale, rs):
    args, kw = make_inputs(m, n, k, dtype, device, bias=bias, residual=res, scale=scale, row_scale=rs)
    run_case(args, kw, activation, dtype)


def _slow_cases():
    out = []
    for dtype in (F32, F16, BF16):
        for activation in (None, "gelu", "gelu_tanh", "quick_gelu"):
            for d in (192, 384, 768):
                for m in (1, 197, 394, 1000):
                    for n, k in ((3 * d, d), (4 * d, d), (d, 4 * d)):
                        for res, scale, rs in ((None, False, False), (dtype, True, False), (F32, True, True)):
                            out.append((m, n, k, dtype, activation, True, res, scale, rs))
    for n, k in ((1000, 768), (100, 192), (21843, 768), (768, 588), (1000, 1024)):
        out.append((7, n, k, BF16, None, True, None, False, False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("m,n,k,dtype,activation,bias,res,scale,rs", _slow_cases())
def test_linear_full_matrix(device, m, n, k, dtype, activation, bias, res, scale, rs):
    args, kw = make_inputs(m, n, k, dtype, device, bias=bias, residual=res, scale=scale, row_scale=rs)
    run_case(args, kw, activation, dtype)


def test_linear_leading_dims_and_strides(device):
    """3-D input that is a transposed view, an expanded (stride-0) output grad, row_scale given
    as x's leading shape."""
    dtype = BF16
    base = torch.randn(197, 2, 384, device=device).to(dtype)
    x = base.transpose(0, 1).requires_grad_(False)  # (2, 197, 384), non-contiguous
    x = x.detach().requires_grad_(True)
    w = (torch.randn(192, 384, device=device) * 384 ** -0.5).to(dtype).requires_grad_(True)
    b = torch.randn(192, device=device).to(dtype).requires_grad_(True)
    res = torch.randn(2, 197, 192, device=device).requires_grad_(True)
    rs = torch.tensor([0.0, 1.25], device=device)[:, None].expand(2, 197)
    args = dict(x=x, weight=w, bias=b)
    kw = dict(residual=res, row_scale=rs.contiguous())
    run_case(args, kw, "gelu", dtype, loss_grad=torch.ones((), device=device, dtype=F32))


def test_linear_empty_and_tiny(device):
    """M = 0 gives an empty result (and empty grads); K = 1 and N = 1 work."""
    w = torch.randn(64, 32, device=device, requires_grad=True)
    x = torch.empty(0, 32, device=device, requires_grad=True)
    y = vitkern.linear(x, w, torch.zeros(64, device=device), activation="gelu")
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 32) and torch.equal(w.grad, torch.zeros_like(w))
    x = torch.empty(3, 0, 5, device=device)
    assert vitkern.linear(x, torch.randn(7, 5, device=device)).shape == (3, 0, 7)
    for n, k in ((1, 16), (16, 1), (1, 1)):
        args, kw = make_inputs(5, n, k, F32, device)
        run_case(args, kw, "gelu", F32)


def test_linear_partial_requires_grad(device):
    """Frozen weight, trainable bias / LayerScale; a row_scale that requires grad."""
    args, kw = make_inputs(197, 192, 384, F32, device, residual=F32, scale=True, row_scale=True)
    args["weight"].requires_grad_(False)
    kw["row_scale"] = kw["row_scale"].detach().requires_grad_(True)
    kw["residual"].requires_grad_(False)
    run_case(args, kw, None, F32)
    args, kw = make_inputs(97, 192, 64, BF16, device, residual=F32, scale=True, row_scale=True)
    kw["row_scale"] = kw["row_scale"].detach().requires_grad_(True)
    args["x"].requires_grad_(False)
    run_case(args, kw, "gelu_tanh", BF16)


def test_linear_inference_skips_pre(device):
    """Without autograd recording, the forward writes no pre-activation (the op returns an empty
    placeholder); with it, the pre-activation is saved and is x @ W^T + b."""
    x = torch.randn(33, 64, device=device)
    w = torch.randn(48, 64, device=device)
    b = torch.randn(48, device=device)
    y, pre = torch.ops.vitkern.linear_fwd(x, w, b, None, None, None, "gelu", False)
    assert pre.numel() == 0
    y2, pre2 = torch.ops.vitkern.linear_fwd(x, w, b, None, None, None, "gelu", True)
    torch.testing.assert_close(pre2, x @ w.T + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, y2)
    with torch.no_grad():
        y3 = vitkern.linear(x, w.requires_grad_(True), b, activation="gelu")
    torch.testing.assert_close(y3, y)


def test_linear_tf32_precision(device):
    """fp32 follows torch.backends.cuda.matmul.fp32_precision (IEEE by default, TF32 when set);
    on the CPU interpreter TF32 dots are exact, so only the plumbing is exercised."""
    prev = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        args, kw = make_inputs(64, 96, 80, F32, device)
        with vitkern.use_backend("triton"):
            y = vitkern.linear(args["x"], args["weight"], args["bias"])
        ref = args["x"].double() @ args["weight"].double().T + args["bias"].double()
        tol = 1e-2 if device.type == "cuda" else 1e-5
        torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev


def test_linear_autocast(device):
    """Under autocast the GEMM operands become the autocast dtype; a float32 residual keeps its
    dtype and sets the output's (timm's fp32 residual stream)."""
    dtype = BF16
    x = torch.randn(2, 50, 128, device=device, requires_grad=True)
    w = (torch.randn(128, 128, device=device) * 128 ** -0.5).requires_grad_(True)
    g = torch.rand(128, device=device, requires_grad=True)
    res = torch.randn(2, 50, 128, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype):
        y = vitkern.linear(x, w, None, residual=res, residual_scale=g)
        y_plain = vitkern.linear(x, w, None, activation="gelu")
    assert y.dtype == F32 and y_plain.dtype == dtype
    ref = res.double() + g.double() * (x.to(dtype).double() @ w.to(dtype).double().T)
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=3e-2)
    (y.sum() + y_plain.float().sum()).backward()
    assert x.grad.dtype == F32 and w.grad.dtype == F32 and torch.equal(res.grad, torch.ones_like(res))


def test_linear_opcheck(device):
    """torch.library.opcheck of the forward and backward ops (schema, fake, autograd)."""
    for dtype in (F32, BF16):
        args, kw = make_inputs(37, 48, 40, dtype, device, residual=F32, scale=True, row_scale=True)
        x, w, b = args["x"], args["weight"], args["bias"]
        fwd_args = (x, w, b, kw["residual"], kw["residual_scale"], kw["row_scale"], "gelu", True)
        torch.library.opcheck(torch.ops.vitkern.linear_fwd.default, fwd_args)
        torch.library.opcheck(torch.ops.vitkern.linear_fwd.default, (x, w, None, None, None, None, None, False))
        pre = (x.detach().float() @ w.detach().float().T).to(dtype)
        grad = torch.randn(37, 48, device=device)
        bwd_args = (grad, x.detach(), w.detach(), b.detach(), kw["residual_scale"].detach(),
                    kw["row_scale"].detach(), pre, "gelu", True, True, True, True, False)
        torch.library.opcheck(torch.ops.vitkern.linear_bwd.default, bwd_args)
        bwd_args = (grad.to(dtype), x.detach(), w.detach(), None, None, None, pre[:0].reshape(0), None,
                    True, False, False, False, False)
        torch.library.opcheck(torch.ops.vitkern.linear_bwd.default, bwd_args)


def test_linear_torch_compile(device):
    """torch.compile(fullgraph=True): no graph break, same forward and grads as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    args, kw = make_inputs(50, 96, 64, F32, device, residual=F32, scale=True, row_scale=True)

    def f(x, w, b, res, gamma, rs):
        return vitkern.linear(x, w, b, activation="gelu", residual=res, residual_scale=gamma, row_scale=rs)

    ins = [args["x"], args["weight"], args["bias"], kw["residual"], kw["residual_scale"], kw["row_scale"]]
    cf = torch.compile(f, fullgraph=True)  # inductor: the custom ops stay opaque kernels
    y = cf(*ins)
    y_e = f(*ins)
    torch.testing.assert_close(y, y_e)
    leaves = [t for t in ins if t.requires_grad]
    g = torch.autograd.grad(y.square().sum(), leaves)
    g_e = torch.autograd.grad(y_e.square().sum(), leaves)
    for a, b in zip(g, g_e):
        torch.testing.assert_close(a, b)


def test_linear_triton_backend_registered():
    from vitkern import _backend

    assert "triton" in _backend.registered_backends("linear")


@pytest.mark.parametrize("dtype,activation", [(BF16, None), (F16, None), (BF16, "gelu")])
def test_fp32_residual_16bit_gradient_stream(device, monkeypatch, dtype, activation):
    """timm's fp32 residual stream with a 16-bit branch (odd M / N / K): dY arrives float32; the
    dX GEMM writes it in the compute dtype as it reads it (a_copy) and the dW GEMM reads that copy
    (with an activation, act_bwd's 16-bit dPre is already the dW operand); every gradient stays
    within the 2x-torch rule against float64."""
    from vitkern.ops.linear import launch as linear_launch

    seen = []
    real = linear_launch.gemm

    def spy(a, b, out, *args, **kw):
        seen.append((a.dtype, kw.get("a_copy") is not None))
        return real(a, b, out, *args, **kw)

    monkeypatch.setattr(linear_launch, "gemm", spy)
    args, kw = make_inputs(97, 200, 136, dtype, device, residual=F32, scale=True, row_scale=True)
    run_case(args, kw, activation, dtype)
    dx_gemm, dw_gemm = seen[-2], seen[-1]  # the backward's two GEMMs, dX first
    assert dw_gemm[0] == dtype
    if activation is None:
        assert dx_gemm == (F32, True)
