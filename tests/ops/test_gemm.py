"""The GEMM core (vitkern.ops.gemm) that linear, mlp and patch_embed share: every config on the
interpreter (TMA and plain-load paths, ragged tails), each epilogue / prologue feature, split-K,
the A-gather and row-map hooks, config selection, and the static compile check for sm_80 / sm_90
(no spills, shared memory under the limit, wgmma in the sm_90 PTX of 16-bit and TF32 configs).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from vitkern.ops import gemm as _gemm
from vitkern.ops.activation import Activation
from vitkern.ops.gemm import Epilogue
from vitkern.ops.gemm import launch as _launch
from vitkern.ops._config import device_arch
from vitkern.testing.numerics import assert_2x_rounding, poisoned

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("name", sorted(_gemm.GEMM_CONFIGS))
def test_every_config_fused_epilogue(device, name):
    """Each config, ragged M / N / K, bias + GELU + pre-activation store; and the residual
    epilogue with LayerScale, row scale and a float32 residual."""
    cfg = _gemm.GEMM_CONFIGS[name]
    dtype = F32 if ("tf32" in name or "fp32" in name) else BF16
    M, N, K = 150, 136, 200
    a = torch.randn(M, K, device=device).to(dtype)
    b = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    out, pre = poisoned((M, N), dtype, device), poisoned((M, N), dtype, device)
    _launch.gemm(a, b, out, Epilogue(bias=bias, activation=Activation.GELU, pre=pre), config=cfg)
    p = a.double() @ b.double().T + bias.double()
    assert_2x_rounding("pre", pre, p, op="gemm")
    assert_2x_rounding("out", out, torch.nn.functional.gelu(p), op="gemm")
    res = torch.randn(M, N, device=device)
    gamma, rs = torch.rand(N, device=device).to(dtype), torch.rand(M, device=device)
    out = poisoned((M, N), F32, device)
    _launch.gemm(a, b, out, Epilogue(bias=bias, col_scale=gamma, row_scale=rs, residual=res), config=cfg)
    assert_2x_rounding("out", out, res.double() + rs.double()[:, None] * gamma.double() * p, op="gemm")


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_transposed_operands_and_unaligned_rows(device, dtype):
    """Operands as transposed views (TMA mode 2 / plain), rows of 588 and 100 elements that TMA
    cannot address (plain loads), a non-contiguous output."""
    for M, N, K in ((77, 100, 588), (64, 96, 64)):
        a = torch.randn(K, M, device=device).to(dtype).t()
        b = (torch.randn(K, N, device=device) * K ** -0.5).to(dtype).t()
        out = poisoned((N, M), dtype, device).t()
        _launch.gemm(a, b, out)
        assert_2x_rounding("out", out, a.double() @ b.double().T, op="gemm")
    mode = _launch._operand_mode(torch.empty(8, 588, dtype=BF16), True)
    assert mode == _launch.LOAD_PLAIN  # 1176-byte rows: not 16-byte aligned
    assert _launch._operand_mode(torch.empty(8, 768, dtype=BF16), True) == _launch.LOAD_TMA
    assert _launch._operand_mode(torch.empty(768, 8, dtype=BF16).t(), True) == _launch.LOAD_TMA_T


@pytest.mark.parametrize("split_k", [1, 3])
def test_dw_features(device, split_k):
    """The dW GEMM: A = dY^T (float32 grad, cast to bf16 in the load), reduction-axis scale,
    epilogue row scale, row sums of A', row dots with W; split-K partials summed."""
    M, N, K = 72, 40, 300  # out (72, 40), reduction 300
    g = torch.randn(K, M, device=device)
    x = torch.randn(K, N, device=device).to(BF16)
    w = torch.randn(M, N, device=device).to(BF16)
    red, gamma = torch.rand(K, device=device), torch.rand(M, device=device).to(BF16)
    out = poisoned((M, N), BF16, device)
    cfg = _gemm.GEMM_CONFIGS["h100_16_small" if device_arch() >= 90 else "a100_16_small"]
    _, s, d = _launch.gemm(g.t(), x.t(), out, Epilogue(row_scale=gamma, row_dot=w), red_scale=red, row_sum=True,
                         split_k=split_k, config=cfg)
    a = (g * red[:, None]).to(BF16).double()
    G = a.T @ x.double()
    assert_2x_rounding("out", out, G * gamma.double()[:, None], op="gemm")
    torch.testing.assert_close(s.double(), a.sum(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(d.double(), (G * w.double()).sum(1), atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize("act", [Activation.GELU, Activation.GELU_TANH])
def test_activation_grad_epilogue_and_act_bwd(device, act):
    M, N, H = 100, 48, 136
    g = torch.randn(M, N, device=device).to(BF16)
    w2 = (torch.randn(N, H, device=device) * N ** -0.5).to(BF16)
    pre = torch.randn(M, H, device=device).to(BF16)
    rs = torch.rand(M, device=device)
    out = poisoned((M, H), BF16, device)
    _launch.gemm(g, w2.t(), out, Epilogue(row_scale=rs, act_grad=act, aux=pre))
    p = pre.double().requires_grad_()
    y = torch.nn.functional.gelu(p, approximate="tanh" if act == Activation.GELU_TANH else "none")
    (dp,) = torch.autograd.grad(y, p, torch.ones_like(y))
    assert_2x_rounding("out", out, (g.double() @ w2.double()) * rs.double()[:, None] * dp, op="gemm")
    gg = torch.randn(M, H, device=device)
    col = torch.rand(H, device=device).to(BF16)
    d, dscale = _launch.act_bwd(gg, pre, act, F32, col_scale=col, row_scale=rs, want_dscale=True)
    assert_2x_rounding("d", d, gg.double() * rs.double()[:, None] * col.double() * dp, op="gemm")
    torch.testing.assert_close(dscale.double(), (gg.double() * rs.double()[:, None] * y.detach()).sum(0),
                               atol=1e-3, rtol=1e-4)


def test_empty_shapes(device):
    a, b = torch.randn(0, 16, device=device), torch.randn(8, 16, device=device)
    out, s, _ = _launch.gemm(a, b, torch.empty(0, 8, device=device), row_sum=True)
    assert out.shape == (0, 8) and s.shape == (0,)
    out = poisoned((5, 8), F32, device)
    _launch.gemm(torch.empty(5, 0, device=device), torch.empty(8, 0, device=device), out,
               Epilogue(bias=torch.ones(8, device=device), activation=Activation.GELU))
    torch.testing.assert_close(out, torch.nn.functional.gelu(torch.ones(5, 8, device=device)))


# ---- the A-gather and row-map hooks (patch embedding's implicit im2col and token placement)


@triton.jit
def _gather_transposed(a_ptr, offs_m, offs_k, M, K, a_args):
    """A toy gather: A[m, k] stored transposed with row stride a_args[0]."""
    ptrs = a_ptr + offs_k[None, :].to(tl.int64) * a_args[0] + offs_m[:, None]
    return tl.load(ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)


@triton.jit
def _rows_after_prefix(offs_m, c_args):
    """Output row of GEMM row m: c_args[0] patches per image, c_args[1] prefix rows per image;
    residual (pos_embed) row: the patch index."""
    n_patch = c_args[0]
    n_prefix = c_args[1]
    img = offs_m // n_patch
    return offs_m + (img + 1) * n_prefix, offs_m % n_patch


def test_gather_and_row_map_hooks(device):
    n_img, n_patch, n_prefix, K, N = 3, 10, 2, 48, 32
    M = n_img * n_patch
    at = torch.randn(K, M, device=device)
    b = torch.randn(N, K, device=device)
    pos = torch.randn(n_patch, N, device=device)
    out = poisoned((n_img * (n_patch + n_prefix), N), F32, device)
    cfg = _gemm.GEMM_CONFIGS["h100_fp32" if device_arch() >= 90 else "a100_fp32"]
    _launch.gemm(at, b, out, a_gather=_gather_transposed, a_args=(at.stride(0),), a_shape=(M, K),
               epilogue=Epilogue(residual=pos), row_map=_rows_after_prefix, c_args=(n_patch, n_prefix), config=cfg)
    y = (at.t() @ b.t()).reshape(n_img, n_patch, N) + pos
    got = out.reshape(n_img, n_patch + n_prefix, N)
    torch.testing.assert_close(got[:, n_prefix:], y, atol=1e-4, rtol=1e-4)
    assert torch.isnan(got[:, :n_prefix]).all()  # prefix rows untouched


# ---- configs


def test_config_selection_covers_every_key():
    for arch in (80, 90):
        for dtype in (F16, BF16, F32):
            for M in (1, 197, 12608):
                for N in (16, 768, 21843):
                    for K in (16, 768):
                        cfg = _gemm.select_config(M, N, K, dtype, arch)
                        assert cfg.tma is False or arch >= 90
                        assert cfg.block_m >= 64 and cfg.num_warps % 4 == 0
    prev = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert _gemm.dot_precision(F32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert _gemm.dot_precision(F32) == "fp32" and _gemm.dot_precision(BF16) == "16"
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev


# ---- static compile (sm_80 / sm_90, no GPU needed)


def _compile_rows(full: bool):
    from vitkern.testing.compile_check import run_compile_check

    report = run_compile_check(["vitkern.ops.gemm"], full=full, timeout=3000)
    print(report.format())
    return report.rows


def _check_rows(rows):
    assert rows, "no compile rows"
    problems = [(r["kernel"], r["arch"], r.get("config"), r.get("constexprs"), r["problems"]) for r in rows
                if r["problems"]]
    assert not problems, problems
    gemm_rows = [r for r in rows if r["kernel"] == "_gemm_kernel"]
    assert {r["arch"] for r in gemm_rows} == {80, 90}
    for r in gemm_rows:
        sixteen = "b_ptr:*bf16" in r["signature"] or "b_ptr:*fp16" in r["signature"]
        if r["arch"] == 90 and sixteen:
            assert r["wgmma"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0


def test_static_compile_gemm():
    """Every config of the arch family with the fc1 / fc2 / dW / dU epilogues and the ragged
    shapes compiles for sm_80 and sm_90 without spills; 16-bit configs use wgmma on sm_90."""
    _check_rows(_compile_rows(full=False))


@pytest.mark.slow
def test_static_compile_gemm_full():
    """Also the benchmark shapes (ViT-B / ViT-L forward and backward GEMMs)."""
    _check_rows(_compile_rows(full=True))
