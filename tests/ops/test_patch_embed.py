"""The Triton patch-embedding backend (``vitkern.ops.patch_embed``).

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``). Results are compared with the timm-style reference (``patch_embed_ref``:
conv2d + flatten + transpose, prefix tokens concatenated, pos_embed added) in float64: the
kernel's error must stay within twice the reference's own error in the same dtype, plus a small
atol (the flash-attention rule), for the tokens and every gradient (images, weight, bias,
pos_embed, prefix tokens). Kernel outputs are allocated NaN-filled, so an element a kernel fails to
write shows up.

The default run covers P in {8, 14, 16, 32}, C in {1, 3, 4}, D in {64, 192, 768}, non-square
images, fp32 / fp16 / bf16, contiguous, channels-last and strided images with contiguous or
channels-last weights, both pos_embed forms, with and without prefix tokens and bias, each at least
once; every GEMM config of the core through the patch-embedding hooks, the sm_80 launch path, the
split column sums; opcheck, torch.compile and the errors. The full cross product is marked
``slow``. The static sm_80 / sm_90 compile of the kernels (no spills; wgmma on sm_90, mma.sync on
sm_80 for 16-bit operands) is checked here too: the default compile cases, and every selectable
config under ``slow``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import vitkern
from vitkern.ops import gemm as _gemm
from vitkern.ops.patch_embed import launch as pe_launch
from vitkern.ops.patch_embed import patch_embed_ref
from vitkern.testing.numerics import assert_2x_torch, poisoned, poisoned_like

from _compile_rows import check_gemm_rows

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    """Run the Triton backend, with every kernel output allocated full of NaN."""
    vitkern.use_backend("triton")  # conftest restores the previous choice
    monkeypatch.setattr(pe_launch, "_empty", poisoned)
    monkeypatch.setattr(pe_launch, "_empty_like", poisoned_like)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _inputs(device, b, c, h, w, p, d, dtype, *, layout="nchw", weight_cl=False, n_prefix=1, pos="full",
            bias=True, add_dtype=None):
    """Random inputs scaled like a ViT's: unit pixels, fan-in-scaled weights, 0.02-scale tokens."""
    images = torch.randn(b, c, h, w, device=device).to(dtype)
    if layout == "channels_last":
        images = images.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider image: no unit stride anywhere
        images = torch.randn(b, c, h, 2 * w, device=device).to(dtype)[..., ::2]
    weight = (torch.randn(d, c, p, p, device=device) * (c * p * p) ** -0.5).to(dtype)
    if weight_cl:
        weight = weight.to(memory_format=torch.channels_last)
    bias_t = (torch.randn(d, device=device) * 0.5).to(dtype) if bias else None
    n = (h // p) * (w // p)
    add_dtype = add_dtype or dtype
    prefix = (torch.randn(1, n_prefix, d, device=device) * 0.02).to(add_dtype) if n_prefix else None
    length = {"full": n_prefix + n, "patch": n, None: 0}[pos]
    pos_t = (torch.randn(1, length, d, device=device) * 0.02).to(add_dtype) if pos else None
    return images, weight, bias_t, pos_t, prefix


def _leaves(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        else:
            t = t.detach().clone() if dtype is None else t.detach().to(dtype)
            out.append(t.requires_grad_(True))
    return out


def _call(fn, images, weight, bias, pos, prefix):
    return fn(images, weight, bias, pos_embed=pos, prefix_tokens=prefix)


def _check(images, weight, bias=None, pos=None, prefix=None, *, grads=True, dy=None, need=None):
    """vitkern.patch_embed (Triton) tokens and gradients against fp64 and the same-dtype reference.

    ``need``: which of (images, weight, bias, pos, prefix) require grad (default: all present).
    """
    dtype = images.dtype
    tensors = [images, weight, bias, pos, prefix]
    need = need or [t is not None for t in tensors]
    inputs = [t.detach().requires_grad_(bool(n)) if t is not None else None for t, n in zip(tensors, need)]
    y = _call(vitkern.patch_embed, *inputs)
    ref_in = [t.detach().to(F64).requires_grad_(bool(n)) if t is not None else None for t, n in zip(tensors, need)]
    ref = _call(patch_embed_ref, *ref_in)
    same_in = [t.detach().requires_grad_(bool(n)) if t is not None else None for t, n in zip(tensors, need)]
    same = _call(patch_embed_ref, *same_in)
    assert y.dtype == same.dtype
    assert_2x_torch("tokens", y.detach(), ref.detach(), same.detach(), dtype, op="patch_embed", finite=False)
    assert y.is_contiguous()
    if not grads:
        return
    dy = torch.randn(y.shape, device=y.device).to(y.dtype) if dy is None else dy
    names = ("dimages", "dweight", "dbias", "dpos_embed", "dprefix")
    sel = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, [inputs[i] for i in sel], dy)
    want = torch.autograd.grad(ref, [ref_in[i] for i in sel], dy.double())
    same_g = torch.autograd.grad(same, [same_in[i] for i in sel], dy)
    for i, g, r, s in zip(sel, got, want, same_g):
        assert g.dtype == tensors[i].dtype, (names[i], g.dtype, tensors[i].dtype)
        assert_2x_torch(names[i], g, r, s, dtype, op="patch_embed", finite=False)
    if need[0]:
        g = got[sel.index(0)]
        assert g.stride() == torch.empty_like(inputs[0]).stride(), "the image gradient keeps the images' layout"


# --------------------------------------------------------------------------------------------
# forward and gradients: each patch size, channel count, width, dtype, layout and option
# --------------------------------------------------------------------------------------------

CASES = [
    # (B, C, H, W, P, D, dtype, layout, weight_cl, n_prefix, pos, bias, add_dtype)
    (2, 3, 32, 48, 16, 192, BF16, "nchw", False, 1, "full", True, None),  # timm ViT: cls + pos
    (2, 3, 28, 42, 14, 64, F32, "channels_last", False, 5, "full", True, None),  # cls + 4 registers
    (2, 1, 24, 40, 8, 64, F16, "nchw", False, 0, "patch", False, None),
    (1, 4, 64, 32, 32, 64, BF16, "channels_last", True, 5, "patch", True, None),  # no_embed_class
    (1, 4, 14, 28, 14, 768, BF16, "nchw", False, 1, "full", True, F32),  # fp32 pos / cls: fp32 tokens
    (2, 3, 16, 32, 16, 768, F32, "strided", False, 1, None, True, None),  # no unit stride in the images
    (2, 3, 16, 24, 8, 192, F16, "channels_last", True, 0, None, True, None),  # plain PatchEmbed
    (1, 1, 42, 28, 14, 192, F32, "nchw", True, 2, "full", False, None),
]


@pytest.mark.parametrize("b,c,h,w,p,d,dtype,layout,weight_cl,n_prefix,pos,bias,add_dtype", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_patch_embed(device, b, c, h, w, p, d, dtype, layout, weight_cl, n_prefix, pos, bias, add_dtype):
    args = _inputs(device, b, c, h, w, p, d, dtype, layout=layout, weight_cl=weight_cl, n_prefix=n_prefix,
                   pos=pos, bias=bias, add_dtype=add_dtype)
    _check(*args)


def test_partial_gradients(device):
    # frozen weight (only the image gradient and the additive terms), and frozen images + params
    args = _inputs(device, 2, 3, 28, 28, 14, 64, BF16)
    _check(*args, need=[True, False, False, True, True])
    _check(*args, need=[False, True, True, False, False])
    _check(*args, need=[False, False, True, False, False])  # bias only: the column sums


def test_expanded_gradient(device):
    # y.sum().backward() hands backward an expanded gradient (stride 0 everywhere)
    images, weight, bias, pos, prefix = _inputs(device, 2, 3, 32, 32, 16, 64, F32, n_prefix=2)
    out_shape = (2, 2 + 4, 64)
    dy = torch.ones((), device=device).expand(out_shape)
    _check(images, weight, bias, pos, prefix, dy=dy)


def test_many_images_per_tile(device):
    # one patch per image (N = 1): every GEMM tile spans many images, and the prefix rows of 40
    # images (x 3 prefix tokens) outnumber the GEMM's programs, which write them in a strided loop
    _check(*_inputs(device, 40, 3, 16, 16, 16, 64, BF16, n_prefix=3))


def test_empty_batch_and_no_patches(device):
    images, weight, bias, pos, prefix = _inputs(device, 0, 3, 32, 32, 16, 64, F32)
    y = vitkern.patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix)
    assert y.shape == (0, 5, 64)
    # zero-height images: only the prefix rows (with the prefix part of the full pos_embed)
    images, weight, bias, _, prefix = _inputs(device, 2, 3, 0, 32, 16, 64, F32)
    pos = torch.randn(1, 1, 64, device=device)
    y = vitkern.patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix)
    torch.testing.assert_close(y, (prefix + pos).expand(2, -1, -1))


# --------------------------------------------------------------------------------------------
# every GEMM config through the hooks, the sm_80 launch path, the split column sums
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_gemm.GEMM_CONFIGS))
def test_every_gemm_config(device, monkeypatch, name):
    """Forward (gather, row map, prefix prologue), dW (transposed gather, split-K) and dX (gather,
    pixel scatter) with each config of the core, at a ragged shape (K = 588, N = 6 per image)."""
    cfg = _gemm.GEMM_CONFIGS[name]
    dtype = F32 if ("tf32" in name or "fp32" in name) else BF16
    images, weight, bias, pos, prefix = _inputs(device, 3, 3, 28, 42, 14, 192, dtype, n_prefix=2)
    real_fwd, real_bwd = pe_launch._patch_embed_fwd, pe_launch._patch_embed_bwd
    monkeypatch.setattr(pe_launch, "_patch_embed_fwd", lambda *a, **k: real_fwd(*a, **k, config=cfg))
    monkeypatch.setattr(pe_launch, "_patch_embed_bwd", lambda *a, **k: real_bwd(*a, **k, config=cfg))
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if "tf32" in name else "ieee"
    try:
        _check(images, weight, bias, pos, prefix)
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev


def test_sm80_launch_path(device, monkeypatch):
    """The sm_80 family's configs (plain loads, the weight-gradient overrides) on the interpreter."""
    monkeypatch.setenv("VITKERN_INTERPRET_ARCH", "80")
    for dtype, p in ((BF16, 14), (F32, 16)):
        _check(*_inputs(device, 2, 3, 2 * p, 3 * p, p, 64, dtype, layout="channels_last"))


def test_split_column_sums(device, monkeypatch):
    """The pos_embed / prefix / bias gradients with the batch split over programs (the GPU path)."""
    monkeypatch.setattr(pe_launch, "INTERPRETING", False)  # num_sms() still answers the interpreter's count
    images, weight, bias, pos, prefix = _inputs(device, 7, 1, 16, 16, 8, 64, F32, n_prefix=1)
    _check(images, weight, bias, pos, prefix, need=[False, False, True, True, True])


# --------------------------------------------------------------------------------------------
# autocast, errors, registration, opcheck, torch.compile
# --------------------------------------------------------------------------------------------


def test_autocast(device):
    # timm under autocast: fp32 parameters, bf16 conv; the fp32 class token and pos_embed make the
    # tokens fp32
    images, weight, bias, pos, prefix = _inputs(device, 2, 3, 32, 32, 16, 64, F32)
    with torch.autocast(device.type, dtype=BF16):
        y = vitkern.patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix)
    assert y.dtype == F32
    ref = patch_embed_ref(images.to(BF16).double(), weight.to(BF16).double(), bias.to(BF16).double(),
                          pos_embed=pos.double(), prefix_tokens=prefix.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=0)


def test_errors(device):
    images, weight, bias, pos, prefix = _inputs(device, 1, 3, 32, 48, 16, 64, F32)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vitkern.patch_embed(images[..., :40], weight, bias)
    with pytest.raises(ValueError, match="channels"):
        vitkern.patch_embed(images[:, :2], weight, bias)
    with pytest.raises(ValueError, match="pos_embed has length 5"):
        vitkern.patch_embed(images, weight, bias, pos_embed=pos[:, :5], prefix_tokens=prefix)
    with pytest.raises(ValueError, match="prefix_tokens"):
        vitkern.patch_embed(images, weight, bias, prefix_tokens=prefix[0])
    with pytest.raises(TypeError, match="dtype"):
        vitkern.patch_embed(images.to(BF16), weight, bias)
    with pytest.raises(vitkern.BackendUnavailableError, match="C \\* Ph \\* Pw"):
        vitkern.patch_embed(images[:, :0], weight[:, :0], bias)
    # the launchers check for themselves too (direct op calls)
    fwd = torch.ops.vitkern.patch_embed_fwd
    with pytest.raises(ValueError, match="do not match"):
        fwd(images[:, :2], weight, bias, None, None)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        fwd(images[..., :40], weight, bias, None, None)
    with pytest.raises(TypeError, match="bias has dtype"):
        fwd(images, weight, bias.to(F16), None, None)
    with pytest.raises(ValueError, match="pos_embed must be"):
        fwd(images, weight, bias, pos[:, :5], prefix)
    with pytest.raises(ValueError, match="grad must have shape"):
        pe_launch._patch_embed_bwd(torch.zeros(1, 3, 64, device=device), images, weight, True, True, None, 1, 0,
                                   None, None)


def test_backend_registered():
    from vitkern import _backend

    assert "triton" in _backend.registered_backends("patch_embed")


def test_opcheck(device):
    images, weight, bias, pos, prefix = _leaves(_inputs(device, 2, 3, 28, 28, 14, 64, BF16, n_prefix=2))
    fwd = torch.ops.vitkern.patch_embed_fwd.default
    torch.library.opcheck(fwd, (images, weight, bias, pos, prefix))
    torch.library.opcheck(fwd, (images, weight, None, None, None))
    cl = images.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(fwd, (cl, weight, bias, pos[:, 2:], prefix))
    y = fwd(images, weight, bias, pos, prefix)
    bwd = torch.ops.vitkern.patch_embed_bwd.default
    dy = torch.randn_like(y)
    torch.library.opcheck(bwd, (dy, images.detach(), weight.detach(), True, True, BF16, 2, 6, BF16, BF16))
    torch.library.opcheck(bwd, (dy, cl.detach(), weight.detach(), True, False, None, 2, 0, None, None))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def stem(images, weight, bias, pos, prefix):
        return vitkern.patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix) * 2.0

    compiled = torch.compile(stem, fullgraph=True)  # fullgraph: a graph break raises
    args = _inputs(device, 2, 3, 32, 32, 16, 64, F32)
    got_in, ref_in = _leaves(args), _leaves(args)
    out = compiled(*got_in)
    with vitkern.use_backend("reference"):
        ref = stem(*ref_in)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cot = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, got_in, cot), torch.autograd.grad(ref, ref_in, cot)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_module_matches_timm_layout(device):
    # vitkern.nn.PatchEmbed on the Triton backend: timm's constructor, Conv2d weight layout
    m = vitkern.nn.PatchEmbed(img_size=(28, 42), patch_size=14, in_chans=3, embed_dim=64).to(device)
    x = torch.randn(2, 3, 28, 42, device=device)
    y = m(x)
    with vitkern.use_backend("reference"):
        ref = m(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# static compile (sm_80 / sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------


# The default set's rows (the forward, weight-gradient and image-gradient GEMMs and the column sums
# at the benchmark shapes and every variant) are checked in tests/test_static_compile.py, from its
# one run over all of vitkern.ops.


@pytest.mark.slow
def test_static_compile_patch_embed_full():
    """Every GEMM config of the core with the three patch-embedding GEMMs and every variant
    compiles for sm_80 and sm_90 without spills (wgmma on sm_90, mma.sync on sm_80)."""
    from vitkern.testing.compile_check import run_compile_check

    report = run_compile_check(["vitkern.ops.patch_embed"], full=True, timeout=3000)
    print(report.format())
    check_gemm_rows(report.rows)


# --------------------------------------------------------------------------------------------
# the full cross product (run with --run-slow, and on a GPU)
# --------------------------------------------------------------------------------------------

SLOW = list(itertools.product((8, 14, 16, 32), (1, 3, 4), (64, 192, 768), (F32, F16, BF16),
                              ("nchw", "channels_last")))


@pytest.mark.slow
@pytest.mark.parametrize("p,c,d,dtype,layout", SLOW, ids=lambda v: str(v).replace("torch.", ""))
def test_patch_embed_full(device, p, c, d, dtype, layout):
    # non-square, 2 x 3 patches; both pos_embed forms, with / without prefix tokens and bias
    i = (p + c + d) % 4
    n_prefix, pos, bias = ((1, "full", True), (0, "patch", False), (4, "patch", True), (2, None, False))[i]
    _check(*_inputs(device, 2, c, 2 * p, 3 * p, p, d, dtype, layout=layout, weight_cl=layout == "channels_last",
                    n_prefix=n_prefix, pos=pos, bias=bias))
