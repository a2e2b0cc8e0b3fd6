"""The optional CUDA extension ``vitkern._C``: lazy loading, and the Python side of its ops.

``vitkern._C`` is built from ``csrc/`` by ``pip install -e . --no-build-isolation`` when torch is
a CUDA build and nvcc is found. It registers its ops in the ``vitkern_cuda::`` namespace
(``torch.ops.vitkern_cuda.*``) and exposes ``build_info()`` through pybind11. Loading it needs no
GPU. Importing vitkern never fails because the extension is missing: :func:`load` tries the import
once and remembers the module or the reason it failed (:func:`extension_error`).

When the extension loads, this module registers the ops' fake (meta) implementations and autograd
formulas. The C++ library names this module as the home of those (``m.set_python_module``), so
the fake implementation of every ``vitkern_cuda::`` op is registered here, in
:func:`_register_python_impls`.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any, Optional

import torch

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
                _register_python_impls()
            except Exception as exc:  # noqa: BLE001
                _error = f"vitkern._C loaded but registering its Python implementations failed: {type(exc).__name__}: {exc}"
            else:
                _module = _C
        _loaded = True
    return _module


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
    if check_layout and not images.is_contiguous():
        raise RuntimeError(
            f"patchify: images must be contiguous (NCHW), got strides {tuple(images.stride())} "
            f"for shape {tuple(images.shape)}; call .contiguous() first"
        )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The CUDA kernel ``vitkern_cuda::patchify``: same result as :func:`patchify_ref`.

    Needs the CUDA extension and a contiguous float32/float16/bfloat16 CUDA tensor (meta tensors
    give the output's shape). Raises RuntimeError naming the reason otherwise; it never falls back
    to the reference silently.
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


def _register_python_impls() -> None:
    """Fake (meta) implementations and autograd for the ops vitkern._C defines."""
    torch.library.register_fake("vitkern_cuda::patchify", _patchify_fake)
    torch.library.register_autograd(
        "vitkern_cuda::patchify", _patchify_backward, setup_context=_patchify_setup_context
    )
