"""vitkern.mlp on the "triton" backend: fc1 (+bias +activation, pre-activation kept for backward)
and fc2 (+bias, LayerScale, drop path, residual) on the GEMM core, four backward GEMMs with the
activation derivative fused into the dU GEMM's epilogue. Forward and every gradient against the
fp64 reference (error <= 2 x PyTorch's own error in the same dtype + a small atol), opcheck,
torch.compile(fullgraph=True), autocast. The full matrix is under ``slow``.
"""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern.ops.mlp import mlp_ref
from vitkern.testing.numerics import assert_2x_torch

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def make_inputs(m, d, hidden, n, dtype, device, *, bias=True, residual=None, scale=False, row_scale=False,
                lead=None):
    g = torch.Generator().manual_seed(4321 + m + d + hidden + n)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(True)

    shape = lead + (d,) if lead is not None else (m, d)
    args = dict(x=rnd(*shape), fc1_weight=rnd(hidden, d, std=d ** -0.5),
                fc1_bias=rnd(hidden, std=0.5) if bias else None,
                fc2_weight=rnd(n, hidden, std=hidden ** -0.5), fc2_bias=rnd(n, std=0.5) if bias else None)
    kw = {}
    if residual is not None:
        kw["residual"] = rnd(*(shape[:-1] + (n,)), dt=residual)
        if scale:
            kw["residual_scale"] = rnd(n, std=0.5)
        if row_scale:
            rows = torch.tensor(shape[:-1]).prod().item()
            kw["row_scale"] = (torch.rand(rows, generator=g) < 0.7).float().div(0.7).to(device)
    return args, kw


def run_case(args, kw, activation, dtype, loss_grad=None):
    ins = {**args, **kw}
    names = [k for k, v in ins.items() if v is not None and v.requires_grad]

    def call(backend, cast=None):
        leaves = {k: (None if v is None else (v.detach() if cast is None else v.detach().to(cast))
                      .requires_grad_(v.requires_grad)) for k, v in ins.items()}
        a = [leaves[k] for k in NAMES]
        b = {k: leaves[k] for k in kw}
        with vitkern.use_backend(backend):
            if backend == "reference":
                y = mlp_ref(*a, activation=activation, **b)
            else:
                y = vitkern.mlp(*a, activation=activation, **b)
        return y, leaves

    y, lv = call("triton")
    y_t, lv_t = call("reference")
    y_64, lv_64 = call("reference", F64)
    assert_2x_torch("y", y, y_64, y_t, dtype)
    if not names:
        return y
    g = loss_grad if loss_grad is not None else torch.randn_like(y_64).to(y.dtype)
    gr = torch.autograd.grad(y, [lv[n] for n in names], g.expand_as(y))
    gr_t = torch.autograd.grad(y_t, [lv_t[n] for n in names], g.expand_as(y_t))
    gr_64 = torch.autograd.grad(y_64, [lv_64[n] for n in names], g.double().expand_as(y_64))
    for n_, a, b, c in zip(names, gr, gr_t, gr_64):
        assert_2x_torch(f"d{n_}", a, c, b, dtype)
    return y


# (m, d, hidden, n, dtype, activation, bias, residual dtype, residual_scale, row_scale)
DEFAULT_CASES = [
    (197, 192, 768, 192, BF16, "gelu", True, F32, True, True),        # ViT-Ti block MLP, fp32 stream
    (197, 384, 1536, 384, F16, "gelu_tanh", True, F16, False, False),  # ViT-S, JAX GELU
    (50, 192, 768, 192, F32, "gelu", True, None, False, False),
    (394, 64, 256, 64, BF16, None, False, BF16, True, False),
    (1, 192, 768, 100, F32, "gelu_tanh", True, F32, True, True),       # one row, N = 100
    (37, 588, 200, 96, F16, "gelu", True, None, False, False),         # K = 588, hidden 200 (plain loads)
    (197, 768, 3072, 768, BF16, "gelu", True, F32, True, True),        # ViT-B block MLP
    (197, 64, 256, 64, BF16, "quick_gelu", True, F32, True, True),     # OpenAI CLIP's block MLP
    (37, 64, 200, 48, F32, "quick_gelu", True, None, False, False),
    (197, 192, 768, 192, BF16, "gelu", True, None, True, True),       # the scaled branch, its add deferred
]


@pytest.fixture(autouse=True)
def _triton_backend():
    with vitkern.use_backend("triton"):
        yield


@pytest.mark.parametrize("m,d,hidden,n,dtype,activation,bias,res,scale,rs", DEFAULT_CASES)
def test_mlp_forward_backward(device, m, d, hidden, n, dtype, activation, bias, res, scale, rs):
    args, kw = make_inputs(m, d, hidden, n, dtype, device, bias=bias, residual=res, scale=scale, row_scale=rs)
    run_case(args, kw, activation, dtype)


def _slow_cases():
    out = []
    for dtype in (F32, F16, BF16):
        for activation in (None, "gelu", "gelu_tanh", "quick_gelu"):
            for d in (192, 384, 768):
                for m in (1, 197, 394, 1000):
                    for res, scale, rs in ((None, False, False), (dtype, True, False), (F32, True, True)):
                        out.append((m, d, 4 * d, d, dtype, activation, True, res, scale, rs))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("m,d,hidden,n,dtype,activation,bias,res,scale,rs", _slow_cases())
def test_mlp_full_matrix(device, m, d, hidden, n, dtype, activation, bias, res, scale, rs):
    args, kw = make_inputs(m, d, hidden, n, dtype, device, bias=bias, residual=res, scale=scale, row_scale=rs)
    run_case(args, kw, activation, dtype)


def test_mlp_leading_dims_expanded_grad(device):
    """(B, T, D) input, row_scale as x's leading shape, an expanded output grad (loss = y.sum())."""
    args, kw = make_inputs(0, 64, 256, 64, BF16, device, residual=F32, scale=True, row_scale=True, lead=(2, 50))
    kw["row_scale"] = kw["row_scale"].detach().reshape(2, 50)
    run_case(args, kw, "gelu", BF16, loss_grad=torch.ones((), device=device, dtype=F32))


def test_mlp_partial_grads_and_row_scale_grad(device):
    """Frozen fc1, no residual grad, a row_scale that requires grad."""
    args, kw = make_inputs(97, 64, 256, 48, F32, device, residual=F32, scale=True, row_scale=True)
    args["fc1_weight"].requires_grad_(False)
    kw["residual"].requires_grad_(False)
    kw["row_scale"] = kw["row_scale"].detach().requires_grad_(True)
    run_case(args, kw, "gelu", F32)


def test_mlp_empty(device):
    args, _ = make_inputs(0, 32, 128, 32, F32, device)
    y = vitkern.mlp(*[args[k] for k in NAMES])
    assert y.shape == (0, 32)
    y.sum().backward()
    assert args["x"].grad.shape == (0, 32) and torch.equal(args["fc1_weight"].grad, torch.zeros(128, 32))


def test_mlp_saves_pre_only_when_training(device):
    """The fc1 epilogue writes the pre-activation only when autograd records."""
    args, _ = make_inputs(33, 32, 128, 32, F32, device)
    a = [args[k].detach() for k in NAMES]
    y, pre, h = torch.ops.vitkern.mlp_fwd(*a, None, None, None, "gelu", False)
    assert pre.numel() == 0 and h.shape == (33, 128)
    y2, pre2, h2 = torch.ops.vitkern.mlp_fwd(*a, None, None, None, "gelu", True)
    p = a[0] @ a[1].T + a[2]
    torch.testing.assert_close(pre2, p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h2, torch.nn.functional.gelu(p), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, y2)


def test_mlp_autocast(device):
    dtype = BF16
    args, kw = make_inputs(50, 64, 256, 64, F32, device, residual=F32, scale=True)
    with torch.autocast(device.type, dtype=dtype):
        y = vitkern.mlp(*[args[k] for k in NAMES], residual=kw["residual"], residual_scale=kw["residual_scale"])
    assert y.dtype == F32
    with vitkern.use_backend("reference"), torch.autocast(device.type, dtype=dtype):
        y_ref = vitkern.mlp(*[args[k] for k in NAMES], residual=kw["residual"], residual_scale=kw["residual_scale"])
    torch.testing.assert_close(y, y_ref, atol=5e-2, rtol=5e-2)
    y.sum().backward()
    assert args["fc1_weight"].grad.dtype == F32 and torch.equal(kw["residual"].grad, torch.ones_like(y))


def test_mlp_opcheck(device):
    for dtype in (F32, BF16):
        args, kw = make_inputs(37, 48, 96, 40, dtype, device, residual=F32, scale=True, row_scale=True)
        a = [args[k] for k in NAMES]
        torch.library.opcheck(torch.ops.vitkern.mlp_fwd.default,
                              (*a, kw["residual"], kw["residual_scale"], kw["row_scale"], "gelu", True))
        torch.library.opcheck(torch.ops.vitkern.mlp_fwd.default, (*a, None, None, None, None, False))
        d = [t.detach() for t in a]
        pre = (d[0].float() @ d[1].float().T + d[2].float()).to(dtype)
        h = torch.nn.functional.gelu(pre.float()).to(dtype)
        grad = torch.randn(37, 40, device=device)
        bwd = (grad, d[0], d[1], d[3], d[4], kw["residual_scale"].detach(), kw["row_scale"].detach(), pre, h,
               "gelu", True, True, True, True, True, True, True)
        torch.library.opcheck(torch.ops.vitkern.mlp_bwd.default, bwd)


def test_mlp_torch_compile(device):
    import torch._dynamo

    torch._dynamo.reset()
    args, kw = make_inputs(40, 32, 128, 32, F32, device, residual=F32, scale=True, row_scale=True)
    a = [args[k] for k in NAMES]

    def f(x, w1, b1, w2, b2, res, gamma, rs):
        return vitkern.mlp(x, w1, b1, w2, b2, residual=res, residual_scale=gamma, row_scale=rs)

    ins = [*a, kw["residual"], kw["residual_scale"], kw["row_scale"]]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, y_e = cf(*ins), f(*ins)
    torch.testing.assert_close(y, y_e)
    leaves = [t for t in ins if t.requires_grad]
    for p, q in zip(torch.autograd.grad(y.square().sum(), leaves), torch.autograd.grad(y_e.square().sum(), leaves)):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_fp32_residual_16bit_gradient_stream(device, monkeypatch, dtype):
    """timm's fp32 residual stream with a 16-bit MLP (odd M / N / hidden / K): the dP GEMM reads
    the float32 dY and writes it in the compute dtype (a_copy), the dW2 GEMM reads that copy;
    every gradient stays within the 2x-torch rule against float64."""
    from vitkern.ops.mlp import launch as mlp_launch

    seen = []
    real = mlp_launch.gemm

    def spy(a, b, out, *args, **kw):
        seen.append((a.dtype, kw.get("a_copy") is not None))
        return real(a, b, out, *args, **kw)

    monkeypatch.setattr(mlp_launch, "gemm", spy)
    args, kw = make_inputs(97, 136, 200, 72, dtype, device, residual=F32, scale=True, row_scale=True)
    run_case(args, kw, "gelu", dtype)
    dp, dw2 = seen[2], seen[3]  # after the two forward GEMMs
    assert dp == (F32, True) and dw2[0] == dtype
