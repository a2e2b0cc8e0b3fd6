"""Backend selection: which implementation of each op runs.

Every public op (``vitkern.layer_norm``, ``vitkern.attention``, ...) has up to four backends:

- ``"reference"``: plain differentiable PyTorch (``<op>_ref`` beside the kernels), the fp32
  correctness path. Runs on any device; ``torch.compile`` traces straight through it.
- ``"torch"``: the fastest PyTorch-native implementation (torch's own SDPA, ``F.linear``,
  ``F.layer_norm``, conv2d patch embedding, as timm runs them). Runs on any device.
- ``"triton"``: the Triton kernels, registered as ``vitkern::`` custom ops with their own autograd.
  Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``.
- ``"cuda"``: the C++/CUDA extension ``vitkern._C`` (``vitkern_cuda::`` ops), for the ops it
  implements (:data:`CUDA_EXTENSION_OPS`); for every other op ``use_backend("cuda")`` means "auto".

``"auto"`` (the default) picks per call. On CUDA tensors it runs the fast backend ("triton",
"cuda", "torch") measured fastest for the call's shape class on this GPU (:mod:`vitkern._tuning`:
timed on the first eager call, cached in memory and on disk); where nothing is measured, the
static table :data:`AUTO_CUDA_PREFERENCE`, else "torch". The reference runs there only when no fast
backend accepts the call. CPU tensors go to Triton when the interpreter is on, else to the
reference. An explicitly chosen backend that cannot serve a call raises, naming the reason; it never
falls back silently to a slower path. ``VITKERN_LOG_BACKEND=1`` logs "auto"'s pick (and why it
skipped the backends before it) once per op and shape class, on the ``vitkern.backend`` logger.

Each backend of an op is a :class:`BackendImpl`: the implementation plus what it serves, as data
(``dtypes``; the device rule of its kind) and a predicate for the rest (shapes, options).

The choice is a module global, so ``torch.compile`` guards on it and recompiles when it changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

__all__ = [
    "BACKENDS",
    "CUDA_EXTENSION_OPS",
    "AUTO_CUDA_PREFERENCE",
    "BackendImpl",
    "BackendUnavailableError",
    "backend_impl",
    "shape_class",
    "use_backend",
    "get_backend",
    "register_impl",
    "select_impl",
    "registered_backends",
    "triton_interpreting",
]

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")

# Ops the CUDA extension implements; ``use_backend("cuda")`` leaves every other op on "auto".
CUDA_EXTENSION_OPS = frozenset({"linear", "mlp", "patch_embed"})

# On CUDA tensors "auto" runs the backend measured fastest for the call's shape class
# (vitkern._tuning). Where nothing was measured (no timing allowed: torch.compile tracing, graph
# capture, deterministic mode, VITKERN_AUTOTUNE=0) it takes the first backend of this table that
# accepts the call, else "torch". Each entry must cite the committed GPU result
# (benchmarks/results/...) that measured it; none is committed yet, so every op falls back to
# "torch", PyTorch's own fast path.
AUTO_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {}

# A "supports" predicate returns None (or an empty list) when the backend can serve the call,
# else the reason (or every reason, as a list of strings).
SupportsFn = Callable[..., Union[None, str, Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class BackendImpl:
    """One backend of one op: its implementation and what it serves, as data plus a predicate.

    ``dtypes``: the floating-point dtypes its tensor arguments may have (None: any). The device
    rule comes with the backend's kind (:func:`_device_reasons`); ``supports`` covers the rest
    (shapes, options). :meth:`reasons` lists every reason the call cannot run here.
    """

    op: str
    backend: str
    fn: Callable
    dtypes: Optional[frozenset] = None
    supports: Optional[SupportsFn] = None

    def reasons(self, device: torch.device, args: tuple, kwargs: dict, first_only: bool = False) -> list[str]:
        reasons = _device_reasons(self.backend, device)
        if reasons and first_only:
            return reasons
        if self.dtypes is not None:
            reasons += _dtype_reasons(self.dtypes, args, kwargs)
            if reasons and first_only:
                return reasons
        if self.supports is not None:
            got = self.supports(*args, **kwargs)
            if got:
                reasons += [got] if isinstance(got, str) else list(got)
        return reasons


_impls: dict[str, dict[str, BackendImpl]] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly selected backend cannot serve this call (the message lists every reason)."""


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
    """The backend name in force: "auto", "reference", "torch", "triton" or "cuda"."""
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


def register_impl(
    op: str,
    backend: str,
    fn: Callable,
    supports: Optional[SupportsFn] = None,
    *,
    dtypes: Optional[Iterable[torch.dtype]] = None,
) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``.

    ``fn`` takes exactly the arguments of the public function (after its argument checks and
    autocast casts). ``dtypes`` lists the floating-point dtypes it takes (checked on every
    floating tensor argument); ``supports(*args, **kwargs)`` returns None when ``fn`` can serve the
    rest of the call and otherwise a short reason (or a list of them), which become the error of
    an explicit selection.
    """
    if backend not in BACKENDS[1:]:
        raise ValueError(f"cannot register backend {backend!r} for op {op!r}")
    _impls.setdefault(op, {})[backend] = BackendImpl(
        op, backend, fn, frozenset(dtypes) if dtypes is not None else None, supports)


def registered_backends(op: str) -> tuple[str, ...]:
    return tuple(_impls.get(op, {}))


def backend_impl(op: str, backend: str) -> Optional[BackendImpl]:
    """The registered :class:`BackendImpl` of ``op`` on ``backend``, or None."""
    return _impls.get(op, {}).get(backend)


def _device_reasons(backend: str, device: torch.device) -> list[str]:
    if backend == "triton":
        from vitkern.ops._config import triton_available

        if not triton_available():
            return ["Triton is not installed"]
        if device.type == "cuda" or triton_interpreting():
            return []
        return [f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run them on the CPU)"]
    if backend == "cuda":
        if device.type != "cuda":
            return [f"the CUDA extension needs CUDA tensors (got {device.type})"]
        from vitkern._extension import cuda_extension_available, extension_error

        if not cuda_extension_available():
            return [f"the CUDA extension vitkern._C is not available ({extension_error()})"]
    return []


def _tensors(args: tuple, kwargs: dict):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield f"argument {i}", a
    for name, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            yield name, a


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_reasons(dtypes: frozenset, args: tuple, kwargs: dict) -> list[str]:
    bad = sorted({_dtype_name(t.dtype) for _, t in _tensors(args, kwargs)
                  if t.is_floating_point() and t.dtype not in dtypes})
    if not bad:
        return []
    allowed = ", ".join(sorted(_dtype_name(d) for d in dtypes))
    return [f"dtype {', '.join(bad)} (it takes {allowed})"]


def _reasons(op: str, backend: str, device: torch.device, args, kwargs, first_only: bool = False) -> list[str]:
    impl = backend_impl(op, backend)
    if impl is None:
        return [f"op {op!r} has no {backend!r} implementation"]
    return impl.reasons(device, args, kwargs, first_only)


# --------------------------------------------------------------------------------------------
# VITKERN_LOG_BACKEND=1: "auto"'s pick, once per op and shape class
# --------------------------------------------------------------------------------------------

_LOG_PICKS = os.environ.get("VITKERN_LOG_BACKEND", "0").strip().lower() in ("1", "true", "on", "yes")
_logged: set = set()
_logger = logging.getLogger("vitkern.backend")


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length() if n > 0 else 0


def shape_class(args: tuple, kwargs: dict) -> tuple:
    """The shape class of a call: each tensor argument's dtype and its sizes rounded up to a power
    of two (so a 197-token and a 257-token batch of the same model fall in different classes,
    and 197 / 200 in one)."""
    return tuple((name, _dtype_name(t.dtype), tuple(_bucket(d) for d in t.shape)) for name, t in _tensors(args, kwargs))


def _log_pick(op: str, device: torch.device, picked: str, skipped: list[tuple[str, list[str]]], args, kwargs) -> None:
    key = (op, device.type, shape_class(args, kwargs))
    if key in _logged:
        return
    _logged.add(key)
    if not _logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    shapes = ", ".join(f"{name} {dtype}{list(t)}" for name, dtype, t in key[2])
    why = "; ".join(f"{b}: {' / '.join(r)}" for b, r in skipped)
    _logger.info("auto picked %r for %s on %s (%s)%s", picked, op, device.type, shapes,
                 f", skipping {why}" if why else "")


def select_impl(op: str, device: torch.device, *args, **kwargs) -> Callable:
    """The implementation of ``op`` that the current backend choice runs for this call."""
    name = _current
    if name == "cuda" and op not in CUDA_EXTENSION_OPS:
        name = "auto"
    if name != "auto":
        reasons = _reasons(op, name, device, args, kwargs)
        if reasons:
            raise BackendUnavailableError(
                f"vitkern.{op}: backend {name!r} cannot run this call: " + "; ".join(reasons))
        return _impls[op][name].fn
    from vitkern import _tuning

    if device.type in _tuning.TUNED_DEVICES:
        return _measured_pick(op, device, args, kwargs, _tuning)
    order = ("triton", "reference") if triton_interpreting() else ("reference",)
    skipped: list[tuple[str, list[str]]] = []
    picked = "reference"
    for candidate in order:
        reasons = _reasons(op, candidate, device, args, kwargs, first_only=not _LOG_PICKS)
        if not reasons:
            picked = candidate
            break
        skipped.append((candidate, reasons))
    if _LOG_PICKS and not torch.compiler.is_compiling():
        _log_pick(op, device, picked, skipped, args, kwargs)
    return _impls[op][picked].fn


def _measured_pick(op: str, device: torch.device, args: tuple, kwargs: dict, tuning) -> Callable:
    # The fast backends that accept the call are the candidates; "auto" runs the measured (or
    # cached, or static) winner among them, and the reference only when none accepts the call.
    candidates: dict[str, Callable] = {}
    skipped: list[tuple[str, list[str]]] = []
    for candidate in tuning.CANDIDATES:
        reasons = _reasons(op, candidate, device, args, kwargs, first_only=not _LOG_PICKS)
        if reasons:
            skipped.append((candidate, reasons))
        else:
            candidates[candidate] = _impls[op][candidate].fn
    if not candidates:
        candidates = {"reference": _impls[op]["reference"].fn}
    choice = tuning.choose(op, device, candidates, args, kwargs)
    if _LOG_PICKS and not torch.compiler.is_compiling():
        times = ", ".join(f"{b} {t:.4f} ms" for b, t in choice.times_ms.items())
        skipped.append((f"{choice.source} choice", [times] if times else []))
        _log_pick(op, device, choice.backend, skipped, args, kwargs)
    return candidates[choice.backend]
