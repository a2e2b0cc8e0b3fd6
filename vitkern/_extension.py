"""The optional CUDA extension ``vitkern._C``: lazy loading, and the Python side of its ops.

``vitkern._C`` is built from ``csrc/`` by ``pip install -e . --no-build-isolation`` when torch is
a CUDA build and nvcc is found. It registers its ops in the ``vitkern_cuda::`` namespace
(``torch.ops.vitkern_cuda.*``) and exposes ``build_info()`` through pybind11. Loading it needs no
GPU. Importing vitkern never fails because the extension is missing: :func:`load` tries the import
once and remembers the module or the reason it failed (:func:`extension_error`).

The ops are declared here, once: their schemas (:data:`_SCHEMAS`), fake (meta) implementations
and ``patchify``'s autograd are registered when this module is imported (``import vitkern`` does
it), whether or not the extension is built; ``vitkern._C`` registers only their CUDA kernels
(``TORCH_LIBRARY_IMPL`` in ``csrc/bindings.cpp``). Importing ``vitkern._C`` by any route imports
the ``vitkern`` package first, so the ops can always be traced (FakeTensor, torch.compile) once
they can run. The other ops' autograd lives with their Python wrappers
(``vitkern.ops.linear.cuda``, ``vitkern.ops.mlp.cuda``, ``vitkern.ops.patch_embed.cuda``), registered
through :func:`_on_load` once the library is loaded.

Ops (activation ids: :class:`vitkern.ops.activation.Activation`, 0 none, 1 "gelu" (erf), 2
"gelu_tanh"; ``allow_tf32``: fp32 GEMMs may use TF32, the caller's
``torch.backends.cuda.matmul.fp32_precision == "tf32"``, see :func:`allow_tf32`):

- ``patchify(images, patch_size)``: NCHW or channels_last images -> (B * N, C * P * P) patches.
- ``fused_dense_fwd`` / ``fused_dense_bwd``: ``linear`` on cuBLASLt (bias / GELU epilogues, the
  residual through the C matrix or an elementwise pass); backward with the BGRADB epilogue.
- ``mlp_fwd`` / ``mlp_bwd``: two fused dense layers; backward uses DGELU_BGRAD for "gelu_tanh".
- ``patch_embed_fwd`` / ``patch_embed_bwd``: patchify + one GEMM into the token buffer, bias and
  position embedding in the GEMM, class / register tokens written in place.

The forward ops also return opaque buffers for their backward ("pre": the pre-activation, "branch":
the residual branch before its scales), ``(M, round_up(width, 8))`` when saved, else empty.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from vitkern.ops.activation import Activation

__all__ = [
    "load",
    "cuda_extension_available",
    "extension_error",
    "build_info",
    "patchify",
    "patchify_ref",
]

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_load_hooks: list[Callable[[], None]] = []

_PATCHIFY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load() -> Optional[ModuleType]:
    """Import ``vitkern._C`` once and return it, or None when it is unavailable (see :func:`extension_error`)."""
    global _loaded, _module, _error
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        try:
            _C = importlib.import_module("vitkern._C")
        except ModuleNotFoundError as exc:
            if exc.name not in ("vitkern._C", "vitkern"):
                _error = f"importing vitkern._C failed: {type(exc).__name__}: {exc}"
            else:
                _error = (
                    "vitkern._C is not built; reinstall with "
                    "`VITKERN_FORCE_CUDA_BUILD=1 pip install -e . --no-build-isolation` to build it "
                    "or see why it cannot be built here"
                )
        except Exception as exc:  # noqa: BLE001  (a broken build must not break `import vitkern`)
            _error = f"importing vitkern._C failed: {type(exc).__name__}: {exc}"
        else:
            try:
                for hook in _load_hooks:
                    hook()
            except Exception as exc:  # noqa: BLE001
                _error = ("vitkern._C loaded but registering its Python implementations failed: "
                          f"{type(exc).__name__}: {exc}")
            else:
                _module = _C
        _load_hooks.clear()
        _loaded = True
    return _module


def _on_load(hook: Callable[[], None]) -> None:
    """Run ``hook()`` once the extension has loaded and its fakes are registered (now, if it has).

    For registrations that need the ``vitkern_cuda::`` ops to exist (e.g. autograd formulas) without
    loading the extension before it is first used. A hook that raises makes the extension
    unavailable, with the error as the reason. Hooks must not call :func:`load`.
    """
    with _lock:
        if not _loaded:
            _load_hooks.append(hook)
            return
        available = _module is not None
    if available:
        hook()


def cuda_extension_available() -> bool:
    """True when the CUDA extension ``vitkern._C`` is built and loads (no GPU needed to load it)."""
    return load() is not None


def extension_error() -> Optional[str]:
    """Why the CUDA extension is unavailable, or None when it loaded."""
    load()
    return _error


def build_info() -> Optional[dict[str, Any]]:
    """How the extension was built (archs, CUDA / cuBLAS(Lt) / torch versions), or None without it."""
    module = load()
    return None if module is None else dict(module.build_info())


# ------------------------------------------------------------------------------------- patchify


def patchify_ref(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B * N, C * P * P) patches, N = (H/P) * (W/P); pure PyTorch.

    Rows are ordered (b, patch row, patch column) and each row is (c, py, px): the layout of a
    Conv2d(kernel=stride=P) weight reshaped to (D, C * P * P), so ``patches @ w.reshape(D, -1).T``
    is the patch embedding. Differentiable, any device and dtype.
    """
    _check_patchify_args(images, patch_size, check_layout=False)
    B, C, H, W = images.shape
    P = patch_size
    return (
        images.reshape(B, C, H // P, P, W // P, P)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(B * (H // P) * (W // P), C * P * P)
    )


def _unpatchify_ref(patches: torch.Tensor, shape: tuple[int, int, int, int], patch_size: int) -> torch.Tensor:
    """Inverse of patchify_ref: (B * N, C * P * P) -> (B, C, H, W)."""
    B, C, H, W = shape
    P = patch_size
    return (
        patches.reshape(B, H // P, W // P, C, P, P)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(B, C, H, W)
    )


def _check_patchify_args(images: torch.Tensor, patch_size: int, *, check_layout: bool = True) -> None:
    """The checks of the CUDA kernel (csrc/patchify_op.cpp), with the same messages."""
    if images.dim() != 4:
        raise RuntimeError(
            f"patchify: images must be a 4-D (B, C, H, W) tensor, got {images.dim()}-D with shape {tuple(images.shape)}"
        )
    if check_layout and images.dtype not in _PATCHIFY_DTYPES:
        raise RuntimeError(f"patchify: images must be float32, float16 or bfloat16, got {images.dtype}")
    if patch_size <= 0:
        raise RuntimeError(f"patchify: patch_size must be > 0, got {patch_size}")
    H, W = images.shape[2], images.shape[3]
    if H % patch_size != 0 or W % patch_size != 0:
        raise RuntimeError(
            f"patchify: images height and width must be multiples of patch_size={patch_size}, got H={H}, W={W}"
        )
    if check_layout and not (images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)):
        raise RuntimeError(
            f"patchify: images must be contiguous (NCHW) or channels_last (NHWC), got strides "
            f"{tuple(images.stride())} for shape {tuple(images.shape)}; call .contiguous() first"
        )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The CUDA kernel ``vitkern_cuda::patchify``: same result as :func:`patchify_ref`.

    Needs the CUDA extension and a float32/float16/bfloat16 CUDA tensor, contiguous (NCHW) or
    channels_last (NHWC) (meta tensors give the output's shape). Raises RuntimeError naming the
    reason otherwise; it never falls back to the reference silently.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"patchify: images must be a torch.Tensor, got {type(images).__name__}")
    if images.device.type not in ("cuda", "meta"):
        raise RuntimeError(
            f"patchify: images must be a CUDA tensor for the CUDA kernel, got device {images.device}; "
            "use vitkern._extension.patchify_ref for other devices"
        )
    if load() is None:
        raise RuntimeError(f"patchify: the vitkern CUDA extension is not available: {_error}")
    return torch.ops.vitkern_cuda.patchify(images, patch_size)


# ------------------------------------------------------------------ fake impls and autograd


def _patchify_fake(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    _check_patchify_args(images, patch_size)
    B, C, H, W = images.shape
    P = patch_size
    return images.new_empty((B * (H // P) * (W // P), C * P * P))


def _patchify_setup_context(ctx, inputs, output) -> None:
    images, patch_size = inputs
    ctx.images_shape = tuple(images.shape)
    ctx.patch_size = patch_size


def _patchify_backward(ctx, grad_out):
    # patchify is a permutation: its gradient is the inverse permutation of the output gradient.
    return _unpatchify_ref(grad_out, ctx.images_shape, ctx.patch_size), None


# The other ops' fakes: shapes and dtypes of what csrc/fused_dense.cpp and csrc/patch_embed.cpp
# return, with their main argument checks (same messages), so that meta / fake tensors fail where
# the CUDA op would.


def _round8(n):
    return (n + 7) // 8 * 8


def _fail(op: str, message: str):
    raise RuntimeError(f"vitkern_cuda::{op}: {message}")


# The activations csrc/dense_epilogue.h's ActCode covers (cuBLASLt's GELU epilogues and the
# extension's own erf pass); QuickGELU (3) is not one of them.
EXTENSION_ACTIVATIONS = (Activation.NONE, Activation.GELU, Activation.GELU_TANH)


def _check_activation_id(op: str, activation: int) -> None:
    if activation not in EXTENSION_ACTIVATIONS:
        _fail(op, f"activation must be 0 (none), 1 (gelu, erf) or 2 (gelu_tanh), got {activation}")


def _check_float_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _PATCHIFY_DTYPES:
        _fail(op, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_dense_fake(op, x, weight, bias=None, residual=None, residual_scale=None, row_scale=None,
                      x_name="x", w_name="weight", b_name="bias", r_name="residual"):
    _check_float_tensor(op, x_name, x)
    if x.dim() != 2:
        _fail(op, f"{x_name} must be 2-D (M, K), got shape {tuple(x.shape)}")
    m, k = x.shape
    _check_float_tensor(op, w_name, weight)
    if weight.dim() != 2 or weight.shape[1] != k:
        _fail(op, f"{w_name} must have shape (N, {k}) (K = {x_name}.shape[1]), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        _fail(op, f"{w_name} has dtype {weight.dtype} but {x_name} has {x.dtype}")
    n = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype != x.dtype):
        _fail(op, f"{b_name} must have shape ({n},) and dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if residual is not None:
        if residual.dim() != 2 or tuple(residual.shape) != (m, n):
            _fail(op, f"{r_name} must have shape ({m}, {n}), got {tuple(residual.shape)}")
        if residual.dtype not in (x.dtype, torch.float32):
            _fail(op, f"{r_name} must have the compute dtype ({x.dtype}) or float32, got {residual.dtype}")
    if residual_scale is not None:
        if residual is None:
            _fail(op, "residual_scale needs residual")
        if residual_scale.dim() != 1 or residual_scale.shape[0] != n or residual_scale.dtype != x.dtype:
            _fail(op, f"residual_scale must have shape ({n},) and dtype {x.dtype}, got "
                      f"{tuple(residual_scale.shape)} {residual_scale.dtype}")
    if row_scale is not None:
        if residual is None:
            _fail(op, "row_scale needs residual")
        if row_scale.dim() != 1 or row_scale.shape[0] != m or row_scale.dtype not in (x.dtype, torch.float32):
            _fail(op, f"row_scale must have shape ({m},) and dtype float32 or {x.dtype}, got "
                      f"{tuple(row_scale.shape)} {row_scale.dtype}")
    return m, k, n


def _fused_dense_fwd_fake(x, weight, bias, activation, residual, residual_scale, row_scale, save_pre, allow_tf32):
    _check_activation_id("fused_dense_fwd", activation)
    m, _, n = _check_dense_fake("fused_dense_fwd", x, weight, bias, residual, residual_scale, row_scale)
    out = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, _round8(n)) if save_pre else (0,))
    return out, pre


def _fused_dense_bwd_fake(grad, x, weight, residual_scale, row_scale, pre, activation, need_dx, need_dweight,
                          need_dbias, need_dscale, need_drow_scale, allow_tf32):
    op = "fused_dense_bwd"
    _check_activation_id(op, activation)
    m, k, n = _check_dense_fake(op, x, weight, None, grad, residual_scale, row_scale, r_name="grad")
    e = (0,)
    return (
        x.new_empty((m, k) if need_dx else e),
        x.new_empty((n, k) if need_dweight else e),
        x.new_empty((n,) if need_dbias else e),
        x.new_empty((n,), dtype=residual_scale.dtype) if need_dscale else x.new_empty(e),
        x.new_empty((m,), dtype=row_scale.dtype) if need_drow_scale else x.new_empty(e),
    )


def _mlp_fwd_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual, residual_scale, row_scale,
                  save_pre, save_branch, allow_tf32):
    op = "mlp_fwd"
    _check_activation_id(op, activation)
    m, _, hidden = _check_dense_fake(op, x, fc1_weight, fc1_bias, w_name="fc1_weight", b_name="fc1_bias")
    h = x.new_empty((m, hidden))
    _, _, n = _check_dense_fake(op, h, fc2_weight, fc2_bias, residual, residual_scale, row_scale,
                                x_name="h (fc1's output)", w_name="fc2_weight", b_name="fc2_bias")
    out = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, _round8(hidden)) if save_pre and activation != 0 else (0,))
    branch = x.new_empty((m, _round8(n)) if save_branch else (0,))
    return out, pre, h, branch


def _mlp_bwd_fake(grad, x, fc1_weight, fc2_weight, residual_scale, row_scale, pre, h, branch, activation, need_dx,
                  need_dfc1_weight, need_dfc1_bias, need_dfc2_weight, need_dfc2_bias, need_dscale, need_drow_scale,
                  allow_tf32):
    op = "mlp_bwd"
    _check_activation_id(op, activation)
    m, k, hidden = _check_dense_fake(op, x, fc1_weight, w_name="fc1_weight")
    _, _, n = _check_dense_fake(op, h, fc2_weight, None, grad, residual_scale, row_scale, x_name="h",
                                w_name="fc2_weight", r_name="grad")
    e = (0,)
    return (
        x.new_empty((m, k) if need_dx else e),
        x.new_empty((hidden, k) if need_dfc1_weight else e),
        x.new_empty((hidden,) if need_dfc1_bias else e),
        x.new_empty((n, hidden) if need_dfc2_weight else e),
        x.new_empty((n,) if need_dfc2_bias else e),
        x.new_empty((n,), dtype=residual_scale.dtype) if need_dscale else x.new_empty(e),
        x.new_empty((m,), dtype=row_scale.dtype) if need_drow_scale else x.new_empty(e),
    )


def _patch_geometry(op, images, weight):
    if images.dim() != 4:
        _fail(op, f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}")
    _check_float_tensor(op, "images", images)
    if weight.dim() != 4:
        _fail(op, f"weight must be 4-D (D, C, Ph, Pw), got shape {tuple(weight.shape)}")
    _check_float_tensor(op, "weight", weight)
    if weight.dtype != images.dtype:
        _fail(op, f"weight has dtype {weight.dtype} but images has {images.dtype}")
    b, c, h, w = images.shape
    d, wc, ph, pw = weight.shape
    if wc != c:
        _fail(op, f"images has {c} channels but weight expects {wc}")
    if ph <= 0 or pw <= 0 or h % ph != 0 or w % pw != 0:
        _fail(op, f"images height {h} and width {w} must be multiples of the patch size ({ph}, {pw})")
    return b, c, h, w, d, (h // ph) * (w // pw)


def _patch_embed_fwd_fake(images, weight, bias, pos_embed, prefix_tokens, allow_tf32):
    op = "patch_embed_fwd"
    b, _, _, _, d, n = _patch_geometry(op, images, weight)
    dtype = images.dtype
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d or bias.dtype != dtype):
        _fail(op, f"bias must have shape ({d},) and dtype {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    k = 0
    if prefix_tokens is not None:
        if prefix_tokens.dim() != 3 or prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != d:
            _fail(op, f"prefix_tokens must have shape (1, K, {d}), got {tuple(prefix_tokens.shape)}")
        if prefix_tokens.dtype not in (images.dtype, torch.float32):
            _fail(op, f"prefix_tokens must have the compute dtype ({images.dtype}) or float32, "
                      f"got {prefix_tokens.dtype}")
        k = prefix_tokens.shape[1]
        dtype = torch.promote_types(dtype, prefix_tokens.dtype)
    if pos_embed is not None:
        if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != d:
            _fail(op, f"pos_embed must have shape (1, L, {d}), got {tuple(pos_embed.shape)}")
        if pos_embed.shape[1] not in (n, k + n):
            _fail(op, f"pos_embed has length {pos_embed.shape[1]} but must have length {n} (patch tokens only) "
                      f"or {k + n} (prefix + patch tokens)")
        if pos_embed.dtype not in (images.dtype, torch.float32):
            _fail(op, f"pos_embed must have the compute dtype ({images.dtype}) or float32, got {pos_embed.dtype}")
        dtype = torch.promote_types(dtype, pos_embed.dtype)
    return images.new_empty((b, k + n, d), dtype=dtype)


def _patch_embed_bwd_fake(grad, images, weight, num_prefix_tokens, need_dimages, need_dweight, need_dbias,
                          allow_tf32):
    op = "patch_embed_bwd"
    b, c, h, w, d, n = _patch_geometry(op, images, weight)
    if tuple(grad.shape) != (b, num_prefix_tokens + n, d):
        _fail(op, f"grad must have shape ({b}, {num_prefix_tokens + n}, {d}) (the tokens' shape), "
                  f"got {tuple(grad.shape)}")
    e = (0,)
    if need_dimages:
        channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        dimages = torch.empty((b, c, h, w), dtype=images.dtype, device=images.device, memory_format=fmt)
    else:
        dimages = images.new_empty(e)
    from vitkern.ops.patch_embed.layout import _cuda_dw  # not at import: the op package imports this module

    return (
        dimages,
        _cuda_dw(weight) if need_dweight else images.new_empty(e),
        images.new_empty((d,) if need_dbias else e),
    )


_FAKES = {
    "vitkern_cuda::patchify": _patchify_fake,
    "vitkern_cuda::fused_dense_fwd": _fused_dense_fwd_fake,
    "vitkern_cuda::fused_dense_bwd": _fused_dense_bwd_fake,
    "vitkern_cuda::mlp_fwd": _mlp_fwd_fake,
    "vitkern_cuda::mlp_bwd": _mlp_bwd_fake,
    "vitkern_cuda::patch_embed_fwd": _patch_embed_fwd_fake,
    "vitkern_cuda::patch_embed_bwd": _patch_embed_bwd_fake,
}


# The schemas, declared once (vitkern._C registers CUDA kernels for exactly these signatures).
# "pre" / "branch" are opaque buffers for the backward ops: (M, round_up(width, 8)) when saved,
# else empty.
_SCHEMAS = {
    "patchify": "patchify(Tensor images, int patch_size) -> Tensor",
    "fused_dense_fwd": (
        "fused_dense_fwd(Tensor x, Tensor weight, Tensor? bias, int activation, Tensor? residual, "
        "Tensor? residual_scale, Tensor? row_scale, bool save_pre, bool allow_tf32) -> (Tensor, Tensor)"
    ),
    "fused_dense_bwd": (
        "fused_dense_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? residual_scale, Tensor? row_scale, "
        "Tensor pre, int activation, bool need_dx, bool need_dweight, bool need_dbias, bool need_dscale, "
        "bool need_drow_scale, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "mlp_fwd": (
        "mlp_fwd(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "int activation, Tensor? residual, Tensor? residual_scale, Tensor? row_scale, bool save_pre, "
        "bool save_branch, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "mlp_bwd": (
        "mlp_bwd(Tensor grad, Tensor x, Tensor fc1_weight, Tensor fc2_weight, Tensor? residual_scale, "
        "Tensor? row_scale, Tensor pre, Tensor h, Tensor branch, int activation, bool need_dx, "
        "bool need_dfc1_weight, bool need_dfc1_bias, bool need_dfc2_weight, bool need_dfc2_bias, "
        "bool need_dscale, bool need_drow_scale, bool allow_tf32) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "patch_embed_fwd": (
        "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? prefix_tokens, "
        "bool allow_tf32) -> Tensor"
    ),
    "patch_embed_bwd": (
        "patch_embed_bwd(Tensor grad, Tensor images, Tensor weight, int num_prefix_tokens, bool need_dimages, "
        "bool need_dweight, bool need_dbias, bool allow_tf32) -> (Tensor, Tensor, Tensor)"
    ),
}

_LIBRARY = torch.library.Library("vitkern_cuda", "DEF")


def _declare_ops() -> None:
    """Schemas, fake (meta) implementations and patchify's autograd of every vitkern_cuda:: op.

    Runs once, at import. The other ops' autograd is registered by their backends
    (vitkern.ops.linear.cuda, vitkern.ops.mlp.cuda, vitkern.ops.patch_embed.cuda; see :func:`_on_load`).
    """
    for schema in _SCHEMAS.values():
        _LIBRARY.define(schema)
    for qualname, fake in _FAKES.items():
        torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    torch.library.register_autograd(
        "vitkern_cuda::patchify", _patchify_backward, setup_context=_patchify_setup_context, lib=_LIBRARY
    )


def allow_tf32() -> bool:
    """Whether fp32 GEMMs may use TF32: torch's matmul precision, as torch's own cuBLAS calls read
    it (``torch.backends.cuda.matmul.fp32_precision``; "tf32" allows it, "ieee" does not)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


_declare_ops()
