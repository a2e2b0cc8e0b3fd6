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

from _compile_rows import check_gemm_rows

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("name", sorted(_gemm.GEMM_CONFIGS))
def test_every_config_fused_epilogue(device, name):
    """Each config, ragged M / N / K, bias + GELU + pre-activation store; and the residual
    epilogue with LayerScale, row scale and a float32 residual."""
    dtype = F32 if ("tf32" in name or "fp32" in name) else BF16
    _check_fused_epilogues(_gemm.GEMM_CONFIGS[name], dtype, device, 150, 136, 200)


def _check_fused_epilogues(cfg, dtype, device, M, N, K):
    """``cfg`` with bias + GELU + pre store and with the float32 residual under LayerScale and a
    row scale, against float64; returns ``(a, b, bias, p, gamma, rs)`` (``p`` the biased
    product) for further epilogues."""
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
    return a, b, bias, p, gamma, rs


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


@pytest.mark.parametrize("act", [Activation.GELU, Activation.GELU_TANH, Activation.QUICK_GELU])
def test_activation_grad_epilogue_and_act_bwd(device, act):
    M, N, H = 100, 48, 136
    g = torch.randn(M, N, device=device).to(BF16)
    w2 = (torch.randn(N, H, device=device) * N ** -0.5).to(BF16)
    pre = torch.randn(M, H, device=device).to(BF16)
    rs = torch.rand(M, device=device)
    out = poisoned((M, H), BF16, device)
    _launch.gemm(g, w2.t(), out, Epilogue(row_scale=rs, act_grad=act, aux=pre))
    p = pre.double().requires_grad_()
    y = act.apply(p)
    (dp,) = torch.autograd.grad(y, p, torch.ones_like(y))
    assert_2x_rounding("out", out, (g.double() @ w2.double()) * rs.double()[:, None] * dp, op="gemm")
    gg = torch.randn(M, H, device=device)
    col = torch.rand(H, device=device).to(BF16)
    d, dscale, drow = _launch.act_bwd(gg, pre, act, F32, col_scale=col, row_scale=rs, want_dscale=True,
                                      want_drow=True)
    assert_2x_rounding("d", d, gg.double() * rs.double()[:, None] * col.double() * dp, op="gemm")
    torch.testing.assert_close(dscale.double(), (gg.double() * rs.double()[:, None] * y.detach()).sum(0),
                               atol=1e-3, rtol=1e-4)
    # drop path's row-scale grad from the same pass: per-block partials over 3 column blocks
    torch.testing.assert_close(drow.double(), (gg.double() * col.double() * y.detach()).sum(1),
                               atol=1e-3, rtol=1e-4)
    _, again, drow2 = _launch.act_bwd(gg, pre, act, F32, col_scale=col, row_scale=rs, want_dscale=True,
                                      want_drow=True)
    assert torch.equal(drow, drow2) and torch.equal(dscale, again)  # deterministic


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


# The default set's GEMM rows are checked in tests/test_static_compile.py, from its one run over
# all of vitkern.ops (the same jobs: one run compiles each once).


@pytest.mark.slow
def test_static_compile_gemm_full():
    """Every config of the arch family with the fc1 / fc2 / dW / dU epilogues, the ragged shapes
    and the benchmark shapes (ViT-B / ViT-L forward and backward GEMMs) compile for sm_80 and
    sm_90 without spills; 16-bit configs use wgmma on sm_90."""
    from vitkern.testing.compile_check import run_compile_check

    report = run_compile_check(["vitkern.ops.gemm"], full=True, timeout=3000)
    print(report.format())
    check_gemm_rows(report.rows)


# ---- the launch plan: split-K choice, persistent grids, the SM carve-out

# ViT-B/16 at batch 256: the weight-gradient GEMMs dW = dY^T @ X reduce over the 50432 token rows
_VIT_B_TOKENS = 256 * 197


@pytest.mark.parametrize("out_shape, tiles, before, min_use", [
    ((3072, 768), 144, 0.55, 0.95),   # fc1 dW
    ((768, 3072), 144, 0.55, 0.95),   # fc2 dW
    ((2304, 768), 108, 0.82, 0.98),   # qkv dW
    ((768, 768), 36, 0.82, 0.95),     # proj dW (the former rule split it 3 ways: 108 units)
])
def test_split_choice_vit_b_dw(out_shape, tiles, before, min_use):
    """The split that minimises waves / split on 132 SMs, against the review's numbers."""
    n, k = out_shape
    cfg = _gemm.GEMM_CONFIGS["h100_16_large"]
    plan = _gemm.plan_gemm(n, k, _VIT_B_TOKENS, cfg, 132, split_safe=True, row_sum=True)
    assert plan.tiles == tiles
    assert plan.split_k > 1 and plan.k_tiles_per_split >= _gemm.configs.SPLIT_MIN_K_ITERS
    assert plan.sm_use >= min_use, plan.describe()
    assert not plan.persistent and plan.programs == tiles  # one program per (tile, split)
    # the SM use the former rule gave (split only below one wave): what this improves on
    old_split = min(8, 132 // tiles, 788 // 8) if tiles < 132 else 1
    assert _gemm.sm_use(tiles, old_split, 132) == pytest.approx(before, abs=0.005)
    assert plan.sm_use > _gemm.sm_use(tiles, old_split, 132) + 0.1


def test_split_choice_rules():
    tile = (128, 128, 64)
    # s = 8 gives 97% for 144 tiles; the choice is at least as good as 95% and within the cap
    assert _gemm.sm_use(144, 8, 132) == pytest.approx(0.97, abs=0.005)
    assert _gemm.sm_use(144, 1, 132) == pytest.approx(0.545, abs=0.001)
    # K too short for two splits of >= 8 BLOCK_K steps: no split
    assert _gemm.choose_split_k(768, 768, 15 * 64, 132, tile) == 1
    # many tiles already fill the chip: no split (dX of ViT-B fc2: 2364 tiles, 99.5%)
    assert _gemm.choose_split_k(50432, 768, 3072, 132, tile) == 1
    # the cap and the K floor bound the split
    assert _gemm.choose_split_k(128, 128, 1 << 20, 132, tile, max_split=4) == 4
    assert _gemm.choose_split_k(128, 128, 3 * 8 * 64, 132, tile) <= 3
    # a split-unsafe epilogue or an explicit split: the plan takes it as given
    cfg = _gemm.GEMM_CONFIGS["h100_16_large"]
    assert _gemm.plan_gemm(3072, 768, _VIT_B_TOKENS, cfg, 132).split_k == 1
    assert _gemm.plan_gemm(3072, 768, _VIT_B_TOKENS, cfg, 132, split_safe=True, split_k=3).split_k == 3
    # persistent configs without a split: min(tiles, SMs) programs, flattened loop
    fwd = _gemm.plan_gemm(_VIT_B_TOKENS, 3072, 768, cfg, 132)
    assert fwd.persistent and fwd.programs == 132 and fwd.waves == 72
    assert not _gemm.plan_gemm(_VIT_B_TOKENS, 3072, 768, cfg, 132, row_sum=True).persistent


def test_split_choice_fewer_sms():
    """The carve-out's SM count changes the choice: 144 tiles on 124 free SMs."""
    tile = (128, 128, 64)
    s132 = _gemm.choose_split_k(3072, 768, _VIT_B_TOKENS, 132, tile)
    s124 = _gemm.choose_split_k(3072, 768, _VIT_B_TOKENS, 124, tile)
    assert _gemm.sm_use(144, s124, 124) >= 0.9 and _gemm.sm_use(144, s132, 132) >= 0.9
    assert _gemm.sm_use(144, s132, 124) < _gemm.sm_use(144, s124, 124)


def _recording_launch(monkeypatch):
    grids = []
    real = _launch.launch

    def spy(kernel, grid, *args, **kwargs):
        grids.append(tuple(grid))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_launch, "launch", spy)
    return grids


@pytest.mark.parametrize("carveout", [0, 2])
def test_auto_split_k_with_bias_grad(device, monkeypatch, carveout):
    """The launcher's own split choice (split_k=None) on a few SMs: the dW GEMM with the bias
    gradient (row sums of A'), a reduction-axis scale and odd M / N / K splits K (not when the
    carve-out leaves as many SMs as tiles), and matches the reference; the partials' reduction
    is deterministic (bitwise equal on a rerun)."""
    from vitkern.ops import _config

    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 4)
    monkeypatch.setattr(_config, "_CARVEOUT", {"value": carveout})
    M, N, K = 72, 40, 1100  # out (72, 40): two 64-row tiles; 18 BLOCK_K steps of tokens
    g = torch.randn(K, M, device=device).to(BF16)
    x = torch.randn(K, N, device=device).to(BF16)
    red = torch.rand(K, device=device)
    cfg = _gemm.GEMM_CONFIGS["h100_16_small" if device_arch() >= 90 else "a100_16_small"]
    plan = _gemm.plan_gemm(M, N, K, cfg, 4 - carveout, split_safe=True, row_sum=True)
    # 2 tiles: on 4 SMs 2 splits fill the chip; with 2 SMs carved out the tiles already do
    assert plan.split_k == (2 if carveout == 0 else 1)
    grids = _recording_launch(monkeypatch)
    out = poisoned((M, N), BF16, device)
    _, s, _ = _launch.gemm(g.t(), x.t(), out, red_scale=red, row_sum=True, config=cfg)
    assert grids == [(plan.programs, plan.split_k)]
    a = (g.float() * red[:, None]).to(BF16).double()
    assert_2x_rounding("out", out, a.T @ x.double(), op="gemm")
    torch.testing.assert_close(s.double(), a.sum(0), atol=1e-3, rtol=1e-4)
    out2 = poisoned((M, N), BF16, device)
    _, s2, _ = _launch.gemm(g.t(), x.t(), out2, red_scale=red, row_sum=True, config=cfg)
    assert torch.equal(out, out2) and torch.equal(s, s2)


def test_linear_dw_split_with_bias_grad(device, monkeypatch):
    """linear's backward through the automatic split: dW and db against the fp64 reference."""
    from vitkern.ops import _config
    from vitkern.ops.linear.launch import linear_backward

    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 4)
    M, N, K = 1100, 40, 72  # tokens, out features, in features
    x = torch.randn(M, K, device=device).to(BF16)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(BF16)
    bias = torch.randn(N, device=device).to(BF16)
    grad = torch.randn(M, N, device=device).to(BF16)
    grids = _recording_launch(monkeypatch)
    dx, dw, db, _, _ = linear_backward(grad, x, w, bias, None, None, None, Activation.NONE, need_dscale=False)
    assert any(g[1] > 1 for g in grids), grids  # the dW GEMM split K
    assert_2x_rounding("dw", dw, grad.double().T @ x.double(), op="gemm")
    assert_2x_rounding("dx", dx, grad.double() @ w.double(), op="gemm")
    torch.testing.assert_close(db.double(), grad.double().sum(0), atol=2e-2, rtol=1e-2)


def test_sm_carveout_setting(monkeypatch):
    from vitkern.ops import _config

    monkeypatch.setattr(_config, "_CARVEOUT", {"value": None})
    monkeypatch.delenv("VITKERN_SM_CARVEOUT", raising=False)
    assert _config.sm_carveout() == 0
    monkeypatch.setenv("VITKERN_SM_CARVEOUT", "8")
    assert _config.sm_carveout() == 8
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv("VITKERN_SM_CARVEOUT", bad)
        with pytest.raises(ValueError, match="VITKERN_SM_CARVEOUT"):
            _config.sm_carveout()
    monkeypatch.setenv("VITKERN_SM_CARVEOUT", "4")  # the interpreter's SM count: none left
    with pytest.raises(ValueError, match="VITKERN_SM_CARVEOUT.*below the SM count"):
        _config.available_sms()
    monkeypatch.setenv("VITKERN_SM_CARVEOUT", "3")
    assert _config.available_sms() == _config.INTERPRET_NUM_SMS - 3
    # the setter overrides the variable, returns the previous setting, None restores the variable
    import vitkern

    assert vitkern.set_sm_carveout(1) is None
    assert vitkern.sm_carveout() == 1 and _config.available_sms() == 3
    assert vitkern.set_sm_carveout(None) == 1
    assert _config.sm_carveout() == 3
    for bad in (-2, 1.0, True, "3"):
        with pytest.raises(ValueError, match="set_sm_carveout"):
            vitkern.set_sm_carveout(bad)
    vitkern.set_sm_carveout(4)
    with pytest.raises(ValueError, match="set_sm_carveout.*below the SM count"):
        _config.available_sms()


@pytest.mark.parametrize("carveout", [0, 8])
def test_sm_carveout_sizes_persistent_grids(monkeypatch, carveout):
    """Under the compile check's capture (132 SMs on sm_90): a persistent forward GEMM launches
    132 - carve-out programs, and the dW split is chosen against the free SMs."""
    from vitkern.ops import _config
    from vitkern.testing.compile_check import capture

    monkeypatch.setattr(_config, "_CARVEOUT", {"value": carveout})
    free = 132 - carveout
    with capture(90) as launches:
        a, b, out = torch.empty(50432, 768, dtype=BF16), torch.empty(3072, 768, dtype=BF16), torch.empty(
            50432, 3072, dtype=BF16)
        _launch.gemm(a, b, out, Epilogue(bias=torch.empty(3072, dtype=BF16), activation=Activation.GELU))
        _launch.gemm(out.t(), a.t(), torch.empty(3072, 768, dtype=BF16), row_sum=True)
    fwd, dw = (launch.grid for launch in launches)
    assert fwd == (free, 1)
    cfg = _gemm.select_config(3072, 768, 50432, BF16, 90)
    plan = _gemm.plan_gemm(3072, 768, 50432, cfg, free, split_safe=True, row_sum=True)
    assert dw == (plan.tiles, plan.split_k) and plan.sm_use >= 0.9


def test_persistent_grid_with_carveout_numerics(device, monkeypatch):
    """A persistent config on 4 - 2 programs striding over 6 tiles: same result as the reference."""
    from vitkern.ops import _config

    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 4)
    monkeypatch.setattr(_config, "_CARVEOUT", {"value": 2})
    cfg = _gemm.GEMM_CONFIGS["h100_16_large" if device_arch() >= 90 else "a100_16_large"]
    M, N, K = 300, 136, 72
    a = torch.randn(M, K, device=device).to(BF16)
    b = (torch.randn(N, K, device=device) * K ** -0.5).to(BF16)
    bias = torch.randn(N, device=device).to(BF16)
    grids = _recording_launch(monkeypatch)
    out = poisoned((M, N), BF16, device)
    _launch.gemm(a, b, out, Epilogue(bias=bias), config=cfg)
    if cfg.persistent:
        assert grids == [(2, 1)]
    assert_2x_rounding("out", out, a.double() @ b.double().T + bias.double(), op="gemm")


# ---- the config table keyed on the epilogue kind


def test_config_table_epilogue_kinds():
    assert Epilogue().kind == "none"
    bias = torch.empty(8)
    assert Epilogue(bias=bias).kind == "bias"
    assert Epilogue(bias=bias, activation=Activation.GELU).kind == "act"
    assert Epilogue(bias=bias, residual=torch.empty(2, 8)).kind == "residual"
    assert Epilogue(bias=bias, col_scale=bias).kind == "branch"  # a deferred block's proj / fc2
    assert Epilogue(bias=bias, row_scale=torch.empty(2)).kind == "branch"
    assert Epilogue(bias=bias, col_scale=bias, row_dot=torch.empty(2, 8)).kind == "scale"
    assert Epilogue(col_scale=bias).kind == "scale"
    assert Epilogue(row_scale=torch.empty(2)).kind == "scale"
    assert Epilogue(act_grad=Activation.GELU, aux=torch.empty(2, 8)).kind == "act_grad"
    M = _VIT_B_TOKENS
    # the 128 x 256 tiles (epilogue in four slices) for the bias, GELU and residual epilogues at
    # large M on sm_90 only; the rest keep 128 x 128
    for kind, name in (("bias", "h100_16_wide"), ("act", "h100_16_wide"), ("residual", "h100_16_wide_res"),
                       ("branch", "h100_16_wide")):
        assert _gemm.select_config(M, 2304, 768, BF16, 90, kind) == _gemm.GEMM_CONFIGS[name]
        assert _gemm.select_config(M, 2304, 768, BF16, 90, kind, num_sms=132) == _gemm.GEMM_CONFIGS[name]
    for kind in ("none", "scale", "act_grad"):
        assert _gemm.select_config(M, 2304, 768, BF16, 90, kind) == _gemm.GEMM_CONFIGS["h100_16_large"]
    assert _gemm.select_config(M, 2304, 768, BF16, 80, "bias") == _gemm.GEMM_CONFIGS["a100_16_large"]
    assert _gemm.select_config(1000, 2304, 768, BF16, 90, "bias") == _gemm.GEMM_CONFIGS["h100_16_mid"]
    assert _gemm.config_kinds("h100_16_wide") == ("bias", "act", "branch")
    assert _gemm.config_kinds("h100_16_wide_res") == ("residual",)
    assert _gemm.config_kinds("h100_16_large") == tuple(k for k in _gemm.EPILOGUE_KINDS if k != "glu_grad")
    assert _gemm.select_config(M, 4096, 1536, BF16, 90, "glu_grad") == _gemm.GEMM_CONFIGS["h100_16_glu_grad"]
    with pytest.raises(ValueError, match="epilogue kind"):
        _gemm.select_config(M, 2304, 768, BF16, 90, "gelu")
    # every config is reachable from the table
    assert {name for _, name in _gemm.GEMM_RULES} == set(_gemm.GEMM_CONFIGS)


@pytest.mark.parametrize("name", ["h100_16_wide", "h100_16_wide_res"])
def test_wide_tiles(device, name):
    """The 128 x 256 tiles with their sliced epilogues: ragged M / N / K, two column tiles (the
    second with one live slice of four), bias only, bias + GELU + pre store, the fp32 residual
    with LayerScale and drop path."""
    cfg = _gemm.GEMM_CONFIGS[name]
    assert cfg.block_n == 256 and cfg.epilogue_split == 4
    M, N = 150, 300
    a, b, bias, p, gamma, rs = _check_fused_epilogues(cfg, BF16, device, M, N, 200)
    out = poisoned((M, N), BF16, device)
    _launch.gemm(a, b, out, Epilogue(bias=bias), config=cfg)
    assert_2x_rounding("out", out, p, op="gemm")
    out = poisoned((M, N), BF16, device)  # the "branch" kind: the scales without a residual
    _launch.gemm(a, b, out, Epilogue(bias=bias, col_scale=gamma, row_scale=rs), config=cfg)
    assert_2x_rounding("out", out, rs.double()[:, None] * gamma.double() * p, op="gemm")


def test_wide_tiles_give_way_when_their_last_wave_is_worse():
    """With the SM count, a 128 x 256 tile whose waves fill the chip worse than 0.95 of the
    128 x 128 tile's takes the narrower tile: ViT-B's fc2 at batch 64 (M = 12608, N = 768: 297
    wide tiles, 75% SM use on 132 SMs, against 594 narrow ones at 90%), not fc1 (N = 3072: 100%
    both) nor batch 256 (99.5% both)."""
    wide, wide_res, large = (_gemm.GEMM_CONFIGS[n] for n in ("h100_16_wide", "h100_16_wide_res", "h100_16_large"))
    assert _gemm.select_config(12608, 768, 3072, BF16, 90, "residual", num_sms=132) == large
    assert _gemm.select_config(12608, 768, 3072, BF16, 90, "residual") == wide_res  # the rules alone
    assert _gemm.select_config(12608, 3072, 768, BF16, 90, "act", num_sms=132) == wide
    assert _gemm.select_config(50432, 768, 3072, BF16, 90, "residual", num_sms=132) == wide_res
    # the carve-out's SM count decides too: 297 wide tiles on 99 SMs are 3 full waves
    assert _gemm.select_config(12608, 768, 3072, BF16, 90, "residual", num_sms=99) == wide_res
    assert _gemm.wide_stand_in(wide) == large and _gemm.wide_stand_in(large) is None
    # operands TMA cannot address (rows of 588 bf16 elements): the launcher takes the stand-in
    from vitkern.testing.compile_check import capture

    for k, block_n in ((588, 128), (768, 256)):
        with capture(90) as launches:
            _launch.gemm(torch.empty(3152, k, dtype=BF16), torch.empty(768, k, dtype=BF16),
                         torch.empty(3152, 768, dtype=BF16),
                         Epilogue(bias=torch.empty(768, dtype=BF16), activation=Activation.GELU_TANH))
        (launch,) = launches
        assert launch.config.meta["BLOCK_N"] == block_n, k


@pytest.mark.parametrize("split", [2, 4])
def test_epilogue_slices_every_step(device, split):
    """Every epilogue step in column slices (``epilogue_split``), TMA and plain loads, against the
    whole-tile epilogue's reference: bias + GELU + pre store, the residual with scales, the
    activation grad, the row dots with split-K (one partial per slice, summed), the SwiGLU
    gradient, and the row-map hook; ragged N so that whole slices fall past it."""
    M, N, K = 70, 100, 96
    for tma in (True, False):
        cfg = _gemm.GemmConfig(32, 64, 32, 4, num_warps=4, num_stages=2, tma=tma, split_k=4, epilogue_split=split)
        a = torch.randn(M, K, device=device).to(BF16)
        b = (torch.randn(N, K, device=device) * K ** -0.5).to(BF16)
        bias = torch.randn(N, device=device).to(BF16)
        p = a.double() @ b.double().T
        out, pre = poisoned((M, N), BF16, device), poisoned((M, N), BF16, device)
        _launch.gemm(a, b, out, Epilogue(bias=bias, activation=Activation.GELU, pre=pre), config=cfg)
        assert_2x_rounding("pre", pre, p + bias.double(), op="gemm")
        assert_2x_rounding("out", out, torch.nn.functional.gelu(p + bias.double()), op="gemm")
        res, gamma, rs = torch.randn(M, N, device=device), torch.rand(N, device=device), torch.rand(M, device=device)
        out = poisoned((M, N), F32, device)
        _launch.gemm(a, b, out, Epilogue(bias=bias, col_scale=gamma, row_scale=rs, residual=res), config=cfg)
        assert_2x_rounding("out", out, res.double() + rs.double()[:, None] * gamma.double() * (p + bias.double()),
                           op="gemm")
        aux = torch.randn(M, N, device=device).to(BF16)
        out = poisoned((M, N), BF16, device)
        _launch.gemm(a, b, out, Epilogue(act_grad=Activation.GELU, aux=aux), config=cfg)
        x = aux.double().requires_grad_()
        (dx,) = torch.autograd.grad(torch.nn.functional.gelu(x).sum(), x)
        assert_2x_rounding("out", out, p * dx, op="gemm")
        w = torch.randn(M, N, device=device).to(BF16)
        out = poisoned((M, N), F32, device)
        _, _, dots = _launch.gemm(a, b, out, Epilogue(row_dot=w), split_k=2, config=cfg)
        torch.testing.assert_close(dots.double(), (p * w.double()).sum(1), atol=1e-3, rtol=1e-4)
        packed = torch.randn(M, 2 * N, device=device).to(BF16)
        out = poisoned((M, 2 * N), BF16, device)
        _launch.gemm(a, b, out, Epilogue(glu_grad=True, aux=packed), config=cfg)
        g, v = packed.double()[:, :N], packed.double()[:, N:]
        s = torch.sigmoid(g)
        assert_2x_rounding("dg", out[:, :N], p * v * (s + g * s * (1 - s)), op="gemm")
        assert_2x_rounding("dv", out[:, N:], p * g * s, op="gemm")
    n_img, n_patch, n_prefix = 2, 35, 1
    pos = torch.randn(n_patch, N, device=device)
    out = poisoned((n_img * (n_patch + n_prefix), N), F32, device)
    cfg = _gemm.GemmConfig(32, 64, 32, 4, num_warps=4, num_stages=2, epilogue_split=split)
    _launch.gemm(a, b, out, Epilogue(residual=pos), row_map=_rows_after_prefix, c_args=(n_patch, n_prefix), config=cfg)
    got = out.reshape(n_img, n_patch + n_prefix, N)
    want = p.reshape(n_img, n_patch, N) + pos.double()
    torch.testing.assert_close(got[:, n_prefix:].double(), want, atol=1e-4, rtol=1e-4)
    assert torch.isnan(got[:, :n_prefix]).all()


def test_epilogue_split_is_checked():
    with pytest.raises(ValueError, match="epilogue_split"):
        _gemm.GemmConfig(128, 128, 64, epilogue_split=3)
    with pytest.raises(ValueError, match="epilogue_split"):
        _gemm.GemmConfig(64, 32, 32, epilogue_split=4)  # 8-column slices


# ---- the ViT GEMM compile report (benchmarks/compile_report_gemm.json)


def test_vit_gemm_launches_follow_the_plan():
    """Every ViT-S/B/L/H GEMM of the report, captured as on sm_90 (132 SMs): the launcher's tile
    and grid are the plan's; every dW GEMM keeps >= 90% predicted SM use."""
    from vitkern.testing.compile_check import capture
    from vitkern.testing.compile_check.gemm_report import MIN_DW_SM_USE, vit_gemms

    gemms = vit_gemms(256)
    assert len(gemms) == 5 * 4 * 3  # four GELU ViTs and DINOv2's ViT-g/14 with its SwiGLU MLP
    for g in gemms:
        with capture(90) as launches:
            g.call()
        (launch,) = launches
        if g.epilogue == "swiglu":  # the SwiGLU forward GEMM: its own table, one program per tile
            cfg = _gemm.select_swiglu_config(g.M, g.N, g.K, BF16, 90)
            assert launch.entry.qualname.endswith("_swiglu_gemm_kernel")
        else:
            assert _kind_of(launch.kwargs) == g.epilogue, (g.model, g.layer, g.pass_)
            cfg = _gemm.select_config(g.M, g.N, g.K, BF16, 90, g.epilogue, num_sms=132)
        plan = _gemm.plan_gemm(g.M, g.N, g.K, cfg, 132, split_safe=g.pass_ == "dW", row_sum=g.pass_ == "dW")
        assert launch.config.meta["BLOCK_N"] == cfg.block_n and launch.config.meta["BLOCK_M"] == cfg.block_m
        grid = tuple(launch.grid) + ((1,) if g.epilogue == "swiglu" else ())
        assert grid == (plan.programs, plan.split_k), (g.model, g.layer, g.pass_)
        if g.pass_ == "dW":
            assert plan.sm_use >= MIN_DW_SM_USE, (g.model, g.layer, plan.describe())


def _kind_of(kw) -> str:
    """The epilogue kind from a captured launch's constexprs."""
    if kw["HAS_RESIDUAL"]:
        return "residual"
    if kw["ACTIVATION"] or kw["STORE_PRE"]:
        return "act"
    if kw["GLU_GRAD"]:
        return "glu_grad"
    if kw["ACT_GRAD"]:
        return "act_grad"
    if kw["HAS_BIAS"] and not kw["ROW_DOT"] and (kw["HAS_COL_SCALE"] or kw["HAS_ROW_SCALE"]):
        return "branch"
    if kw["HAS_COL_SCALE"] or kw["HAS_ROW_SCALE"] or kw["ROW_DOT"]:
        return "scale"
    return "bias" if kw["HAS_BIAS"] else "none"


def test_committed_gemm_report_is_current():
    """The committed report: every GEMM without spills or problems, its plan the one the current
    rules make, every dW GEMM at >= 90% predicted SM use (regenerate it with the command in its
    "command" field when a rule or config changes)."""
    import json
    from pathlib import Path

    from vitkern.testing.compile_check.gemm_report import MIN_DW_SM_USE

    report = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "compile_report_gemm.json").read_text())
    rows = report["rows"]
    assert len(rows) == 60 and not any(report["plan_problems"])
    for r in rows:
        assert r["problems"] == [] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["wgmma"] and r["blocks_per_sm"] >= 1
        if r["epilogue"] == "swiglu":
            cfg = _gemm.select_swiglu_config(r["M"], r["N"], r["K"], BF16, r["arch"])
        else:
            cfg = _gemm.select_config(r["M"], r["N"], r["K"], BF16, r["arch"], r["epilogue"], num_sms=132)
        plan = _gemm.plan_gemm(r["M"], r["N"], r["K"], cfg, 132, split_safe=r["pass"] == "dW",
                               row_sum=r["pass"] == "dW")
        assert {k: r[k] for k in plan.describe()} == plan.describe(), (r["model"], r["gemm"], r["pass"])
        if r["pass"] == "dW":
            assert r["sm_use"] >= MIN_DW_SM_USE


def test_blocks_per_sm():
    from vitkern.testing.compile_check import blocks_per_sm

    assert blocks_per_sm(80, 4, 2048, 90) == 6     # 80 registers: 2560 per warp, 25 warps
    assert blocks_per_sm(64, 4, 8192, 90) == 8
    assert blocks_per_sm(214, 8, 209 * 1024, 90) == 1
    assert blocks_per_sm(32, 4, 100 * 1024, 90) == 2   # shared memory bound
    assert blocks_per_sm(16, 1, 0, 90) == 32           # the block limit
    assert blocks_per_sm(None, 4, 0, 90) is None


@pytest.mark.parametrize("split_k", [1, 2])
def test_a_copy_writes_the_16bit_operand(device, split_k):
    """``a_copy``: the float32 A operand, rounded to B's dtype once, written from the pid_n == 0
    tiles while the GEMM reads it (odd M / K, three column tiles, K splits); the product is the
    16-bit product either way. N = 0 still fills it; a wrong shape or dtype is refused by name."""
    M, N, K = 77, 300, 100
    cfg = _gemm.GEMM_CONFIGS["h100_16_small" if device_arch() >= 90 else "a100_16_small"]
    for dtype in (BF16, F16):
        g = torch.randn(M, K, device=device)
        w = torch.randn(N, K, device=device).to(dtype)
        out = poisoned((M, N), F32, device)
        low = poisoned((M, K), dtype, device)
        _launch.gemm(g, w, out, a_copy=low, split_k=split_k, config=cfg)
        torch.testing.assert_close(low, g.to(dtype), rtol=0, atol=0)
        assert_2x_rounding("out", out, g.to(dtype).double() @ w.double().T, op="gemm")
    low = poisoned((M, K), BF16, device)
    _launch.gemm(g, torch.empty(0, K, device=device, dtype=BF16), torch.empty(M, 0, device=device), a_copy=low)
    torch.testing.assert_close(low, g.to(BF16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="a_copy"):
        _launch.gemm(g, w, out, a_copy=torch.empty(M, K + 1, device=device, dtype=w.dtype))
    with pytest.raises(ValueError, match="a_copy"):
        _launch.gemm(g, w, out, a_copy=torch.empty(M, K, device=device, dtype=F32))


def test_weighted_row_sums(device):
    """``row_sum_weight``: ``sum_k A'[m, k] * w[k]`` from the tiles the GEMM reads (odd M / K,
    three column tiles, one row-sum store per row block), the bias term of drop path's
    row-scale grad; refused without row_sum or with a wrong shape."""
    M, N, K = 77, 300, 100
    cfg = _gemm.GEMM_CONFIGS["h100_16_small" if device_arch() >= 90 else "a100_16_small"]
    g = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device).to(BF16)
    vec = torch.randn(K, device=device)
    out = poisoned((M, N), F32, device)
    _, s, _ = _launch.gemm(g, w, out, row_sum=True, row_sum_weight=vec, config=cfg)
    torch.testing.assert_close(s.double(), g.to(BF16).double() @ vec.double(), atol=1e-3, rtol=1e-4)
    assert_2x_rounding("out", out, g.to(BF16).double() @ w.double().T, op="gemm")
    with pytest.raises(ValueError, match="row_sum_weight"):
        _launch.gemm(g, w, out, row_sum_weight=vec)
    with pytest.raises(ValueError, match="row_sum_weight"):
        _launch.gemm(g, w, out, row_sum=True, row_sum_weight=vec[:-1])
