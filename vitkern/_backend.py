"""Backend selection: which implementation of each op runs.

Every public op (``vitkern.layer_norm``, ``vitkern.attention``, ...) has up to three backends:

- ``"reference"``: plain differentiable PyTorch (``<op>_ref`` beside the kernels). Runs on any
  device; ``torch.compile`` traces straight through it.
- ``"triton"``: the Triton kernels, registered as ``vitkern::`` custom ops with their own autograd.
  Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``.
- ``"cuda"``: the C++/CUDA extension ``vitkern._C`` (``vitkern_cuda::`` ops), for the ops it
  implements (:data:`CUDA_EXTENSION_OPS`); for every other op ``use_backend("cuda")`` means "auto".

``"auto"`` (the default) picks per call: CUDA tensors go to the fastest backend measured for that
op (:data:`AUTO_CUDA_PREFERENCE`), CPU tensors to Triton when the interpreter is on, else to the
reference. An explicitly chosen backend that cannot serve a call raises, naming the reason; it never
falls back silently to a slower path.

The choice is a module global, so ``torch.compile`` guards on it and recompiles when it changes.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

__all__ = [
    "BACKENDS",
    "CUDA_EXTENSION_OPS",
    "AUTO_CUDA_PREFERENCE",
    "BackendUnavailableError",
    "use_backend",
    "get_backend",
    "register_impl",
    "select_impl",
    "registered_backends",
    "triton_interpreting",
]

BACKENDS = ("auto", "reference", "triton", "cuda")

# Ops the CUDA extension implements; ``use_backend("cuda")`` leaves every other op on "auto".
CUDA_EXTENSION_OPS = frozenset({"linear", "mlp", "patch_embed"})

# On CUDA tensors, "auto" tries these backends in order and takes the first one that is
# registered, available and accepts the call; the reference path is the last resort for ops
# whose kernels have not landed. Entries that prefer the extension over Triton must cite the
# benchmark result (benchmarks/results/...) that measured it.
_DEFAULT_CUDA_PREFERENCE = ("triton", "reference")
AUTO_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {}

# A "supports" predicate returns None when the backend can serve the call, else the reason.
SupportsFn = Callable[..., Optional[str]]

_impls: dict[str, dict[str, tuple[Callable, Optional[SupportsFn]]]] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly selected backend cannot serve this call."""


def _validate(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"vitkern backend must be one of {BACKENDS}, got {name!r}")
    return name


def _default_from_env() -> str:
    name = os.environ.get("VITKERN_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"VITKERN_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_current: str = _default_from_env()


def get_backend() -> str:
    """The backend name in force: "auto", "reference", "triton" or "cuda"."""
    return _current


class use_backend:
    """Select the backend for every vitkern op.

    Works as a plain call (``vitkern.use_backend("reference")`` sets it until changed) and as a
    context manager (``with vitkern.use_backend("triton"): ...`` restores the previous choice on
    exit).
    """

    def __init__(self, name: str):
        global _current
        self.name = _validate(name)
        self._previous = _current
        _current = self.name

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = self._previous

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register_impl(op: str, backend: str, fn: Callable, supports: Optional[SupportsFn] = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    ``fn`` takes exactly the arguments of the public function (after its argument checks and
    autocast casts). ``supports(*args, **kwargs)`` returns None when ``fn`` can serve the call and
    otherwise a short reason, which becomes the error of an explicit selection.
    """
    if backend not in ("reference", "triton", "cuda"):
        raise ValueError(f"cannot register backend {backend!r} for op {op!r}")
    _impls.setdefault(op, {})[backend] = (fn, supports)


def registered_backends(op: str) -> tuple[str, ...]:
    return tuple(_impls.get(op, {}))


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    if backend == "triton":
        if device.type == "cuda" or triton_interpreting():
            return None
        return f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run them on the CPU)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors (got {device.type})"
        from vitkern._extension import cuda_extension_available, extension_error

        if not cuda_extension_available():
            return f"the CUDA extension vitkern._C is not available ({extension_error()})"
    return None


def _reason(op: str, backend: str, device: torch.device, args, kwargs) -> Optional[str]:
    entry = _impls.get(op, {}).get(backend)
    if entry is None:
        return f"op {op!r} has no {backend!r} implementation"
    reason = _device_reason(backend, device)
    if reason is None and entry[1] is not None:
        reason = entry[1](*args, **kwargs)
    return reason


def select_impl(op: str, device: torch.device, *args, **kwargs) -> Callable:
    """The implementation of ``op`` that the current backend choice runs for this call."""
    name = _current
    if name == "cuda" and op not in CUDA_EXTENSION_OPS:
        name = "auto"
    if name != "auto":
        reason = _reason(op, name, device, args, kwargs)
        if reason is not None:
            raise BackendUnavailableError(f"vitkern.{op}: backend {name!r} cannot run this call: {reason}")
        return _impls[op][name][0]
    if device.type == "cuda":
        order = AUTO_CUDA_PREFERENCE.get(op, _DEFAULT_CUDA_PREFERENCE)
    else:
        order = ("triton", "reference") if triton_interpreting() else ("reference",)
    for candidate in order:
        if _reason(op, candidate, device, args, kwargs) is None:
            return _impls[op][candidate][0]
    return _impls[op]["reference"][0]
