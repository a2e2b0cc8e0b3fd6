"""Running work on another thread, as autograd's backward runs on CUDA: the launch path's
per-thread state (the TMA scratch allocator, the current device) must hold there too."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

__all__ = ["run_in_thread"]

T = TypeVar("T")


def run_in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a fresh thread (a fresh ContextVar context); return its result or re-raise
    its exception in the caller."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")
