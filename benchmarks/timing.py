"""Timing one callable: CUDA events or the CPU clock, the warmup, the statistics, and the two ways
of keeping a timed repetition from reading a warm L2 cache (a flush, or rotating input copies),
plus CUDA graph replays.

- :func:`measure`: on CUDA, CUDA events around each repetition after a time-based warmup, the L2
  cache flushed before each (a 256 MB buffer zeroed) unless told not to; on the CPU,
  ``time.perf_counter`` around each call with the garbage collector paused. Median and the
  20th/80th percentiles are reported (:class:`Timing`).
- rotating inputs: for memory-bound cases (arithmetic intensity below the ceilings' ridge point,
  :func:`should_rotate`) each repetition reads the next of several copies of the inputs that
  together exceed twice the L2 (:func:`rotation_copies`), so a small op's inputs are never served
  from a warm L2.
- :func:`cuda_graph_call`: a CUDA graph captured once, whose replays are timed instead (no launch
  overhead: what small batches are bound by).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks.flops import TRAIN_MODE

# Rotating input copies: the pool of copies is at least this many times the L2 cache.
ROTATE_L2_FACTOR = 2.0
ROTATE_MAX_COPIES = 256
ROTATE_MAX_POOL_BYTES = 4 << 30


@dataclass
class Timing:
    """Per-repetition times of one callable, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    n_reps: int
    times_ms: list = field(default_factory=list, repr=False)

    @classmethod
    def from_times(cls, times_ms: Sequence[float]) -> "Timing":
        ts = sorted(float(t) for t in times_ms)
        if not ts:
            raise ValueError("no timings")
        return cls(
            median_ms=_quantile(ts, 0.5),
            p20_ms=_quantile(ts, 0.2),
            p80_ms=_quantile(ts, 0.8),
            min_ms=ts[0],
            mean_ms=sum(ts) / len(ts),
            n_reps=len(ts),
            times_ms=list(times_ms),
        )


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


_L2_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A 256 MB buffer whose zeroing evicts the L2 cache (H100: 50 MB, B200: 126 MB)."""
    key = str(device)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _L2_FLUSH[key]


def measure(
    fn: Callable[[], Any],
    device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    warmup: Optional[int] = None,
    reps: Optional[int] = None,
    min_reps: int = 5,
    max_reps: int = 1000,
    flush_l2: bool = True,
) -> Timing:
    """Time ``fn()`` on ``device``: a warmup, then many repetitions, each timed on its own.

    CUDA: CUDA events around each call (``triton.testing.do_bench`` style), the L2 cache flushed
    before each repetition when ``flush_l2``; the repetition count fills about ``rep_ms``.
    CPU: ``time.perf_counter`` around each call (``do_bench`` needs a GPU driver), with the garbage
    collector paused. ``warmup`` / ``reps`` fix the counts instead of the time targets.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, device, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps, flush_l2)
    return _measure_cpu(fn, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps)


def _rep_counts(estimate_ms, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps):
    estimate_ms = max(estimate_ms, 1e-4)
    n_warm = warmup if warmup is not None else max(1, min(max_reps, int(warmup_ms / estimate_ms)))
    n_rep = reps if reps is not None else max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))
    return n_warm, max(1, n_rep)


def _measure_cuda(fn, device, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps, flush_l2) -> Timing:
    cache = _l2_flush_buffer(device) if flush_l2 else None
    with torch.cuda.device(device):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            if cache is not None:
                cache.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = start.elapsed_time(end) / 5
        n_warm, n_rep = _rep_counts(estimate, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for _ in range(n_warm):
            fn()
        for i in range(n_rep):
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return Timing.from_times([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _measure_cpu(fn, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps) -> Timing:
    t0 = time.perf_counter()
    fn()
    estimate = (time.perf_counter() - t0) * 1e3
    n_warm, n_rep = _rep_counts(estimate, warmup_ms, rep_ms, warmup, reps, min_reps, max_reps)
    for _ in range(n_warm):
        fn()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n_rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.from_times(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Rotating input buffers ---------------------------------------------------------------------------


def tensor_bytes(args) -> int:
    """Bytes of the tensors in ``args`` (non-tensor entries count 0)."""
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def rotation_copies(
    arg_bytes: int,
    l2_bytes: int,
    *,
    factor: float = ROTATE_L2_FACTOR,
    max_copies: int = ROTATE_MAX_COPIES,
    max_pool_bytes: int = ROTATE_MAX_POOL_BYTES,
) -> int:
    """How many copies of a case's inputs to cycle through so that the others, touched since a copy
    was last read, are at least ``factor`` x the L2 cache: 1 (no rotation) when one copy already is.
    Capped by ``max_copies`` and ``max_pool_bytes``."""
    target = factor * l2_bytes
    if arg_bytes <= 0 or l2_bytes <= 0 or arg_bytes >= target:
        return 1
    n = math.ceil(target / arg_bytes) + 1
    return max(1, min(n, max_copies, max_pool_bytes // arg_bytes))


def _copy_arg(a):
    if not isinstance(a, torch.Tensor):
        return a
    return a.detach().clone().requires_grad_(a.requires_grad)


def input_pool(args: Sequence, copies: int) -> list[tuple]:
    """``copies`` versions of ``args``: the originals first, then fresh copies (same values, same
    ``requires_grad``, distinct storage); non-tensor arguments are shared."""
    pool = [tuple(args)]
    for _ in range(max(0, copies - 1)):
        pool.append(tuple(_copy_arg(a) for a in args))
    return pool


class RotatingCall:
    """A zero-argument callable that runs ``call_with(pool[i])`` with the next ``i`` on each call,
    so that successive timed repetitions read different copies of the inputs."""

    def __init__(self, call_with: Callable[[tuple], Any], pool: Sequence[tuple]):
        if not pool:
            raise ValueError("empty input pool")
        self.call_with, self.pool, self.index = call_with, list(pool), 0

    def __call__(self):
        args = self.pool[self.index]
        self.index = (self.index + 1) % len(self.pool)
        return self.call_with(args)


def is_memory_bound(flops: Optional[int], nbytes: Optional[int], ridge: float) -> bool:
    """True when the case's arithmetic intensity (FLOPs per minimum byte) is below ``ridge``."""
    if not nbytes:
        return False
    return flops is None or flops / nbytes < ridge


def should_rotate(policy: str, on_gpu: bool, mode: str, flops, nbytes, ridge: float) -> bool:
    """``--rotate``: "always", "never", or "auto": on a GPU, for the memory-bound fwd / fwd+bwd cases
    (where a warm L2 flatters most; compute-bound cases and training steps get the L2 flush)."""
    if policy == "never":
        return False
    if policy == "always":
        return True
    return on_gpu and mode != TRAIN_MODE and is_memory_bound(flops, nbytes, ridge)


# CUDA graphs ---------------------------------------------------------------------------------------


class GraphReplay:
    """A captured CUDA graph: calling it replays the graph; ``output`` is what the captured call
    returned, overwritten by every replay (the runner checks it against the reference)."""

    def __init__(self, graph, output):
        self.graph, self.output = graph, output

    def __call__(self):
        self.graph.replay()
        return self.output


def cuda_graph_call(call: Callable[[], Any], device: torch.device, warmup: int = 2) -> GraphReplay:
    """Capture ``call`` once into a CUDA graph and return its replay (:class:`GraphReplay`).

    ``call`` runs ``warmup`` times on a side stream first (as torch.cuda.graphs requires, and so that
    lazy initialisation and autotuning happen outside the capture). The replay reuses the captured
    input and output addresses, so it cannot be combined with rotating inputs.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    torch.cuda.synchronize(device)
    return GraphReplay(graph, output)
