"""The optional CUDA extension vitkern._C: loading, op registration, fake/autograd, patchify.

(The cuBLASLt ops of the "cuda" backend are tested in tests/ops/test_cuda_backend.py.)

Without the extension built, the tests that need it skip with the reason from
``extension_error()``. Loading needs no GPU, so registration, build_info and the fake (meta)
implementation are checked on any machine; numerics run only on a CUDA device (``gpu`` marker).
"""

import pytest
import torch
import torch.nn.functional as F

from vitkern import _extension as ext

needs_extension = pytest.mark.skipif(
    not ext.cuda_extension_available(), reason=f"CUDA extension unavailable: {ext.extension_error()}"
)


def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _patchify_unfold(images: torch.Tensor, P: int) -> torch.Tensor:
    """Independent formulation of patchify through F.unfold (columns ordered c, py, px)."""
    B, C, H, W = images.shape
    cols = F.unfold(images, kernel_size=P, stride=P)  # (B, C*P*P, N)
    return cols.transpose(1, 2).reshape(B * (H // P) * (W // P), C * P * P)


# --------------------------------------------------------------- reference and public wrapper


@pytest.mark.parametrize("B, C, H, W, P", [(2, 3, 28, 42, 14), (1, 1, 32, 16, 16), (3, 3, 16, 24, 8)])
def test_patchify_ref_matches_unfold(B, C, H, W, P):
    images = torch.randn(B, C, H, W, dtype=torch.float64)
    out = ext.patchify_ref(images, P)
    assert out.shape == (B * (H // P) * (W // P), C * P * P)
    torch.testing.assert_close(out, _patchify_unfold(images, P), rtol=0, atol=0)
    # element (b, ph, pw) x (c, py, px) is images[b, c, ph*P + py, pw*P + px]
    b, ph, pw = B - 1, H // P - 1, min(1, W // P - 1)
    row = (b * (H // P) + ph) * (W // P) + pw
    c, py, px = C - 1, P - 1, 1
    assert out[row, (c * P + py) * P + px] == images[b, c, ph * P + py, pw * P + px]


def test_patchify_ref_roundtrip_and_gradient():
    images = torch.randn(2, 3, 28, 14, dtype=torch.float64, requires_grad=True)
    out = ext.patchify_ref(images, 14)
    torch.testing.assert_close(ext._unpatchify_ref(out, tuple(images.shape), 14), images, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(images.grad, ext._unpatchify_ref(grad, tuple(images.shape), 14), rtol=0, atol=0)


def test_patchify_ref_rejects_bad_input():
    with pytest.raises(RuntimeError, match="multiples of patch_size=16, got H=30, W=32"):
        ext.patchify_ref(torch.zeros(1, 3, 30, 32), 16)
    with pytest.raises(RuntimeError, match="4-D"):
        ext.patchify_ref(torch.zeros(3, 32, 32), 16)
    with pytest.raises(RuntimeError, match="patch_size must be > 0"):
        ext.patchify_ref(torch.zeros(1, 3, 32, 32), 0)


def test_public_patchify_rejects_cpu_tensors():
    with pytest.raises(RuntimeError, match="must be a CUDA tensor.*got device cpu"):
        ext.patchify(torch.zeros(1, 3, 32, 32), 16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ext.patchify([[1.0]], 16)


def test_missing_extension_is_reported(monkeypatch):
    monkeypatch.setattr(ext, "_loaded", True)
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_error", "vitkern._C is not built (test)")
    assert ext.cuda_extension_available() is False
    assert ext.extension_error() == "vitkern._C is not built (test)"
    assert ext.build_info() is None
    with pytest.raises(RuntimeError, match="extension is not available: vitkern._C is not built"):
        ext.patchify(torch.zeros(1, 3, 32, 32, device="meta"), 16)


def test_availability_and_error_agree():
    if ext.cuda_extension_available():
        assert ext.extension_error() is None
    else:
        assert isinstance(ext.extension_error(), str) and ext.extension_error()


def test_package_exports_availability():
    import vitkern

    assert vitkern.cuda_extension_available() is ext.cuda_extension_available()


# ----------------------------------------------------------------- loaded extension, no GPU


@needs_extension
def test_op_is_registered():
    assert hasattr(torch.ops.vitkern_cuda, "patchify")
    schema = str(torch.ops.vitkern_cuda.patchify.default._schema)
    assert schema == "vitkern_cuda::patchify(Tensor images, int patch_size) -> Tensor"
    assert ext.load() is ext.load()  # loaded once


_TRACE_IN_FRESH_PROCESS = r"""
import importlib, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
how = sys.argv[1]
if how == "import-C":            # the built module imported directly, never through load()
    importlib.import_module("vitkern._C")
    assert "vitkern._extension" in sys.modules
else:                            # the package only: the ops are declared whether or not _C exists
    import vitkern  # noqa: F401
# Fake tensors: "cuda" here allocates nothing and needs no GPU (CPU-only machines run this).
with FakeTensorMode(allow_non_fake_inputs=True):
    x = torch.empty(6, 8, device="cuda")
    w = torch.empty(16, 8, device="cuda")
    out, pre = torch.ops.vitkern_cuda.fused_dense_fwd(x, w, None, 1, None, None, None, True, False)
    tokens = torch.ops.vitkern_cuda.patch_embed_fwd(
        torch.empty(2, 3, 32, 32, device="cuda"), torch.empty(8, 3, 16, 16, device="cuda"), None, None,
        torch.empty(1, 1, 8, device="cuda"), False)
print(tuple(out.shape), tuple(pre.shape), tuple(tokens.shape))
"""


def _trace_in_fresh_process(how: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRACE_IN_FRESH_PROCESS, how], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_ops_are_traceable_without_loading_the_extension():
    """Schemas and fakes are declared at import, not inside load(): FakeTensor tracing works in a
    process that never loaded (or cannot load) vitkern._C."""
    assert _trace_in_fresh_process("package") == "(6, 16) (6, 16) (2, 5, 8)"


@needs_extension
def test_ops_are_traceable_when_vitkern_C_is_imported_directly():
    assert _trace_in_fresh_process("import-C") == "(6, 16) (6, 16) (2, 5, 8)"


def test_every_fake_has_a_schema():
    assert set(ext._FAKES) == {f"vitkern_cuda::{name}" for name in ext._SCHEMAS}
    for name, schema in ext._SCHEMAS.items():
        assert schema.startswith(name + "(")
        assert str(getattr(torch.ops.vitkern_cuda, name).default._schema) == f"vitkern_cuda::{schema}"


@needs_extension
def test_build_info():
    info = ext.build_info()
    assert info["build_system"] == "setuptools"
    assert info["archs"], info
    # every requested arch was compiled: "9.0a" -> 900
    expected = sorted({int(a.split("+")[0].rstrip("af").replace(".", "")) * 10 for a in info["archs"]})
    assert sorted(info["cuda_arch_list"]) == expected
    assert info["cublaslt_linked"] is True
    assert info["cublaslt_version"] > 0
    assert info["cublas_version"].count(".") == 2
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert "patchify" in info["ops"]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, H, W, P",
                         [(3, 3, 224, 160, 16), (1, 1, 28, 42, 14), (2, 3, 64, 32, 32), (1, 3, 8, 16, 8)])
def test_fake_impl_on_meta(dtype, B, C, H, W, P):
    images = torch.empty(B, C, H, W, dtype=dtype, device="meta")
    out = torch.ops.vitkern_cuda.patchify(images, P)
    assert out.shape == (B * (H // P) * (W // P), C * P * P)
    assert out.dtype == dtype and out.device.type == "meta"
    assert ext.patchify(images, P).shape == out.shape  # the public wrapper passes meta through


@needs_extension
def test_fake_impl_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        images = torch.empty(2, 3, 28, 42, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.vitkern_cuda.patchify(images, 14)
        assert out.shape == (2 * 2 * 3, 3 * 14 * 14)
        assert out.dtype == torch.bfloat16 and out.device.type == "cuda"


@needs_extension
@pytest.mark.parametrize(
    "shape, dtype, P, match",
    [
        ((1, 3, 30, 32), torch.float32, 16, "multiples of patch_size=16, got H=30, W=32"),
        ((1, 3, 32, 30), torch.float32, 16, "multiples of patch_size=16"),
        ((3, 32, 32), torch.float32, 16, "4-D"),
        ((1, 1, 3, 32, 32), torch.float32, 16, "4-D"),
        ((1, 3, 32, 32), torch.int32, 16, "float32, float16 or bfloat16"),
        ((1, 3, 32, 32), torch.float64, 16, "float32, float16 or bfloat16"),
        ((1, 3, 32, 32), torch.float32, 0, "patch_size must be > 0"),
    ],
)
def test_fake_impl_rejects_bad_input(shape, dtype, P, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vitkern_cuda.patchify(torch.empty(shape, dtype=dtype, device="meta"), P)


@needs_extension
def test_fake_impl_accepts_channels_last_and_rejects_other_layouts():
    images = torch.empty(1, 32, 32, 3, device="meta").permute(0, 3, 1, 2)  # channels_last
    assert torch.ops.vitkern_cuda.patchify(images, 16).shape == (4, 3 * 16 * 16)
    strided = torch.empty(1, 3, 32, 64, device="meta")[..., ::2]
    with pytest.raises(RuntimeError, match="contiguous \\(NCHW\\) or channels_last"):
        torch.ops.vitkern_cuda.patchify(strided, 16)


@needs_extension
def test_autograd_is_registered():
    images = torch.empty(2, 3, 32, 16, device="meta", requires_grad=True)
    out = torch.ops.vitkern_cuda.patchify(images, 16)
    assert out.requires_grad
    out.sum().backward()
    assert images.grad is not None and images.grad.shape == images.shape


# --------------------------------------------------------------------------- GPU numerics

PATCHIFY_CASES = [
    # (B, C, H, W, P): H != W throughout
    (3, 3, 224, 160, 16),  # 16-byte vectors for every dtype
    (1, 3, 42, 56, 14),  # P*2 = 28 bytes: 4-byte units (16-bit), 8-byte (fp32)
    (3, 1, 64, 96, 32),
    (1, 3, 16, 40, 8),
    (3, 3, 21, 35, 7),  # odd P: scalar units for 16-bit dtypes
]


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, H, W, P", PATCHIFY_CASES)
def test_patchify_matches_reference(dtype, B, C, H, W, P):
    _needs_cuda()
    images = torch.randn(B, C, H, W, device="cuda").to(dtype)
    out = ext.patchify(images, P)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ext.patchify_ref(images, P).contiguous(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, C, H, W, P", PATCHIFY_CASES)
def test_patchify_channels_last_matches_reference(dtype, B, C, H, W, P):
    _needs_cuda()
    images = torch.randn(B, C, H, W, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    assert not images.is_contiguous() or C == 1
    out = ext.patchify(images, P)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ext.patchify_ref(images, P).contiguous(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
def test_patchify_channels_last_large_patch_uses_the_gather_kernel():
    _needs_cuda()
    # 64 channels x 32 x 32 fp32 = 256 KB per patch: beyond the 48 KB shared-memory stage.
    images = torch.randn(2, 64, 64, 32, device="cuda").to(memory_format=torch.channels_last)
    info = ext.load()._patchify_unit_bytes(2, 64, 64, 32, 32, 32, 4, True, images.data_ptr(), 0)
    assert info == (4, 4)
    torch.testing.assert_close(ext.patchify(images, 32), ext.patchify_ref(images, 32).contiguous(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("P", [16, 14, 32, 8])
@pytest.mark.parametrize("C", [1, 3])
def test_patchify_channels_and_patch_sizes(P, C):
    _needs_cuda()
    images = torch.randn(2, C, 2 * P, 5 * P, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(ext.patchify(images, P), ext.patchify_ref(images, P).contiguous(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("offset", [1, 3, 4])
def test_patchify_misaligned_input_uses_narrower_units(offset):
    _needs_cuda()
    B, C, H, W, P = 2, 3, 32, 48, 16
    storage = torch.randn(offset + B * C * H * W, device="cuda", dtype=torch.float16)
    images = storage[offset:].view(B, C, H, W)  # contiguous, but not 16-byte aligned
    assert images.is_contiguous() and images.data_ptr() % 16 != 0
    torch.testing.assert_close(ext.patchify(images, P), ext.patchify_ref(images, P).contiguous(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
def test_patchify_empty_batch_and_side_stream():
    _needs_cuda()
    empty = ext.patchify(torch.empty(0, 3, 32, 32, device="cuda"), 16)
    assert empty.shape == (0, 3 * 16 * 16)
    images = torch.randn(4, 3, 64, 32, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ext.patchify(images, 16)
    stream.synchronize()
    torch.testing.assert_close(out, ext.patchify_ref(images, 16).contiguous(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_extension
def test_patchify_errors_on_gpu():
    _needs_cuda()
    with pytest.raises(RuntimeError, match="multiples of patch_size=16, got H=30, W=32"):
        ext.patchify(torch.zeros(1, 3, 30, 32, device="cuda"), 16)
    with pytest.raises(RuntimeError, match="4-D"):
        ext.patchify(torch.zeros(3, 32, 32, device="cuda"), 16)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ext.patchify(torch.zeros(1, 3, 32, 32, device="cuda", dtype=torch.float64), 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.patchify(torch.zeros(1, 3, 32, 64, device="cuda")[..., ::2], 16)
    with pytest.raises(RuntimeError, match="patch_size must be > 0"):
        ext.patchify(torch.zeros(1, 3, 32, 32, device="cuda"), -16)


@pytest.mark.gpu
@needs_extension
def test_patchify_gradient_and_opcheck():
    _needs_cuda()
    images = torch.randn(2, 3, 32, 48, device="cuda", requires_grad=True)
    out = ext.patchify(images, 16)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = torch.autograd.grad(ext.patchify_ref(images, 16), images, grad)[0]
    torch.testing.assert_close(images.grad, expected, rtol=0, atol=0)
    for dtype in (torch.float32, torch.bfloat16):
        sample = torch.randn(2, 3, 28, 42, device="cuda", dtype=dtype, requires_grad=dtype == torch.float32)
        torch.library.opcheck(torch.ops.vitkern_cuda.patchify.default, (sample, 14))
