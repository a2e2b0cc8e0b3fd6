"""Routing ``torch.nn.functional.scaled_dot_product_attention`` to vitkern's drop-in.

One wrapper is installed as ``F.scaled_dot_product_attention`` (once; :func:`patch_sdpa` or the
first :func:`sdpa_override`). It sends a call to :func:`vitkern.scaled_dot_product_attention` when
routing is on for the calling context, else to the function it replaced, unchanged. Routing is on
process-wide after :func:`patch_sdpa` (until :func:`unpatch_sdpa`), and inside
``with sdpa_override():`` for that context only: the switch is a ``ContextVar``, so a block
nests, and other threads and asyncio tasks keep torch's path. vitkern's drop-in serves what its
kernels support and hands the rest to torch's own SDPA (the builtin saved at import), so the
wrapper never recurses. Code that bound the function before it was patched
(``from torch.nn.functional import scaled_dot_product_attention``) is not routed.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator

import torch.nn.functional as F

from vitkern.ops.attention.sdpa import scaled_dot_product_attention as _vitkern_sdpa

__all__ = ["patch_sdpa", "sdpa_override", "sdpa_patched", "unpatch_sdpa"]

_lock = threading.Lock()
_replaced = None  # the function the wrapper replaced (torch's, or what a user had installed)
_global = False  # patch_sdpa() in force
_override: contextvars.ContextVar[bool] = contextvars.ContextVar("vitkern_sdpa_override", default=False)


def _routed_sdpa(*args, **kwargs):
    if _global or _override.get():
        return _vitkern_sdpa(*args, **kwargs)
    return _replaced(*args, **kwargs)


_routed_sdpa.__doc__ = (
    "torch.nn.functional.scaled_dot_product_attention, routed to vitkern.scaled_dot_product_attention "
    "by vitkern.patch_sdpa() / vitkern.sdpa_override()."
)


def _install() -> None:
    global _replaced
    with _lock:
        if F.scaled_dot_product_attention is not _routed_sdpa:
            _replaced = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _routed_sdpa


def sdpa_patched() -> bool:
    """Whether ``F.scaled_dot_product_attention`` routes every context to vitkern now."""
    return _global and F.scaled_dot_product_attention is _routed_sdpa


def patch_sdpa() -> None:
    """Route every call of ``torch.nn.functional.scaled_dot_product_attention``, in every thread,
    to :func:`vitkern.scaled_dot_product_attention` (any model: timm, Hugging Face, diffusers)."""
    global _global
    _install()
    _global = True


def unpatch_sdpa() -> None:
    """Restore the function :func:`patch_sdpa` replaced as ``F.scaled_dot_product_attention``.
    An :func:`sdpa_override` block entered later installs the wrapper again."""
    global _global
    with _lock:
        _global = False
        if F.scaled_dot_product_attention is _routed_sdpa:
            F.scaled_dot_product_attention = _replaced


@contextlib.contextmanager
def sdpa_override() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to vitkern inside the block, for this context
    only (other threads keep torch's path); nests."""
    _install()
    token = _override.set(True)
    try:
        yield
    finally:
        _override.reset(token)
