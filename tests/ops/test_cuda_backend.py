"""The "cuda" backend of linear, mlp and patch_embed (vitkern.ops.linear.cuda, vitkern.ops.mlp.cuda,
vitkern.ops.patch_embed.cuda, vitkern.ops.cuda_backend: the cuBLASLt ops of vitkern._C).

Without a GPU (the normal case here): the ops' schemas, their fake implementations on meta and fake
CUDA tensors, autograd wiring on meta tensors, tracing through the public functions, backend
selection errors, and the host-side cuBLASLt set-up (descriptors with the GELU_AUX_BIAS,
DGELU_BGRAD and BGRADB epilogues, layouts, preferences), which needs no GPU.

On a GPU (``gpu`` marker): every op against the fp64 reference and PyTorch in the same dtype,
forward and backward, for all dtypes, activations and residual options, with the fused epilogues
and with the unfused fallback paths; patch_embed with both pos_embed forms, prefix tokens, NCHW and
channels_last, square and rectangular patches; opcheck; torch.compile.

Tolerance (DESIGN.md): error vs fp64 <= 2 x PyTorch's error in the same dtype + a small atol.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import vitkern
from vitkern import _extension as ext
from vitkern.ops import cuda_backend as cb
from vitkern.ops.patch_embed import cuda as pecuda
from vitkern.ops.activation import Activation
from vitkern.ops.linear import cuda as lcuda
from vitkern.ops.linear import linear_ref
from vitkern.ops.mlp import cuda as mcuda
from vitkern.ops.mlp import mlp_ref
from vitkern.ops.patch_embed import patch_embed_ref
from vitkern.testing.numerics import assert_2x_torch

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ACTS = [None, "gelu", "gelu_tanh"]

needs_extension = pytest.mark.skipif(
    not ext.cuda_extension_available(), reason=f"CUDA extension unavailable: {ext.extension_error()}"
)

# Fake tensors may live on "cuda" without a GPU: they carry the device, never touch it.
FAKE_CUDA = torch.device("cuda")

SCHEMAS = {
    "fused_dense_fwd": "vitkern_cuda::fused_dense_fwd(Tensor x, Tensor weight, Tensor? bias, int activation, "
    "Tensor? residual, Tensor? residual_scale, Tensor? row_scale, bool save_pre, bool allow_tf32) -> (Tensor, Tensor)",
    "fused_dense_bwd": "vitkern_cuda::fused_dense_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? residual_scale, "
    "Tensor? row_scale, Tensor pre, int activation, bool need_dx, bool need_dweight, bool need_dbias, "
    "bool need_dscale, bool need_drow_scale, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "mlp_fwd": "vitkern_cuda::mlp_fwd(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
    "Tensor? fc2_bias, int activation, Tensor? residual, Tensor? residual_scale, Tensor? row_scale, "
    "bool save_pre, bool save_branch, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor)",
    "mlp_bwd": "vitkern_cuda::mlp_bwd(Tensor grad, Tensor x, Tensor fc1_weight, Tensor fc2_weight, "
    "Tensor? residual_scale, Tensor? row_scale, Tensor pre, Tensor h, Tensor branch, int activation, "
    "bool need_dx, bool need_dfc1_weight, bool need_dfc1_bias, bool need_dfc2_weight, bool need_dfc2_bias, "
    "bool need_dscale, bool need_drow_scale, bool allow_tf32) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "patch_embed_fwd": "vitkern_cuda::patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, "
    "Tensor? pos_embed, Tensor? prefix_tokens, bool allow_tf32) -> Tensor",
    "patch_embed_bwd": "vitkern_cuda::patch_embed_bwd(Tensor grad, Tensor images, Tensor weight, "
    "int num_prefix_tokens, bool need_dimages, bool need_dweight, bool need_dbias, bool allow_tf32) "
    "-> (Tensor, Tensor, Tensor)",
}

# cublasLt.h values the descriptor tests read back.
EPILOGUE = {"DEFAULT": 1, "BIAS": 4, "GELU_AUX_BIAS": 164, "DGELU_BGRAD": 208, "BGRADB": 512}
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1


# =============================================================================== no GPU needed


def test_module_exports_and_registration():
    from vitkern import _backend

    assert {a.public_name: int(a) for a in Activation} == {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}
    for op in ("linear", "mlp", "patch_embed"):
        assert "cuda" in _backend.registered_backends(op), op
    assert _backend.CUDA_EXTENSION_OPS == {"linear", "mlp", "patch_embed"}


def test_import_without_the_extension_registers_with_a_reason():
    # A fresh interpreter where importing vitkern._C fails: the backend module still imports, and
    # an explicit "cuda" selection names the reason.
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vitkern._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        import vitkern
        from vitkern.ops import cuda_backend
        from vitkern._backend import select_impl, registered_backends
        assert "cuda" in registered_backends("linear")
        assert not vitkern.cuda_extension_available()
        assert cuda_backend.cublaslt_stats() is None
        x = torch.zeros(2, 4)
        with vitkern.use_backend("cuda"):
            try:
                select_impl("linear", torch.device("cuda"), x, torch.zeros(3, 4))
            except vitkern.BackendUnavailableError as exc:
                print("REASON", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "REASON vitkern.linear: backend 'cuda' cannot run this call" in proc.stdout
    assert "vitkern._C" in proc.stdout and "blocked for the test" in proc.stdout


@pytest.mark.parametrize("op", ["linear", "mlp", "patch_embed"])
def test_cuda_backend_rejects_cpu_tensors(op):
    x = torch.randn(2, 3, 8)
    with vitkern.use_backend("cuda"), pytest.raises(vitkern.BackendUnavailableError) as info:
        if op == "linear":
            vitkern.linear(x, torch.randn(5, 8))
        elif op == "mlp":
            vitkern.mlp(x, torch.randn(6, 8), None, torch.randn(5, 6), None)
        else:
            vitkern.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 4, 4))
    message = str(info.value)
    assert f"vitkern.{op}: backend 'cuda' cannot run this call" in message
    assert "needs CUDA tensors (got cpu)" in message


def test_cuda_backend_leaves_other_ops_on_auto():
    x = torch.randn(3, 16)
    with vitkern.use_backend("cuda"):
        y = vitkern.layer_norm(x)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,)), rtol=1e-5, atol=1e-5)


def test_missing_extension_reason_in_selection(monkeypatch):
    from vitkern._backend import select_impl

    monkeypatch.setattr(ext, "_loaded", True)
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_error", "vitkern._C is not built (test)")
    with vitkern.use_backend("cuda"), pytest.raises(vitkern.BackendUnavailableError, match="is not built \\(test\\)"):
        select_impl("mlp", FAKE_CUDA, torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(4, 3), None)
    with pytest.raises(RuntimeError, match="not available"):
        with cb.force_unfused_epilogues():
            pass


def test_on_load_hook_runs_once_loaded(monkeypatch):
    calls = []
    monkeypatch.setattr(ext, "_load_hooks", [])
    monkeypatch.setattr(ext, "_loaded", False)
    monkeypatch.setattr(ext, "_module", None)
    ext._on_load(lambda: calls.append("a"))
    assert calls == [] and len(ext._load_hooks) == 1
    monkeypatch.setattr(ext, "_loaded", True)
    monkeypatch.setattr(ext, "_module", object())
    ext._on_load(lambda: calls.append("b"))  # already loaded: runs now
    assert calls == ["b"]


def _fake_cuda(*shape, dtype=BF16, requires_grad=False):
    return torch.empty(*shape, dtype=dtype, device=FAKE_CUDA, requires_grad=requires_grad)


def test_quick_gelu_refused_by_reason():
    # The extension's epilogues have no QuickGELU: its supports predicates say so before looking at
    # the tensors, so an explicit "cuda" backend raises with the reason and "auto" skips it.
    x, w = torch.zeros(4, 8), torch.zeros(5, 8)
    for reason in (lcuda._linear_supports(x, w, None, activation="quick_gelu"),
                   mcuda._mlp_supports(x, torch.zeros(6, 8), None, torch.zeros(5, 6), None, activation="quick_gelu")):
        assert "'quick_gelu'" in reason and "QuickGELU" in reason
    with pytest.raises(Exception, match="QuickGELU"):
        with vitkern.use_backend("cuda"):
            vitkern.linear(x, w, activation="quick_gelu")


@needs_extension
def test_supports_reasons():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = _fake_cuda(4, 8), _fake_cuda(5, 8)
        assert lcuda._linear_supports(x, w, None, activation="gelu") is None
        assert "activation 'relu'" in lcuda._linear_supports(x, w, activation="relu")
        r64 = _fake_cuda(4, 5, dtype=F64)
        assert "residual has dtype float64" in lcuda._linear_supports(x, w, residual=r64)
        assert mcuda._mlp_supports(x, _fake_cuda(6, 8), None, _fake_cuda(5, 6), None) is None
        img, pw = _fake_cuda(1, 3, 8, 8), _fake_cuda(5, 3, 4, 4)
        assert pecuda._patch_embed_supports(img, pw, None) is None
        cpu_pos = torch.zeros(1, 4, 5)
        assert "pos_embed is on cpu" in pecuda._patch_embed_supports(img, pw, pos_embed=cpu_pos)


# ------------------------------------------------------------------------ schemas and fakes


@needs_extension
def test_schemas_and_build_info():
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.vitkern_cuda, name).default._schema) == schema
    assert set(SCHEMAS) | {"patchify"} == set(ext.build_info()["ops"])


@needs_extension
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("residual", [None, "same", "fp32"])
@pytest.mark.parametrize("save_pre", [False, True])
def test_fused_dense_fake_on_meta(dtype, activation, residual, save_pre):
    m, k, n = 197, 100, 130
    x = torch.empty(m, k, dtype=dtype, device="meta")
    w = torch.empty(n, k, dtype=dtype, device="meta")
    b = torch.empty(n, dtype=dtype, device="meta")
    r = None if residual is None else torch.empty(m, n, dtype=dtype if residual == "same" else F32, device="meta")
    out, pre = torch.ops.vitkern_cuda.fused_dense_fwd(x, w, b, activation, r, None, None, save_pre, False)
    assert out.shape == (m, n) and out.dtype == (r.dtype if r is not None else dtype)
    assert pre.shape == ((m, 136) if save_pre else (0,)) and pre.dtype == dtype  # ld rounded up to 8
    grads = torch.ops.vitkern_cuda.fused_dense_bwd(
        out, x, w, None, None, pre, activation, True, True, True, False, False, False
    )
    assert [tuple(g.shape) for g in grads] == [(m, k), (n, k), (n,), (0,), (0,)]
    assert all(g.dtype == dtype for g in grads)


@needs_extension
def test_fused_dense_fake_rejects_bad_input():
    x = torch.empty(4, 8, device="meta")
    with pytest.raises(RuntimeError, match="weight must have shape \\(N, 8\\)"):
        torch.ops.vitkern_cuda.fused_dense_fwd(x, torch.empty(5, 7, device="meta"), None, 0, None, None, None,
                                               False, False)
    with pytest.raises(RuntimeError, match="activation must be 0"):
        torch.ops.vitkern_cuda.fused_dense_fwd(x, torch.empty(5, 8, device="meta"), None, 3, None, None, None,
                                               False, False)
    with pytest.raises(RuntimeError, match="residual_scale needs residual"):
        torch.ops.vitkern_cuda.fused_dense_fwd(
            x, torch.empty(5, 8, device="meta"), None, 0, None, torch.empty(5, device="meta"), None, False, False
        )
    with pytest.raises(RuntimeError, match="row_scale must have shape \\(4,\\)"):
        torch.ops.vitkern_cuda.fused_dense_fwd(
            x, torch.empty(5, 8, device="meta"), None, 0, torch.empty(4, 5, device="meta"), None,
            torch.empty(3, device="meta"), False, False,
        )


@needs_extension
@pytest.mark.parametrize("activation", [0, 1, 2])
def test_mlp_fake_on_meta(activation):
    m, k, hidden, n = 50, 96, 300, 96
    x = torch.empty(m, k, dtype=BF16, device="meta")
    w1, b1 = torch.empty(hidden, k, dtype=BF16, device="meta"), torch.empty(hidden, dtype=BF16, device="meta")
    w2, b2 = torch.empty(n, hidden, dtype=BF16, device="meta"), torch.empty(n, dtype=BF16, device="meta")
    r = torch.empty(m, n, dtype=F32, device="meta")
    g = torch.empty(n, dtype=BF16, device="meta")
    rs = torch.empty(m, dtype=F32, device="meta")
    out, pre, h, branch = torch.ops.vitkern_cuda.mlp_fwd(x, w1, b1, w2, b2, activation, r, g, rs, True, True, False)
    assert out.shape == (m, n) and out.dtype == F32
    assert pre.shape == ((m, 304) if activation else (0,))
    assert h.shape == (m, hidden) and h.dtype == BF16
    assert branch.shape == (m, 96)
    grads = torch.ops.vitkern_cuda.mlp_bwd(out, x, w1, w2, g, rs, pre, h, branch, activation, *([True] * 7), False)
    assert [tuple(t.shape) for t in grads] == [(m, k), (hidden, k), (hidden,), (n, hidden), (n,), (n,), (m,)]
    assert [t.dtype for t in grads] == [BF16] * 6 + [F32]


@needs_extension
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pos", [None, "patch", "all"])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_patch_embed_fake_on_meta(channels_last, pos, prefix):
    b, c, h, w, d, ph, pw = 2, 3, 32, 48, 64, 16, 8
    n = (h // ph) * (w // pw)
    images = torch.empty(b, c, h, w, dtype=BF16, device="meta")
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    weight = torch.empty(d, c, ph, pw, dtype=BF16, device="meta")
    bias = torch.empty(d, dtype=BF16, device="meta")
    pos_embed = None if pos is None else torch.empty(1, n + (prefix if pos == "all" else 0), d, device="meta")
    prefix_tokens = torch.empty(1, prefix, d, dtype=BF16, device="meta") if prefix else None
    out = torch.ops.vitkern_cuda.patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens, False)
    assert out.shape == (b, prefix + n, d)
    assert out.dtype == (F32 if pos_embed is not None else BF16)  # fp32 pos_embed promotes, as in timm
    dimages, dw, db = torch.ops.vitkern_cuda.patch_embed_bwd(out, images, weight, prefix, True, True, True, False)
    assert dimages.shape == images.shape and dimages.dtype == BF16
    assert dimages.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert dw.shape == weight.shape and dw.is_contiguous() and db.shape == (d,)  # K = 384: no padding


@needs_extension
@pytest.mark.parametrize("dtype, stride", [(BF16, (592, 196, 14, 1)), (F16, (592, 196, 14, 1)),
                                           (F32, (588, 196, 14, 1))])
def test_patch_embed_fake_weight_grad_of_padded_k(dtype, stride):
    """14 x 14 x 3 patches: K = 588 pads to 592 in 16-bit dtypes; the weight gradient is the view
    of the first 588 of 592 columns, the weight's shape, no padding in it."""
    images = torch.empty(2, 3, 28, 42, dtype=dtype, device="meta")
    weight = torch.empty(64, 3, 14, 14, dtype=dtype, device="meta")
    grad = torch.empty(2, 7, 64, dtype=dtype, device="meta")
    for imgs in (images, images.to(memory_format=torch.channels_last)):
        _, dw, _ = torch.ops.vitkern_cuda.patch_embed_bwd(grad, imgs, weight, 1, False, True, False, False)
        assert dw.shape == weight.shape and dw.stride() == stride and dw.dtype == dtype


@needs_extension
def test_patch_embed_fake_rejects_bad_input():
    images = torch.empty(1, 3, 32, 32, device="meta")
    weight = torch.empty(8, 3, 16, 16, device="meta")
    with pytest.raises(RuntimeError, match="pos_embed has length 5 but must have length 4"):
        torch.ops.vitkern_cuda.patch_embed_fwd(images, weight, None, torch.empty(1, 5, 8, device="meta"), None, False)
    with pytest.raises(RuntimeError, match="images has 3 channels but weight expects 4"):
        torch.ops.vitkern_cuda.patch_embed_fwd(images, torch.empty(8, 4, 16, 16, device="meta"), None, None, None,
                                               False)
    with pytest.raises(RuntimeError, match="multiples of the patch size"):
        torch.ops.vitkern_cuda.patch_embed_fwd(images, torch.empty(8, 3, 12, 16, device="meta"), None, None, None,
                                               False)


# ---------------------------------------------------------------- autograd wiring (meta)


@needs_extension
def test_fused_dense_autograd_on_meta():
    def leaf(*shape, dtype=BF16):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)

    x, w, b = leaf(10, 64), leaf(96, 64), leaf(96)
    r, g, rs = leaf(10, 96, dtype=F32), leaf(96), leaf(10, dtype=F32)
    out, pre = torch.ops.vitkern_cuda.fused_dense_fwd(x, w, b, 1, r, g, rs, True, False)
    out.sum().backward()
    for t in (x, w, b, r, g, rs):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype


@needs_extension
def test_mlp_autograd_on_meta():
    def leaf(*shape, dtype=F16):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)

    x, w1, b1, w2, b2 = leaf(10, 32), leaf(64, 32), leaf(64), leaf(32, 64), leaf(32)
    r, g, rs = leaf(10, 32), leaf(32), leaf(10)
    out, *_ = torch.ops.vitkern_cuda.mlp_fwd(x, w1, b1, w2, b2, 2, r, g, rs, True, True, False)
    out.sum().backward()
    for t in (x, w1, b1, w2, b2, r, g, rs):
        assert t.grad is not None and t.grad.shape == t.shape


@needs_extension
@pytest.mark.parametrize("pos_all", [False, True])
def test_patch_embed_autograd_on_meta(pos_all):
    images = torch.empty(2, 3, 32, 32, dtype=BF16, device="meta", requires_grad=True)
    weight = torch.empty(16, 3, 16, 16, dtype=BF16, device="meta", requires_grad=True)
    bias = torch.empty(16, dtype=BF16, device="meta", requires_grad=True)
    pos = torch.empty(1, 4 + (2 if pos_all else 0), 16, device="meta", requires_grad=True)
    prefix = torch.empty(1, 2, 16, device="meta", requires_grad=True)
    out = torch.ops.vitkern_cuda.patch_embed_fwd(images, weight, bias, pos, prefix, False)
    assert out.shape == (2, 6, 16) and out.dtype == F32
    out.sum().backward()
    for t in (images, weight, bias, pos, prefix):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype


@needs_extension
def test_public_functions_trace_to_the_extension_ops():
    """make_fx through vitkern.linear / mlp / patch_embed with fake CUDA tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w, b, r, img, pw, pb, pos, cls, w1, b1, w2, b2):
        with vitkern.use_backend("cuda"):
            y = vitkern.linear(x, w, b, activation="gelu", residual=r)
            t = vitkern.patch_embed(img, pw, pb, pos_embed=pos, prefix_tokens=cls)
            m = vitkern.mlp(x, w1, b1, w2, b2, activation="gelu_tanh", residual=r)
        return y, t, m

    with FakeTensorMode():
        args = (
            _fake_cuda(2, 5, 64), _fake_cuda(96, 64), _fake_cuda(96), _fake_cuda(2, 5, 96, dtype=F32),
            _fake_cuda(2, 3, 32, 48).to(memory_format=torch.channels_last), _fake_cuda(96, 3, 16, 16),
            _fake_cuda(96), _fake_cuda(1, 7, 96, dtype=F32), _fake_cuda(1, 1, 96, dtype=F32),
            _fake_cuda(128, 64), _fake_cuda(128), _fake_cuda(96, 128), _fake_cuda(96),
        )
    gm = make_fx(f, tracing_mode="fake")(*args)
    code = gm.code
    for op in ("fused_dense_fwd", "patch_embed_fwd", "mlp_fwd"):
        assert f"torch.ops.vitkern_cuda.{op}.default" in code, code
    # Inference: nothing saved for backward (save_pre / save_branch False).
    assert "fused_dense_fwd.default(view, w_1, b_1, 1, view_1, None, None, False, False)" in code


# ----------------------------------------------------------------- host-side cuBLASLt set-up


@needs_extension
@pytest.mark.parametrize("dtype, cuda_type",
                         [("bfloat16", CUDA_R_16BF), ("float16", CUDA_R_16F), ("float32", CUDA_R_32F)])
def test_cublaslt_forward_descriptor_gelu_aux_bias(dtype, cuda_type):
    M, N, K = 197, 130, 96
    d = ext.load()._cublaslt_describe("forward", dtype, M, N, K, "GELU_AUX_BIAS")
    assert d["epilogue"] == EPILOGUE["GELU_AUX_BIAS"]
    # Y[M, N] = X W^T as D (N x M) = op_T(W) op_N(X), column-major.
    assert (d["m"], d["n"], d["k"]) == (N, M, K)
    assert (d["transa"], d["transb"]) == (CUBLAS_OP_T, CUBLAS_OP_N)
    assert (d["a_rows"], d["a_cols"], d["a_ld"]) == (K, N, K)
    assert (d["b_rows"], d["b_cols"], d["b_ld"]) == (K, M, K)
    assert (d["d_rows"], d["d_cols"], d["d_ld"]) == (N, M, N)
    assert d["a_type"] == d["b_type"] == d["d_type"] == cuda_type
    assert d["aux_ld"] == 136 and d["aux_ld"] % 8 == 0  # cuBLASLt: a multiple of 8, >= rows of D
    assert d["bias_pointer"] != 0 and d["aux_pointer"] != 0 and d["bias_pointer"] != d["aux_pointer"]
    assert d["bias_data_type"] == -1  # the default: D's type
    assert d["compute_type"] == CUBLAS_COMPUTE_32F and d["scale_type"] == CUDA_R_32F
    # fp16 / bf16: no split-K reduction in the output type (fp32 accumulation throughout).
    assert d["pref_reduction_mask"] == (7 if dtype == "float32" else 2)
    assert d["pref_min_alignment_a"] == 16 and d["pref_min_alignment_d"] == 16
    assert d["heuristic_status"] is None


@needs_extension
def test_cublaslt_backward_descriptors():
    C = ext.load()
    M, N, K = 394, 384, 96
    d = C._cublaslt_describe("input_grad", "bfloat16", M, N, K, "DGELU_BGRAD")
    assert d["epilogue"] == EPILOGUE["DGELU_BGRAD"]
    assert (d["m"], d["n"], d["k"]) == (K, M, N) and (d["transa"], d["transb"]) == (CUBLAS_OP_N, CUBLAS_OP_N)
    assert d["aux_ld"] % 8 == 0 and d["aux_ld"] >= d["m"]
    d = C._cublaslt_describe("weight_grad", "bfloat16", M, N, K, "BGRADB")
    assert d["epilogue"] == EPILOGUE["BGRADB"]
    # BGRADB reduces op(B) over k and needs op(B) = T: dW (K x N) = X (K x M) dT^T.
    assert (d["m"], d["n"], d["k"]) == (K, N, M) and (d["transa"], d["transb"]) == (CUBLAS_OP_N, CUBLAS_OP_T)
    assert (d["b_rows"], d["b_cols"], d["b_ld"]) == (N, M, N)
    assert d["aux_pointer"] == 0
    with pytest.raises(RuntimeError, match="unknown epilogue"):
        C._cublaslt_describe("forward", "bfloat16", 4, 4, 4, "RELU_SOMETHING")


@needs_extension
def test_cublaslt_fp32_follows_the_allow_tf32_argument():
    C = ext.load()
    def compute_type(dtype):
        return C._cublaslt_describe("forward", dtype, 8, 8, 8, "BIAS", allow_tf32=True)["compute_type"]

    assert compute_type("float32") == CUBLAS_COMPUTE_32F_FAST_TF32
    assert compute_type("bfloat16") == CUBLAS_COMPUTE_32F
    assert C._cublaslt_describe("forward", "float32", 8, 8, 8, "BIAS")["compute_type"] == CUBLAS_COMPUTE_32F
    # the scope ends with the call: nothing leaks into the next GEMM built on this thread
    assert C._cublaslt_describe("weight_grad", "float32", 8, 8, 8, "BGRADB")["compute_type"] == CUBLAS_COMPUTE_32F


def test_ops_pass_torch_matmul_precision(monkeypatch):
    """The backend reads torch's fp32 matmul precision in Python and passes it to every op (the C++
    accessor differs across torch versions); backward runs at the forward's precision."""
    seen = []

    def recorder(name):
        def op(*args):
            seen.append((name, args[-1]))
            raise _Stop

        return op

    class _Stop(Exception):
        pass

    for name in ("fused_dense_fwd", "mlp_fwd", "patch_embed_fwd"):
        monkeypatch.setattr(torch.ops.vitkern_cuda, name, recorder(name), raising=False)
    previous = torch.backends.cuda.matmul.fp32_precision
    try:
        for precision, expected in (("tf32", True), ("ieee", False)):
            torch.backends.cuda.matmul.fp32_precision = precision
            x, w = torch.empty(4, 8, device="meta"), torch.empty(16, 8, device="meta")
            for call in (lambda: lcuda.linear_cuda(x, w, None), lambda: mcuda.mlp_cuda(x, w, None, w.t(), None),
                         lambda: pecuda.patch_embed_cuda(torch.empty(1, 3, 16, 16, device="meta"),
                                                     torch.empty(8, 3, 16, 16, device="meta"))):
                with pytest.raises(_Stop):
                    call()
            assert [flag for _, flag in seen[-3:]] == [expected] * 3, seen
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    for save, n_inputs in ((lcuda._save, 9), (mcuda._save, 12), (pecuda._patch_embed_save, 6)):
        inputs = [None] * (n_inputs - 1) + [True]
        inputs[0] = torch.empty(1, 3, 16, 16)
        inputs[1] = torch.empty(8, 3, 16, 16)
        _, state = save(tuple(inputs), (None, None, None, None))
        assert state.allow_tf32 is True


@needs_extension
def test_cublaslt_heuristic_query_reports_its_status():
    d = ext.load()._cublaslt_describe("forward", "bfloat16", 197, 768, 768, "GELU_AUX_BIAS", query_heuristic=True)
    status = d["heuristic_status"]
    if torch.cuda.is_available():
        assert status == "CUBLAS_STATUS_SUCCESS" and d["heuristic_results"] >= 1
    else:
        assert isinstance(status, str) and status and status != "CUBLAS_STATUS_SUCCESS"


@needs_extension
def test_cublaslt_stats_and_switch():
    stats = cb.cublaslt_stats()
    assert set(stats) >= {"fused_matmuls", "plain_matmuls", "unfused_fallbacks", "heuristic_queries",
                          "cached_algorithms", "force_unfused"}
    assert stats["force_unfused"] == 0
    with cb.force_unfused_epilogues():
        assert cb.cublaslt_stats()["force_unfused"] == 1
    assert cb.cublaslt_stats()["force_unfused"] == 0
    assert isinstance(cb.cublaslt_fallbacks(), list)


@needs_extension
@pytest.mark.parametrize(
    "geometry, addresses, expected",
    [
        ((2, 3, 224, 224, 16, 16, 2, False), (0, 0), (16, 16)),  # NCHW bf16: 32-byte rows
        ((2, 3, 224, 224, 14, 14, 2, False), (0, 0), (4, 4)),  # 28-byte segments
        ((2, 3, 224, 224, 16, 16, 2, False), (2, 0), (2, 2)),  # misaligned input
        ((2, 3, 224, 224, 16, 16, 2, True), (0, 0), (16, 16)),  # NHWC: 96-byte patch rows, 32-byte runs
        ((2, 3, 224, 224, 14, 14, 2, True), (0, 0), (4, 4)),  # 84-byte rows, 28-byte runs
        ((2, 3, 224, 224, 16, 16, 4, True), (0, 8), (16, 8)),  # fp32, output 8-byte aligned
        ((1, 64, 64, 64, 32, 32, 4, True), (0, 0), (4, 4)),  # 256 KB patches: element gather
    ],
)
def test_patchify_unit_widths(geometry, addresses, expected):
    assert ext.load()._patchify_unit_bytes(*geometry, *addresses) == expected


@needs_extension
def test_patch_gemm_k_padding_matches_the_fakes_rule():
    """The "cuda" backend pads K = C * PH * PW to 16 bytes of elements (csrc/patchify.h); the fakes
    lay the weight gradient out by the Python mirror of that rule."""
    from vitkern.ops.patch_embed.layout import _cuda_patch_k

    for elem_size in (2, 4):
        for k in range(0, 1300):
            assert ext.load()._padded_patch_k(k, elem_size) == _cuda_patch_k(k, elem_size)
    assert _cuda_patch_k(588, 2) == 592 and _cuda_patch_k(588, 4) == 588 and _cuda_patch_k(768, 2) == 768


@needs_extension
@pytest.mark.parametrize(
    "geometry, out_ld, expected",
    [
        ((2, 3, 224, 224, 14, 14, 2, False), 592, (4, 4)),  # NCHW bf16, 588 -> 592: 28-byte runs as before
        ((2, 3, 224, 224, 14, 14, 2, True), 592, (4, 4)),  # NHWC: 84-byte staged rows
        ((2, 3, 224, 224, 16, 16, 2, False), 776, (16, 16)),  # a padded pitch keeps 16-byte units
        ((2, 3, 224, 224, 16, 16, 2, False), 772, (8, 8)),  # a pitch of 1544 bytes: 8-byte units
    ],
)
def test_patchify_unit_widths_with_padded_rows(geometry, out_ld, expected):
    """With padded patch rows (out_ld > C * PH * PW) a store unit also divides the row pitch."""
    assert ext.load()._patchify_unit_bytes(*geometry, 0, 0, out_ld) == expected


def _lane_use(block: dict, nvec: int, rows: int) -> float:
    """Useful (row, column vector) pairs per launched lane in one pass of the grid over the rows
    (threads are launched in whole warps)."""
    threads = block["bx"] * block["by"]
    lanes = block["gx"] * block["gy"] * -(-threads // 32) * 32
    return nvec * min(rows, block["gy"] * block["by"]) / lanes


def _covered(block: dict, nvec: int, rows: int) -> list[list[int]]:
    """How often the epilogue kernels' loops visit each (row, column vector) under this shape."""
    seen = [[0] * nvec for _ in range(rows)]
    bx, by, gx, gy = block["bx"], block["by"], block["gx"], block["gy"]
    for bi in range(gx):
        for bj in range(gy):
            for t in range(bx * by):
                ty, tx = divmod(t, bx)
                cv = bi * bx + tx
                if cv >= nvec:
                    continue
                for r in range(bj * by + ty, rows, gy * by):
                    seen[r][cv] += 1
    return seen


@needs_extension
@pytest.mark.parametrize("n", [384, 768, 1024, 1152, 1280, 2304, 3072, 4096, 5120])
@pytest.mark.parametrize("elem_size", [2, 4])
def test_epilogue_block_keeps_lanes_busy(n, elem_size):
    """The elementwise passes' block shape leaves at most 10% of the launched lanes idle at ViT
    widths (16-byte vectors: 8 elements of 16 bits, 4 of fp32), at batch 256 x 197 tokens and at
    one image; the fixed 256-wide block left 44% idle at 2304 and 25% at 3072."""
    nvec = n // (16 // elem_size)
    for rows in (256 * 197, 197):
        block = ext.load()._epilogue_block(nvec, rows)
        assert block["bx"] * block["by"] <= 256
        assert _lane_use(block, nvec, rows) >= 0.9, (n, rows, block)


@needs_extension
@pytest.mark.parametrize("nvec, rows", [(1001, 3), (130, 50), (7, 197), (1, 1), (257, 2), (40, 1), (3, 700)])
def test_epilogue_block_covers_every_element_once(nvec, rows):
    """Odd widths (the 1-element path) and few rows: the grid visits each element exactly once,
    also when the row blocks are capped (rows stride over them)."""
    for cap in (65535, 2):
        block = ext.load()._epilogue_block(nvec, rows, cap)
        assert block["gy"] <= cap and block["by"] <= rows
        assert all(v == 1 for row in _covered(block, nvec, rows) for v in row), block


@needs_extension
@pytest.mark.parametrize("rows, cols, elem_size", [(256 * 197, 768, 2), (256 * 197, 1280, 4), (256 * 257, 1280, 2),
                                                   (64 * 197, 384, 4), (394, 384, 2), (3001, 130, 2), (5, 40, 4)])
def test_scale_gradient_partials_stay_small(rows, cols, elem_size):
    """The backward pass with the LayerScale / row-scale partial sums launches at most 1024 blocks,
    so its (gy, N) and (gx, M) fp32 partials stay far below one fp32 pass over the gradient; its
    rows stride over the capped row blocks and still visit every element once."""
    ext_C = ext.load()
    plain = ext_C._dense_bwd_epilogue_block(rows, cols, elem_size, False)
    block = ext_C._dense_bwd_epilogue_block(rows, cols, elem_size, True)
    nvec = cols // block["vector"]
    assert {k: plain[k] for k in ("bx", "by", "gx", "gy")} == ext_C._epilogue_block(nvec, rows)
    assert (block["bx"], block["by"], block["gx"]) == (plain["bx"], plain["by"], plain["gx"])
    assert block["gx"] * block["gy"] <= 1024 and block["gy"] <= plain["gy"]
    partial_bytes = 4 * (block["gy"] * cols + block["gx"] * rows)
    if rows >= 50000:  # training batches: the partials are < 1/16 of one fp32 pass
        assert partial_bytes <= rows * cols * 4 / 16, block
    if rows * nvec <= 200_000:
        assert all(v == 1 for row in _covered(block, nvec, rows) for v in row)


_VIT_B = dict(batch=256, batch_stride=197 * 768, dim=768)


@needs_extension
@pytest.mark.parametrize(
    "args, vector, index_bits",
    [
        (dict(_VIT_B, row0=0, rows=1, src_elem_size=4), 8, 32),  # class token + fp32 pos_embed row
        (dict(_VIT_B, row0=1, rows=196, src_elem_size=4, src_row0=1), 8, 32),  # patch rows + pos (unfused)
        (dict(batch=8, batch_stride=257 * 1280, row0=0, rows=5, dim=1280, out_elem_size=4, src_elem_size=4), 8, 32),
        (dict(batch=3, batch_stride=8 * 100, row0=0, rows=1, dim=100), 8, 32),  # 12 vectors + a 4-element tail
        (dict(batch=2, batch_stride=5 * 99, row0=0, rows=5, dim=99), 1, 32),  # odd rows: scalar
        (dict(batch=2, batch_stride=5 * 98, row0=0, rows=5, dim=98), 2, 32),  # 196-byte rows: 4-byte units
        (dict(_VIT_B, row0=0, rows=1, out_addr=4), 2, 32),  # a 4-byte-aligned output
        (dict(_VIT_B, row0=0, rows=1, src_elem_size=2, src_addr=2), 1, 32),  # a misaligned source
        (dict(batch=2**22, batch_stride=1024 * 8, row0=0, rows=1024, dim=8), 8, 64),  # 2^32 token rows
    ],
)
def test_token_rows_plan(args, vector, index_bits):
    """The token-row pass moves 16-byte vectors where every row start is aligned (a scalar tail
    for the rest of a row), narrower units otherwise, and 32-bit row / column indices where the
    sizes allow."""
    plan = ext.load()._token_rows_plan(**args)
    assert (plan["vector"], plan["index_bits"]) == (vector, index_bits), plan
    slots = -(-args["dim"] // plan["vector"])
    tasks = args["batch"] * args["rows"]
    assert plan["bx"] * plan["by"] <= 256 and plan["gx"] * plan["bx"] >= slots
    if tasks * slots <= 200_000:
        assert all(v == 1 for row in _covered(plan, slots, tasks) for v in row)


# ================================================================================ GPU numerics


def _compare(fn_cuda, fn_ref, inputs: dict, dtype, *, grads=True):
    """Run fn on the cuda backend, the reference in ``dtype`` and the reference in fp64; compare the
    output and the gradients of every input that requires grad."""
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad] if grads else []

    def leaves(cast=None):
        out = {}
        for k, v in inputs.items():
            if v is None:
                out[k] = None
                continue
            t = v.detach() if cast is None else v.detach().to(cast)  # .to keeps channels_last
            out[k] = t.requires_grad_(v.requires_grad)
        return out

    results = []
    for fn, cast in ((fn_cuda, None), (fn_ref, None), (fn_ref, F64)):
        ins = leaves(cast)
        y = fn(**ins)
        g = None
        if names:
            if results:
                upstream = results[0][2]
                upstream = upstream.to(y.dtype)
            else:
                upstream = torch.randn_like(y)
            gs = torch.autograd.grad(y, [ins[k] for k in names], upstream)
            g = dict(zip(names, gs))
            results.append((y, g, upstream))
        else:
            results.append((y, None, None))
    (y, g, _), (yt, gt, _), (y64, g64, _) = results
    assert_2x_torch("output", y, y64, yt, dtype)
    for k in names:
        assert_2x_torch(f"grad {k}", g[k], g64[k], gt[k], dtype)


def _dense_inputs(m_lead, k, n, dtype, device, *, bias=True, residual=None, scale=False, row_scale=False, seed=0):
    g = torch.Generator().manual_seed(seed + k + n)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(True)

    ins = dict(x=rnd(*m_lead, k), weight=rnd(n, k, std=k ** -0.5), bias=rnd(n, std=0.5) if bias else None)
    ins.update(residual=None, residual_scale=None, row_scale=None)
    if residual is not None:
        ins["residual"] = rnd(*m_lead, n, dt=residual)
        if scale:
            ins["residual_scale"] = rnd(n, std=0.5)
        if row_scale:
            rows = 1
            for s in m_lead:
                rows *= s
            keep = (torch.rand(rows, generator=g) < 0.7).float().div(0.7)
            ins["row_scale"] = keep.to(device).requires_grad_(True)
    return ins


RESIDUAL_MODES = {
    "none": dict(),
    "plain": dict(residual="same"),  # through cuBLASLt's C matrix
    "fp32": dict(residual=F32),
    "scaled": dict(residual="same", scale=True, row_scale=True),
}

DENSE_SHAPES = [((2, 197), 192, 384), ((1, 50), 100, 130), ((3, 1), 24, 40)]


def _mode_kwargs(mode, dtype):
    kw = dict(RESIDUAL_MODES[mode])
    if kw.get("residual") == "same":
        kw["residual"] = dtype
    return kw


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("mode", list(RESIDUAL_MODES))
@pytest.mark.parametrize("unfused", [False, True])
def test_linear_matches_reference(device, dtype, activation, mode, unfused):
    for lead, k, n in DENSE_SHAPES:
        ins = _dense_inputs(lead, k, n, dtype, device, **_mode_kwargs(mode, dtype))

        def run(**a):
            with vitkern.use_backend("cuda"):
                return vitkern.linear(**a, activation=activation)

        def ref(**a):
            return linear_ref(**a, activation=activation)

        if unfused:
            with cb.force_unfused_epilogues():
                _compare(run, ref, ins, dtype)
        else:
            _compare(run, ref, ins, dtype)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("n", [384, 130])
def test_scale_gradients_over_many_row_steps(device, dtype, n):
    """LayerScale and row-scale gradients at 9003 rows, where each block of the backward pass
    strides over several row steps (the partial sums' blocks are capped), at a 16-byte (384) and
    a 1-element (130) width, with an fp32 residual stream; twice, bitwise equal."""
    ins = _dense_inputs((3, 3001), 64, n, dtype, device, residual=F32, scale=True, row_scale=True)

    def run(**a):
        with vitkern.use_backend("cuda"):
            return vitkern.linear(**a, activation="gelu")

    def ref(**a):
        return linear_ref(**a, activation="gelu")

    _compare(run, ref, ins, dtype)
    leaves = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in ins.items()}
    grads = []
    for _ in range(2):
        y = run(**leaves)
        grads.append(torch.autograd.grad(y, [leaves["residual_scale"], leaves["row_scale"]], torch.ones_like(y)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_extension
def test_linear_gelu_is_erf_not_tanh(device):
    # fp32: the erf / tanh GELUs differ by up to ~2e-4, far above fp32 error.
    x = torch.linspace(-4, 4, 4096, device=device).reshape(64, 64)
    w = torch.eye(64, device=device)
    with vitkern.use_backend("cuda"):
        y = vitkern.linear(x, w, activation="gelu")
        yt = vitkern.linear(x, w, activation="gelu_tanh")
    torch.testing.assert_close(y, torch.nn.functional.gelu(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(yt, torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_extension
def test_linear_uses_fused_epilogues(device):
    """On a current GPU the common bf16 shapes run fused (no unfused fallback)."""
    before = cb.cublaslt_stats()
    ins = _dense_inputs((4, 197), 768, 3072, BF16, device)
    with vitkern.use_backend("cuda"):
        y = vitkern.linear(ins["x"], ins["weight"], ins["bias"], activation="gelu_tanh")
        y.sum().backward()
        r = torch.randn(4, 197, 768, device=device, dtype=BF16)
        vitkern.linear(y.detach(), ins["weight"].detach().t().contiguous(), None, residual=r)
    after = cb.cublaslt_stats()
    assert after["unfused_fallbacks"] == before["unfused_fallbacks"], (after, cb.cublaslt_fallbacks())
    assert after["fused_matmuls"] >= before["fused_matmuls"] + 3, after  # GELU_AUX_BIAS, BGRADB, C matrix


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("mode", ["none", "fp32", "scaled"])
@pytest.mark.parametrize("unfused", [False, True])
def test_mlp_matches_reference(device, dtype, activation, mode, unfused):
    for lead, k, hidden in [((2, 197), 192, 768), ((1, 50), 100, 260)]:
        g = torch.Generator().manual_seed(hidden)

        def rnd(*shape, std=1.0, dt=dtype):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(True)

        n = k
        ins = dict(x=rnd(*lead, k), fc1_weight=rnd(hidden, k, std=k ** -0.5), fc1_bias=rnd(hidden, std=0.5),
                   fc2_weight=rnd(n, hidden, std=hidden ** -0.5), fc2_bias=rnd(n, std=0.5),
                   residual=None, residual_scale=None, row_scale=None)
        if mode != "none":
            ins["residual"] = rnd(*lead, n, dt=F32 if mode == "fp32" else dtype)
        if mode == "scaled":
            ins["residual_scale"] = rnd(n, std=0.5)
            ins["row_scale"] = (torch.rand(lead[0] * lead[1], generator=g) < 0.7).float().div(0.7).to(device)
            ins["row_scale"].requires_grad_(True)

        def run(**a):
            with vitkern.use_backend("cuda"):
                return vitkern.mlp(**a, activation=activation)

        def ref(**a):
            return mlp_ref(**a, activation=activation)

        if unfused:
            with cb.force_unfused_epilogues():
                _compare(run, ref, ins, dtype)
        else:
            _compare(run, ref, ins, dtype)


PATCH_CASES = [
    # (B, C, H, W, D, Ph, Pw)
    (2, 3, 224, 160, 192, 16, 16),
    (3, 3, 56, 42, 96, 14, 14),
    (2, 3, 32, 48, 64, 16, 8),  # rectangular patches
    (1, 1, 32, 32, 40, 8, 8),
]


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pos", [None, "patch", "all"])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_patch_embed_matches_reference(device, dtype, channels_last, pos, prefix):
    for b, c, h, w, d, ph, pw in PATCH_CASES:
        n = (h // ph) * (w // pw)
        g = torch.Generator().manual_seed(d + prefix)

        def rnd(*shape, std=1.0, dt=dtype):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

        images = rnd(b, c, h, w)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ins = dict(
            images=images.requires_grad_(True),
            weight=rnd(d, c, ph, pw, std=(c * ph * pw) ** -0.5).requires_grad_(True),
            bias=rnd(d, std=0.5).requires_grad_(True),
            pos_embed=(None if pos is None
                       else rnd(1, n + (prefix if pos == "all" else 0), d, dt=F32).requires_grad_(True)),
            prefix_tokens=rnd(1, prefix, d, dt=F32).requires_grad_(True) if prefix else None,
        )

        def run(**a):
            with vitkern.use_backend("cuda"):
                return vitkern.patch_embed(**a)

        _compare(run, patch_embed_ref, ins, dtype)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_patch_embed_unfused_and_same_dtype_pos(device, dtype):
    b, c, h, w, d, p = 2, 3, 64, 48, 96, 16
    n = (h // p) * (w // p)
    ins = dict(
        images=torch.randn(b, c, h, w, device=device, dtype=dtype).requires_grad_(True),
        weight=(torch.randn(d, c, p, p, device=device, dtype=dtype) * 0.05).requires_grad_(True),
        bias=torch.randn(d, device=device, dtype=dtype).requires_grad_(True),
        pos_embed=torch.randn(1, n + 1, d, device=device, dtype=dtype).requires_grad_(True),
        prefix_tokens=torch.randn(1, 1, d, device=device, dtype=dtype).requires_grad_(True),
    )

    def run(**a):
        with vitkern.use_backend("cuda"):
            return vitkern.patch_embed(**a)

    _compare(run, patch_embed_ref, ins, dtype)
    with cb.force_unfused_epilogues():
        _compare(run, patch_embed_ref, ins, dtype)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("d", [100, 57])
def test_patch_embed_token_rows_at_odd_widths(device, dtype, d):
    """The token-row pass at widths that are not a multiple of 8 (100: 16-byte vectors and a
    4-element tail for the prefix rows; 57: scalar), for the prefix rows and, unfused, the patch
    rows' bias + position embedding."""
    b, c, h, w, p = 3, 3, 32, 48, 16
    n = (h // p) * (w // p)
    g = torch.Generator().manual_seed(d)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(True)

    def run(**a):
        with vitkern.use_backend("cuda"):
            return vitkern.patch_embed(**a)

    for prefix in (1, 5):
        ins = dict(images=rnd(b, c, h, w), weight=rnd(d, c, p, p, std=(c * p * p) ** -0.5), bias=rnd(d, std=0.5),
                   pos_embed=rnd(1, prefix + n, d, dt=F32), prefix_tokens=rnd(1, prefix, d, dt=F32))
        _compare(run, patch_embed_ref, ins, dtype)
        with cb.force_unfused_epilogues():
            _compare(run, patch_embed_ref, ins, dtype)


@pytest.mark.gpu
@needs_extension
def test_empty_and_degenerate_shapes(device):
    with vitkern.use_backend("cuda"):
        x = torch.randn(0, 16, device=device, requires_grad=True)
        w = torch.randn(8, 16, device=device, requires_grad=True)
        b = torch.randn(8, device=device, requires_grad=True)
        y = vitkern.linear(x, w, b, activation="gelu")
        assert y.shape == (0, 8)
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
        # K = 0: the output is act(bias)
        x0 = torch.randn(3, 0, device=device)
        w0 = torch.randn(8, 0, device=device)
        torch.testing.assert_close(vitkern.linear(x0, w0, b.detach(), activation="gelu"),
                                   torch.nn.functional.gelu(b.detach()).expand(3, 8))
        tokens = vitkern.patch_embed(torch.randn(0, 3, 32, 32, device=device), torch.randn(8, 3, 16, 16, device=device))
        assert tokens.shape == (0, 4, 8)


@pytest.mark.gpu
@needs_extension
def test_expanded_gradient_and_side_stream(device):
    ins = _dense_inputs((4, 50), 64, 96, BF16, device, residual=BF16, scale=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), vitkern.use_backend("cuda"):
        y = vitkern.linear(ins["x"], ins["weight"], ins["bias"], activation="gelu", residual=ins["residual"],
                           residual_scale=ins["residual_scale"])
        y.sum().backward()  # the upstream gradient is an expanded (stride 0) tensor
    stream.synchronize()
    x = ins["x"].detach().double().requires_grad_(True)
    ref = linear_ref(x, ins["weight"].detach().double(), ins["bias"].detach().double(), activation="gelu",
                     residual=ins["residual"].detach().double(), residual_scale=ins["residual_scale"].detach().double())
    ref.sum().backward()
    torch.testing.assert_close(ins["x"].grad.double(), x.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@needs_extension
def test_op_errors_on_gpu(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="fused_dense_fwd: weight must have shape \\(N, 8\\)"):
        torch.ops.vitkern_cuda.fused_dense_fwd(x, torch.randn(5, 7, device=device), None, 0, None, None, None,
                                               False, False)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        torch.ops.vitkern_cuda.fused_dense_fwd(x, torch.randn(5, 8, device=device, dtype=BF16), None, 0, None, None,
                                               None, False, False)
    out, pre = torch.ops.vitkern_cuda.fused_dense_fwd(x, torch.randn(5, 8, device=device), None, 1, None, None, None,
                                                      False, False)
    with pytest.raises(RuntimeError, match="call the forward with save_pre=True"):
        torch.ops.vitkern_cuda.fused_dense_bwd(out, x, torch.randn(5, 8, device=device), None, None, pre, 1, True,
                                               False, False, False, False, False)
    with pytest.raises(RuntimeError, match="pos_embed has length"):
        torch.ops.vitkern_cuda.patch_embed_fwd(torch.randn(1, 3, 32, 32, device=device),
                                               torch.randn(8, 3, 16, 16, device=device), None,
                                               torch.randn(1, 7, 8, device=device), None, False)


@pytest.mark.gpu
@needs_extension
def test_opcheck(device):
    ops = torch.ops.vitkern_cuda
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=BF16, grad=True):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(grad)

    x, w, b = rnd(50, 64), rnd(72, 64), rnd(72)
    r, gm, rs = rnd(50, 72, dt=F32), rnd(72), rnd(50, dt=F32)
    for act in (0, 1, 2):
        torch.library.opcheck(ops.fused_dense_fwd.default, (x, w, b, act, None, None, None, True, False))
        torch.library.opcheck(ops.fused_dense_fwd.default, (x, w, b, act, r, gm, rs, True, False))
    _, pre = ops.fused_dense_fwd(x.detach(), w.detach(), b.detach(), 1, None, None, None, True, False)
    grad = rnd(50, 72, grad=False)
    torch.library.opcheck(ops.fused_dense_bwd.default,
                          (grad, x.detach(), w.detach(), None, None, pre, 1, True, True, True, False, False, False))
    w1, b1, w2, b2 = rnd(96, 64), rnd(96), rnd(72, 96), rnd(72)
    for act in (1, 2):
        torch.library.opcheck(ops.mlp_fwd.default, (x, w1, b1, w2, b2, act, r, gm, rs, True, True, False))
    images = rnd(2, 3, 32, 48).detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    pw, pb = rnd(64, 3, 16, 16), rnd(64)
    pos, cls = rnd(1, 7, 64, dt=F32), rnd(1, 1, 64, dt=F32)
    torch.library.opcheck(ops.patch_embed_fwd.default, (images, pw, pb, pos, cls, False))
    torch.library.opcheck(ops.patch_embed_fwd.default, (images.detach().contiguous(), pw, None, None, None, False))
    tok_grad = rnd(2, 7, 64, dt=F32, grad=False)
    torch.library.opcheck(ops.patch_embed_bwd.default,
                          (tok_grad, images.detach(), pw.detach(), 1, True, True, True, False))
    # 14 x 14 x 3 patches: K = 588 padded to 592, the weight gradient a view with row stride 592
    images14, pw14 = rnd(2, 3, 28, 42, grad=False), rnd(64, 3, 14, 14, grad=False)
    torch.library.opcheck(ops.patch_embed_bwd.default,
                          (rnd(2, 7, 64, grad=False), images14, pw14, 1, True, True, True, False))
    torch.library.opcheck(ops.patch_embed_fwd.default, (images14, pw14, None, None, None, False))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile(device, compile_backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, std=1.0, dt=BF16):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(True)

    images = rnd(2, 3, 64, 48)
    params = dict(pw=rnd(96, 3, 16, 16, std=0.05), pb=rnd(96), pos=rnd(1, 13, 96, dt=F32), cls=rnd(1, 1, 96, dt=F32),
                  w1=rnd(384, 96, std=0.1), b1=rnd(384), w2=rnd(96, 384, std=0.05), b2=rnd(96), wq=rnd(96, 96, std=0.1),
                  gamma=rnd(96, std=0.1))

    def stem_block(images, p):
        t = vitkern.patch_embed(images, p["pw"], p["pb"], pos_embed=p["pos"], prefix_tokens=p["cls"])
        t = vitkern.linear(t.to(BF16), p["wq"], None, residual=t, residual_scale=p["gamma"])
        return vitkern.mlp(t.to(BF16), p["w1"], p["b1"], p["w2"], p["b2"], activation="gelu", residual=t)

    vitkern.use_backend("cuda")
    eager = stem_block(images, params)
    eager_grads = torch.autograd.grad(eager.square().sum(), [images, *params.values()])
    compiled = torch.compile(stem_block, backend=compile_backend, fullgraph=True)
    out = compiled(images, params)
    grads = torch.autograd.grad(out.square().sum(), [images, *params.values()])
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)
