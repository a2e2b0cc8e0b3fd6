"""The Triton LayerNorm / add+LayerNorm backend (``vitkern.ops.layer_norm``).

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``). Every result is compared with the float64 reference: the kernel's error
must stay within twice torch's own error in the same dtype, plus a small atol (the flash-attention
rule). Every kernel output, the dW / dB partial buffers included, is allocated NaN-filled, so an
element a kernel fails to write shows up as NaN.

The default run covers each width (192, 384, 768, 1000, 1024, 4096, 16384), dtype and feature at
least once at leading shape (B, 197), and every kernel config of the GPU tables unchanged (under
the interpreter blocks otherwise take more rows, for speed); the full cross product is marked
``slow``. The static sm_80 / sm_90 compile of every config is tests/test_static_compile.py's.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.ops import layer_norm as ln
from vitkern.ops.layer_norm import configs as ln_configs, launch as ln_launch
from vitkern.ops._config import KernelConfig
from vitkern.testing.numerics import assert_2x_torch, poisoned

from _compile_rows import check_layer_norm_backward_rows

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
T = 197  # ViT-B/16 tokens at 224 px: an awkward row count
WIDTHS = (192, 384, 768, 1000, 1024, 4096, 16384)


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    """Run the Triton backend, with every kernel output allocated full of NaN."""
    vitkern.use_backend("triton")  # conftest restores the previous choice
    monkeypatch.setattr(ln_launch, "_empty", poisoned)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _rand(shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=F32, device=device) * scale + shift).to(dtype)


def _params(n, dtype, device, affine):
    """affine: "wb" (weight and bias), "w", "b" or "" (neither)."""
    w = _rand(n, dtype, device, scale=0.5, shift=1.0) if "w" in affine else None
    b = _rand(n, dtype, device, scale=0.5) if "b" in affine else None
    return w, b


def _leaves(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            t = t.detach().clone() if dtype is None else t.detach().to(dtype)
            out.append(t.requires_grad_(True))
    return out


def _grads(outputs, inputs, cotangents):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, wanted, cotangents))
    return [next(got) if t is not None else None for t in inputs]


def _check_layer_norm(x, w, b, eps=1e-5, dy=None):
    """vitkern.layer_norm (Triton) forward and every gradient against fp64 and torch."""
    dtype = x.dtype
    n = x.shape[-1]
    inputs = _leaves([x, w, b])
    y = vitkern.layer_norm(*inputs, eps=eps)
    ref_in = _leaves([x, w, b], F64)
    ref = F.layer_norm(ref_in[0], (n,), ref_in[1], ref_in[2], eps)
    same_in = _leaves([x, w, b])
    same = F.layer_norm(same_in[0], (n,), same_in[1], same_in[2], eps)
    assert_2x_torch("y", y.detach(), ref.detach(), same.detach(), dtype, finite=False)
    assert y.is_contiguous()

    dy = _rand(x.shape, dtype, x.device) if dy is None else dy
    got = _grads(y, inputs, dy)
    want = _grads(ref, ref_in, dy.double())
    same_g = _grads(same, same_in, dy)
    for name, g, r, s in zip(("dx", "dw", "db"), got, want, same_g):
        if r is not None:
            assert_2x_torch(name, g, r, s, dtype, finite=False)


def _check_add_layer_norm(x, r, w, b, eps=1e-5):
    dtype = torch.promote_types(x.dtype, r.dtype)
    inputs = _leaves([x, r, w, b])
    y, s = vitkern.add_layer_norm(*inputs, eps=eps)
    ref_in = _leaves([x, r, w, b], F64)
    ref_y, ref_s = ln.add_layer_norm_ref(*ref_in, eps=eps)
    same_in = _leaves([x, r, w, b])
    same_y, same_s = ln.add_layer_norm_ref(*same_in, eps=eps)
    assert y.dtype == s.dtype == dtype
    assert_2x_torch("y", y.detach(), ref_y.detach(), same_y.detach(), dtype, finite=False)
    # s is one rounding of the sum: bit for bit torch's
    torch.testing.assert_close(s.detach(), same_s.detach(), rtol=0, atol=0)

    dy = _rand(x.shape, dtype, x.device)
    ds = _rand(x.shape, dtype, x.device)
    got = _grads((y, s), inputs, (dy, ds))
    want = _grads((ref_y, ref_s), ref_in, (dy.double(), ds.double()))
    same_g = _grads((same_y, same_s), same_in, (dy, ds))
    for name, g, rf, sm, t in zip(("dx", "dresidual", "dw", "db"), got, want, same_g, (x, r, w, b)):
        if rf is not None:
            assert g.dtype == t.dtype, (name, g.dtype, t.dtype)
            assert_2x_torch(name, g, rf, sm, sm.dtype, finite=False)


# --------------------------------------------------------------------------------------------
# forward and gradients: every width, dtype and affine variant at least once
# --------------------------------------------------------------------------------------------

LN_CASES = [
    # (dtype, width, batch, affine)
    (F32, 192, 2, "wb"),
    (BF16, 192, 1, ""),
    (F16, 384, 1, "w"),
    (BF16, 768, 2, "wb"),
    (F32, 768, 1, "b"),
    (BF16, 1000, 1, "wb"),
    (F16, 1024, 1, "wb"),
    (F32, 1024, 1, ""),
    (BF16, 4096, 1, "wb"),
    (F32, 16384, 1, "wb"),
    (BF16, 16384, 1, "b"),
    (F16, 16384, 1, ""),
    # two-piece rows (no padding lanes), and odd widths with a masked second piece
    (F32, 1152, 1, "wb"),
    (BF16, 1280, 1, "w"),
    (F16, 1100, 1, "wb"),  # 1024 + 128, 76 columns used
    (BF16, 330, 1, "b"),   # 256 + 128, 74 used
]


@pytest.mark.parametrize("dtype,n,batch,affine", LN_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_layer_norm(device, dtype, n, batch, affine):
    x = _rand((batch, T, n), dtype, device, scale=2.0, shift=1.0)
    w, b = _params(n, dtype, device, affine)
    _check_layer_norm(x, w, b, eps=1e-6)


ADD_CASES = [
    # (x dtype, residual dtype, width, affine)
    (BF16, BF16, 768, "wb"),
    (BF16, F32, 384, "wb"),  # timm's fp32 residual stream with bf16 branches
    (F16, F32, 1000, "w"),
    (F32, F32, 192, ""),
    (F16, F16, 4096, "b"),
    (BF16, BF16, 16384, "b"),
]


@pytest.mark.parametrize("x_dtype,r_dtype,n,affine", ADD_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_add_layer_norm(device, x_dtype, r_dtype, n, affine):
    x = _rand((1, T, n), x_dtype, device, scale=2.0)
    r = _rand((1, T, n), r_dtype, device, scale=3.0, shift=1.0)
    w, b = _params(n, x_dtype, device, affine)
    _check_add_layer_norm(x, r, w, b)


@pytest.mark.parametrize("n", [768, 16384])  # the register and the looped backward kernels
def test_sum_gradient_in_the_branch_dtype(device, n):
    """An fp32 sum of a 16-bit branch and an fp32 residual stream: the backward writes the sum's
    gradient in fp32 (the residual's) and in the branch's 16-bit dtype in one pass, the latter
    exactly the fp32 gradient rounded once, and add_layer_norm hands that copy to the branch."""
    x = _rand((2, 37, n), BF16, device, scale=2.0)
    r = _rand((2, 37, n), F32, device, scale=3.0)
    w, b = _params(n, BF16, device, "wb")
    _, s, mean, rstd = ln_launch._layer_norm_fwd(x, r, w, b, 1e-6)
    dy, ds = _rand(s.shape, F32, device), _rand(s.shape, F32, device)
    dx, dw, db, dx_low = ln_launch._layer_norm_bwd(dy, s, w, mean, rstd, ds, True, BF16, BF16)
    assert dx.dtype == F32 and dx_low.dtype == BF16
    torch.testing.assert_close(dx_low, dx.to(BF16), rtol=0, atol=0)
    _check_add_layer_norm(x, r, w, b)
    with pytest.raises(TypeError, match="dx_low_dtype"):
        ln_launch._layer_norm_bwd(dy, s, w, mean, rstd, ds, True, BF16, torch.int8)


def test_statistics_saved_in_fp32(device):
    x = _rand((3, T, 384), BF16, device, scale=4.0, shift=-2.0)
    y, mean, rstd = torch.ops.vitkern.layer_norm_fwd(x, None, None, 1e-5)
    assert mean.dtype == rstd.dtype == F32 and mean.shape == rstd.shape == (3, T)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=1e-6, atol=1e-6)
    var = xd.var(-1, unbiased=False)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# layouts: strided rows, non-collapsible leading dims, column strides, expanded gradients
# --------------------------------------------------------------------------------------------


def test_strided_rows(device):
    # rows of a wider buffer (row stride 1040 != width 1000, and misaligned for 16-byte vectors)
    base = _rand((2, T, 1040), BF16, device, scale=2.0)
    x = base[..., 7:1007]
    assert x.stride(-2) == 1040
    _check_layer_norm(x, *_params(1000, BF16, device, "wb"))
    # leading dims that do not collapse to one stride (the launcher copies), fp32
    x = _rand((T, 3, 192), F32, device).transpose(0, 1)
    _check_layer_norm(x, *_params(192, F32, device, "wb"))
    # a non-unit column stride
    x = _rand((2, 384, 50), F16, device).transpose(-1, -2)
    assert x.stride(-1) == 50
    _check_layer_norm(x, *_params(384, F16, device, "w"))
    # a single row, 1-D
    _check_layer_norm(_rand((768,), BF16, device), *_params(768, BF16, device, "wb"))


def test_strided_add_inputs(device):
    x = _rand((2, T, 800), F16, device)[..., :768]
    r = _rand((T, 2, 768), F32, device).transpose(0, 1)
    _check_add_layer_norm(x, r, *_params(768, F16, device, "wb"))


def test_expanded_gradients(device):
    # y.sum().backward() hands backward an expanded gradient (stride 0 everywhere)
    for dtype, n in ((BF16, 768), (F32, 16384)):
        x = _rand((1, T, n), dtype, device, scale=2.0)
        dy = torch.ones((), dtype=dtype, device=device).expand(x.shape)
        _check_layer_norm(x, *_params(n, dtype, device, "wb"), dy=dy)
    # the add variant, both cotangents expanded
    x = _rand((1, T, 384), BF16, device)
    r = _rand((1, T, 384), BF16, device)
    w, b = _params(384, BF16, device, "wb")
    inputs = _leaves([x, r, w, b])
    y, s = vitkern.add_layer_norm(*inputs)
    got = torch.autograd.grad(y.sum() + s.sum(), inputs)
    ref_in = _leaves([x, r, w, b], F64)
    ry, rs = ln.add_layer_norm_ref(*ref_in)
    want = torch.autograd.grad(ry.sum() + rs.sum(), ref_in)
    same_in = _leaves([x, r, w, b])
    sy, ss = ln.add_layer_norm_ref(*same_in)
    same = torch.autograd.grad(sy.sum() + ss.sum(), same_in)
    for name, g, rf, sm in zip(("dx", "dresidual", "dw", "db"), got, want, same):
        assert_2x_torch(name, g, rf, sm, BF16, finite=False)


def test_expanded_gradient_in_launcher(device):
    # the backward launcher reads dy with stride 0 (no copy)
    x = _rand((5, 256), F32, device)
    _, _, mean, rstd = ln_launch._layer_norm_fwd(x, None, None, None, 1e-5)
    dy = torch.full((), 0.5, device=device).expand(5, 256)
    dx, dw, db, dx_low = ln_launch._layer_norm_bwd(dy, x, None, mean, rstd, None, False, F32)
    assert dw is None and dx_low is None
    torch.testing.assert_close(dx, torch.zeros_like(dx), atol=1e-5, rtol=0)  # d(sum y)/dx = 0
    torch.testing.assert_close(db, torch.full((256,), 2.5, device=device))


# --------------------------------------------------------------------------------------------
# the GPU configs unchanged, the looped (wide-row) kernels, the persistent backward grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
def test_looped_kernels_many_chunks(device, monkeypatch, residual):
    # The looped kernels with small chunks: 1000 = 7 * 128 + 104 (a masked tail chunk); 4 rows per
    # block over 30 rows (a partial last block); 4 backward programs, two row blocks each.
    monkeypatch.setattr(ln_configs, "_WIDE_INTERPRETER_BLOCKS", False)
    monkeypatch.setattr(ln_configs, "_MAX_FUSED_N", 256)
    config = KernelConfig({"BLOCK_M": 4, "BLOCK_N": 128}, num_warps=4, num_stages=1)
    monkeypatch.setattr(ln_configs, "_FWD_LOOPED_CONFIG", config)
    monkeypatch.setattr(ln_configs, "_BWD_LOOPED_CONFIG", (config, 1))
    x = _rand((2, 15, 1000), BF16, device, scale=3.0, shift=100.0)  # large mean: merge accuracy
    w, b = _params(1000, BF16, device, "wb")
    if residual:
        _check_add_layer_norm(x, _rand(x.shape, F32, device), w, b)
    else:
        _check_layer_norm(x, w, b)


GPU_CONFIG_WIDTHS = [(100, False), (192, True), (384, False), (768, True), (1536, False), (3000, True),
                     (6000, False), (9000, True), (1152, False), (1280, True), (600, False), (330, True)]


@pytest.mark.parametrize("n,residual", GPU_CONFIG_WIDTHS)
def test_gpu_configs_unchanged(device, monkeypatch, n, residual):
    # Under the interpreter blocks normally take more rows (speed); here every config runs exactly
    # as on the GPU (each BLOCK_N of the tables, and the looped kernels), with T = 50 rows, so the
    # persistent backward loops several times per program.
    monkeypatch.setattr(ln_configs, "_WIDE_INTERPRETER_BLOCKS", False)
    rows = 50 if n <= ln_configs._MAX_FUSED_N else 20  # one row per step of the looped kernels: fewer
    x = _rand((1, rows, n), BF16, device, scale=2.0)
    w, b = _params(n, BF16, device, "wb")
    if residual:
        _check_add_layer_norm(x, _rand(x.shape, BF16, device), w, b)
    else:
        _check_layer_norm(x, w, b)


def test_dwdb_config_sized_to_sms():
    """The dW / dB reduction: 16 columns per program where that gives a program per SM, else 8
    (twice the rows per step, the same 1024-element tile)."""
    c768 = ln_configs._dwdb_config(768, 132)
    assert c768.meta["BLOCK_N"] == 8 and c768.meta["BLOCK_G"] * c768.meta["BLOCK_N"] == 1024
    assert ln_configs._dwdb_config(768, 48).meta["BLOCK_N"] == 16
    assert ln_configs._dwdb_config(4096, 132).meta["BLOCK_N"] == 16
    assert ln_configs._dwdb_config(1280, 132).meta["BLOCK_N"] == 8  # 160 programs, not 80


@pytest.mark.parametrize("n,residual", [(768, False), (1280, True), (40, False)])
def test_backward_grid_on_many_sms(device, monkeypatch, n, residual):
    """The GPU configs unchanged on a 132-SM grid (programs_per_sm x 132 programs, capped by the
    rows; the 8-column dW / dB reduction), and the SM carve-out shrinking it."""
    from vitkern.ops import _config

    monkeypatch.setattr(ln_configs, "_WIDE_INTERPRETER_BLOCKS", False)
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 132)
    monkeypatch.setattr(_config, "_CARVEOUT", {"value": 4})
    grids = []
    real = ln_launch.launch

    def spy(kernel, grid, *args, **kwargs):
        grids.append((kernel, tuple(grid), kwargs.get("config")))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ln_launch, "launch", spy)
    x = _rand((1, 50, n), BF16, device, scale=2.0)
    w, b = _params(n, BF16, device, "wb")
    if residual:
        _check_add_layer_norm(x, _rand(x.shape, BF16, device), w, b)
    else:
        _check_layer_norm(x, w, b)
    (dwdb_grid, dwdb_cfg), = [(g, c) for k, g, c in grids if k is ln_launch._layer_norm_bwd_dwdb_kernel]
    assert dwdb_cfg.meta["BLOCK_N"] == (8 if -(-n // 16) < 128 else 16)
    assert dwdb_grid == (-(-n // dwdb_cfg.meta["BLOCK_N"]), 1)  # 50 partial rows: too few to split


def test_forward_pieces():
    """The register-path forward holds a row as one or two power-of-two pieces, two where that
    pads less: the ViT widths without padding lanes."""
    pieces = ln_configs._row_pieces
    assert pieces(768) == (512, 256) and pieces(1280) == (1024, 256) and pieces(1152) == (1024, 128)
    assert pieces(384) == (256, 128) and pieces(192) == (128, 64) and pieces(6144) == (4096, 2048)
    assert pieces(1024) == (1024, 0) and pieces(1000) == (1024, 0) and pieces(197) == (256, 0)
    assert pieces(100) == (128, 0) and pieces(1100) == (1024, 128) and pieces(8000) == (8192, 0)
    assert pieces(1536) == (2048, 0)  # excluded pair (a spill under Triton 3.6)
    for n in range(1, ln_configs._MAX_FUSED_N + 1, 7):
        head, tail = pieces(n)
        assert n <= head + tail <= ln_configs._block_n(n) and (tail == 0 or head <= n)


def test_configs_of_a_16bit_output_on_fp32_rows():
    """fp32 rows written in 16 bits keep the entry's warps (fp32 outputs double them); a 16-bit
    dy on fp32 rows prefetches two row blocks (the compile cases check both for spills and
    programs per SM)."""
    for n in (768, 1152, 1280):
        _, fp32_out = ln_configs._fwd_config(n, F32)
        _, bf16_out = ln_configs._fwd_config(n, F32, BF16)
        entry = ln_configs._FWD_CONFIGS[ln_configs._row_pieces(n)[0]]
        assert fp32_out.num_warps == 2 * entry.num_warps and bf16_out.num_warps == entry.num_warps
        _, plain, per_sm = ln_configs._bwd_config(n, None)
        _, narrow, narrow_per_sm = ln_configs._bwd_config(n, None, narrow_dy=True)
        assert plain.meta["NUM_STAGES"] == 3 and narrow.meta["NUM_STAGES"] == 2 and narrow_per_sm == per_sm
    assert ln_configs._bwd_config(3072, None, narrow_dy=True)[1].meta["NUM_STAGES"] == 1  # the 4096 entry's 1


def test_dwdb_reduction_fills_the_sms(device, monkeypatch):
    """The dW / dB reduction spreads over >= SM count programs (column strips x row splits) and
    sums the splits' partials in a second launch: ViT-B (768, 660 partial rows) on 132 SMs runs
    96 x 2 programs; the result is the rows' sum, the same bits on every call."""
    cfg = ln_configs._dwdb_config(768, 132)
    assert ln_configs._dwdb_splits(660, 768, cfg, 132) == 2
    assert ln_configs._dwdb_splits(3 * 132, 1280, ln_configs._dwdb_config(1280, 132), 132) == 1
    assert ln_configs._dwdb_splits(50, 768, cfg, 132) == 1
    monkeypatch.setattr(ln_configs, "_WIDE_INTERPRETER_BLOCKS", False)
    grids = []
    real = ln_launch.launch

    def spy(kernel, grid, *args, **kwargs):
        grids.append(tuple(grid))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ln_launch, "launch", spy)
    rows, n = 300, 200
    dwp, dbp = torch.randn(rows, n, device=device), torch.randn(rows, n, device=device)
    outs = []
    for _ in range(2):
        dw, db = poisoned((n,), BF16, device), poisoned((n,), F32, device)
        ln_launch._reduce_dwdb(dwp, dbp, dw, db, rows, n, 132)
        outs.append((dw, db))
    strips = -(-n // 8)
    assert grids[:2] == [(strips, 2), (-(-n // 16), 1)]
    torch.testing.assert_close(outs[0][1], dbp.sum(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], dwp.sum(0).to(BF16), atol=0, rtol=1e-2)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.slow
def test_backward_programs_fit_on_the_sms_full():
    """Each backward entry's programs per SM fit the blocks per SM the static check reports, for
    every dtype and flag of the full compile set (the default set: tests/test_static_compile.py)."""
    from vitkern.testing.compile_check import run_compile_check

    check_layer_norm_backward_rows(run_compile_check(["vitkern.ops.layer_norm"], full=True, timeout=1800).rows)


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 64])
def test_persistent_grid_row_counts(device, rows):
    # fewer rows than programs, rows not a multiple of BLOCK_M x programs
    x = _rand((rows, 192), F16, device)
    _check_layer_norm(x, *_params(192, F16, device, "wb"))


def test_empty_leading_dims(device):
    x = torch.randn(0, 5, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    y = vitkern.layer_norm(x, w, b)
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_no_parameter_grads_requested(device):
    # weight / bias that do not require grad: no dW / dB partials are computed
    x = _rand((2, T, 768), BF16, device).requires_grad_(True)
    w, b = _params(768, BF16, device, "wb")
    y = vitkern.layer_norm(x, w, b)
    (gx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    xr = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(F.layer_norm(xr, (768,), w.double(), b.double()), (xr,), torch.ones_like(xr))
    xs = x.detach().clone().requires_grad_(True)
    (same,) = torch.autograd.grad(F.layer_norm(xs, (768,), w, b), (xs,), torch.ones_like(y))
    assert_2x_torch("dx", gx, want, same, BF16, finite=False)


# --------------------------------------------------------------------------------------------
# autocast, errors, registration, torch.compile
# --------------------------------------------------------------------------------------------


def test_autocast_fp32_out(device):
    x = _rand((1, T, 384), F32, device)
    w, b = _params(384, F32, device, "wb")
    with torch.autocast(device.type, dtype=BF16):
        y = vitkern.layer_norm(x.to(BF16), w, b)
        y2, s2 = vitkern.add_layer_norm(x.to(BF16), x, w, b)
    assert y.dtype == y2.dtype == s2.dtype == F32
    torch.testing.assert_close(y, F.layer_norm(x.to(BF16).float(), (384,), w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, F.layer_norm(x.to(BF16).float() + x, (384,), w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference", "torch"])
@pytest.mark.parametrize("out_dtype", [BF16, F16])
def test_out_dtype_is_one_rounding_of_the_fp32_result(device, backend, out_dtype):
    """``out_dtype``: ``y`` rounded once from the fp32 result, the same bits as the cast of the
    fp32 output (what a GEMM's autocast would make of it); the backward reads the 16-bit output
    gradient and gives the gradients of the composed cast exactly (the cast's backward only widens),
    dX in x's dtype. Also for add_layer_norm (``s`` keeps its dtype)."""
    x = _rand((2, T, 768), F32, device)
    r = _rand((2, T, 768), F32, device)
    w, b = _params(768, F32, device, "wb")
    dy = _rand(x.shape, out_dtype, device)
    with vitkern.use_backend(backend):
        xs, ws, bs = _leaves([x, w, b])
        y = vitkern.layer_norm(xs, ws, bs, 1e-6, out_dtype=out_dtype)
        y.backward(dy)
        xc, wc, bc = _leaves([x, w, b])
        yc = vitkern.layer_norm(xc, wc, bc, 1e-6).to(out_dtype)
        yc.backward(dy)
        assert y.dtype == out_dtype and xs.grad.dtype == F32
        assert torch.equal(y, yc)
        for got, want in ((xs.grad, xc.grad), (ws.grad, wc.grad), (bs.grad, bc.grad)):
            assert torch.equal(got, want)
        xa, ra = _leaves([x.to(BF16), r])
        y2, s2 = vitkern.add_layer_norm(xa, ra, w, b, 1e-6, out_dtype=out_dtype)
        assert y2.dtype == out_dtype and s2.dtype == F32
        y2c, s2c = vitkern.add_layer_norm(x.to(BF16), r, w, b, 1e-6)
        assert torch.equal(y2, y2c.to(out_dtype)) and torch.equal(s2, s2c)
        (y2.float().sum() + s2.sum()).backward()
        assert xa.grad.dtype == BF16 and ra.grad.dtype == F32
    with pytest.raises(TypeError, match="out_dtype"):
        vitkern.layer_norm(x, w, b, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        vitkern.add_layer_norm(x, r, out_dtype="bfloat16")


def test_pre_norm_under_autocast_writes_the_compute_dtype(device):
    """``apply_pre_norm``: under autocast a LayerNorm feeding a GEMM writes the autocast dtype; a
    block's outputs and every gradient are bit for bit those of the float32 norm output cast by
    the GEMM (the path before ``out_dtype``)."""
    from vitkern.nn import Block
    from vitkern.nn import block as block_module
    from vitkern.nn.layer_norm import apply_norm, apply_pre_norm

    norm = vitkern.nn.LayerNorm(192, eps=1e-6)
    x = _rand((2, 9, 192), F32, device)
    with torch.autocast(device.type, dtype=BF16):
        assert apply_pre_norm(norm, x).dtype == BF16 and apply_norm(norm, x).dtype == F32
    assert apply_pre_norm(norm, x).dtype == F32  # autocast off: the norm's own dtype
    blk = Block(192, 3, qkv_bias=True, init_values=1e-2).to(device)
    outs, grads = [], []
    for pre_norm in (apply_pre_norm, lambda norm, t: apply_norm(norm, t)):
        blk.zero_grad(set_to_none=True)
        xs = x.detach().clone().requires_grad_(True)
        original = block_module.apply_pre_norm
        block_module.apply_pre_norm = pre_norm
        try:
            with torch.autocast(device.type, dtype=BF16):
                y = blk(xs)
        finally:
            block_module.apply_pre_norm = original
        y.float().square().sum().backward()
        outs.append(y)
        grads.append([xs.grad] + [p.grad for p in blk.parameters()])
    assert torch.equal(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_bad_inputs_rejected(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(TypeError, match="dtype"):
        vitkern.layer_norm(x.double())
    with pytest.raises(TypeError, match="dtype"):
        vitkern.layer_norm(torch.ones(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="weight"):
        vitkern.layer_norm(x, torch.ones(7, device=device))
    with pytest.raises(vitkern.BackendUnavailableError, match="width"):
        vitkern.layer_norm(torch.randn(4, 0, device=device))
    with pytest.raises(vitkern.BackendUnavailableError, match="width"):
        vitkern.add_layer_norm(torch.randn(1, 0, device=device), torch.randn(1, 0, device=device))
    wide = torch.empty(1, ln.MAX_WIDTH + 1, device=device)
    with pytest.raises(vitkern.BackendUnavailableError, match=str(ln.MAX_WIDTH)):
        vitkern.layer_norm(wide)
    # the launchers check for themselves too
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ln_launch._layer_norm_fwd(x.double(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="width"):
        ln_launch._layer_norm_fwd(torch.randn(3, 0, device=device), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="bias"):
        ln_launch._layer_norm_fwd(x, None, None, torch.ones(9, device=device), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        ln_launch._layer_norm_fwd(x, torch.randn(4, 9, device=device), None, None, 1e-5)


def test_backends_registered():
    from vitkern import _backend

    assert "triton" in _backend.registered_backends("layer_norm")
    assert "triton" in _backend.registered_backends("add_layer_norm")


def test_opcheck(device):
    x = _rand((2, 7, 192), BF16, device)
    r = _rand((2, 7, 192), F32, device)
    w, b = _params(192, BF16, device, "wb")
    wg, bg = _leaves([w, b])
    xg = x.detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_fwd.default, (xg, wg, bg, 1e-5))
    torch.library.opcheck(torch.ops.vitkern.layer_norm_fwd.default, (xg, None, None, 1e-6))
    torch.library.opcheck(torch.ops.vitkern.add_layer_norm_fwd.default, (xg, r.requires_grad_(True), wg, None, 1e-5))
    xf = _rand((2, 7, 192), F32, device).requires_grad_(True)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_fwd.default, (xf, None, None, 1e-6, BF16))
    torch.library.opcheck(torch.ops.vitkern.add_layer_norm_fwd.default, (xg, r, wg, bg, 1e-5, F16))
    _, mean, rstd = torch.ops.vitkern.layer_norm_fwd(x, w, b, 1e-5)
    dy = _rand(x.shape, BF16, device)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_bwd.default, (dy, x, w, mean, rstd, None, True, BF16, None))
    torch.library.opcheck(torch.ops.vitkern.layer_norm_bwd.default, (dy, x, None, mean, rstd, dy, False, None, F16))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, r, w, b):
        y, s = vitkern.add_layer_norm(x, r, w, b, eps=1e-6)
        return vitkern.layer_norm(y * 2.0, w, b), s

    compiled = torch.compile(block, fullgraph=True)  # fullgraph: a graph break raises
    x, r = _rand((2, 9, 192), F32, device), _rand((2, 9, 192), F32, device)
    w, b = _params(192, F32, device, "wb")
    args = _leaves([x, r, w, b])
    out = compiled(*args)
    ref_args = _leaves([x, r, w, b])
    with vitkern.use_backend("reference"):
        ref = block(*ref_args)
    for o, rf in zip(out, ref):
        torch.testing.assert_close(o, rf, atol=1e-5, rtol=1e-5)
    cot = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(out, args, cot)
    want = torch.autograd.grad(ref, ref_args, cot)
    for g, wt in zip(got, want):
        torch.testing.assert_close(g, wt, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the full cross product (run with --run-slow, and on a GPU)
# --------------------------------------------------------------------------------------------

SLOW_LN = list(itertools.product((F32, F16, BF16), WIDTHS, ("wb", "w", "b", "")))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,n,affine", SLOW_LN, ids=lambda v: str(v).replace("torch.", ""))
def test_layer_norm_full(device, dtype, n, affine):
    x = _rand((2, T, n), dtype, device, scale=2.0, shift=1.0)
    _check_layer_norm(x, *_params(n, dtype, device, affine))


SLOW_ADD = [(xd, rd, n, a) for xd, rd in ((F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32))
            for n in WIDTHS for a in ("wb", "")]


@pytest.mark.slow
@pytest.mark.parametrize("x_dtype,r_dtype,n,affine", SLOW_ADD, ids=lambda v: str(v).replace("torch.", ""))
def test_add_layer_norm_full(device, x_dtype, r_dtype, n, affine):
    x = _rand((2, T, n), x_dtype, device, scale=2.0)
    r = _rand((2, T, n), r_dtype, device, scale=3.0, shift=1.0)
    _check_add_layer_norm(x, r, *_params(n, x_dtype, device, affine))
