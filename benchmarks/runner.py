"""The benchmark runner: timing, providers, ceilings, result rows, reports and the CLI.

``python -m benchmarks`` runs every setup in :mod:`benchmarks.setups` (one module per op or model)
for every provider and mode, and writes ``results.json``, ``summary.md`` and PNG plots
(:mod:`benchmarks.plot`):

- providers: ``vitkern`` (the public function, backend "auto"), ``vitkern-triton``
  (``use_backend("triton")``), ``vitkern-cuda`` (``use_backend("cuda")``: the CUDA extension's ops;
  skipped for ops it does not implement, and with the ``BackendUnavailableError`` reason when the
  extension is missing), ``vitkern-reference`` (``use_backend("reference")``), ``torch`` (the plain
  PyTorch function or the timm module: timm's ``Mlp``, ``PatchEmbed``, ``VisionTransformer``; the
  row's note names it) and ``torch.compile`` (of that same reference; GPU only unless
  ``--compile-on-cpu``). Setups add references of their own through ``Case.references``:
  ``torchvision`` (models), and for the attention setups ``sdpa-flash``, ``sdpa-cudnn``,
  ``sdpa-efficient``, ``sdpa-math`` (SDPA held to one backend by ``sdpa_kernel``), ``flash-attn``
  and ``xformers`` (when installed); setups without such a reference get no row for it. A provider
  that cannot serve a call (``BackendUnavailableError``, :class:`benchmarks.setups.Unavailable`:
  a library that is not installed, an SDPA backend that refuses the shape) becomes a "skipped" row
  with the reason; any other exception an "error" row.
- modes: ``fwd`` (forward under ``torch.no_grad()``) and ``fwd+bwd`` (forward, then
  ``torch.autograd.grad`` of every output against every input that requires a gradient); model
  setups also ``train`` (one training step: forward, loss, backward and optimizer step, as
  ``Case.train_step`` defines it). A case runs its modes in that order.
- timing (:func:`measure`): on CUDA, CUDA events around each repetition after a time-based warmup.
  Between repetitions either the L2 cache is flushed (a 256 MB buffer zeroed; ``--no-flush-l2``
  turns it off) or, for memory-bound cases (arithmetic intensity below the ceilings' ridge point;
  ``--rotate auto``, the default), each repetition reads the next of several copies of the inputs
  that together exceed twice the L2 (:func:`rotation_copies`), so a small op's inputs are never
  served from a warm L2. ``--cuda-graphs`` times replays of a CUDA graph captured once per
  provider instead (no launch overhead: what small batches are bound by). On the CPU,
  ``time.perf_counter`` around each call. Median and the 20th/80th percentiles are reported.
- ceilings (GPU only): a large GEMM in the run's dtype and a 1 GiB device-to-device copy, measured
  at the start of the run; ``pct_of_ceiling`` is the roofline floor ``max(flops / gemm_peak,
  bytes / copy_bandwidth)`` as a percentage of the measured median.
- correctness: each provider's outputs (fwd), gradients (fwd+bwd) or step results (train: the loss
  and a gradient) are compared with the ``torch`` provider's, computed in the same run and dtype:
  ``max_abs_err``, and ``err_ok`` against a dtype tolerance scaled by the reference's magnitude.
- order and budget: every op's first shape (the ``--quick`` set) runs first, then every op's second
  shape, and so on; past ``--budget-s`` the remaining cases become "skipped" rows, so a cut-short
  run still covers every op. results.json is rewritten after each case.
- CPU: one torch thread by default (``--threads``), fp32, tiny shapes; vitkern's "auto" runs the
  PyTorch reference there, so the CPU run checks correctness and that the suite works, nothing more.
- exit status: 0; 1 when any row is an error or outside tolerance (except the third-party attention
  references, sdpa-* / flash-attn / xformers, whose failures are reported but are not vitkern's);
  2 for bad arguments.

Adding an op (or a model) to the suite means adding one module to :mod:`benchmarks.setups`.

Results schema (``results.json``, version :data:`SCHEMA_VERSION`; :func:`validate_results` checks it)::

    {
      "schema_version": 2,
      "environment": {                       # no hostname
        "device_type": "cuda" | "cpu", "device_name": str, "device_count": int,
        "compute_capability": "9.0" | null, "gpu_memory_bytes": int | null, "l2_cache_bytes": int | null,
        "driver_version": str | null, "cuda_version": str | null, "cudnn_version": int | null,
        "torch": str, "triton": str | null, "timm": str | null, "torchvision": str | null,
        "flash_attn": str | null, "xformers": str | null, "python": str,
        "vitkern": str | null, "vitkern_import_error": str | null,
        "cuda_extension_available": bool | null, "backend_default": str | null,
        "git_commit": str | null, "git_dirty": bool | null,
        "date": "YYYY-MM-DDTHH:MM:SSZ", "platform": str, "cpu": str | null, "cpu_count": int,
        "torch_num_threads": int, "matmul_fp32_precision": str | null, "triton_interpret": bool
      },
      "config": {"ops": [str], "model_ops": [str], "providers": [str], "modes": [str], "dtype": str, "device": str,
                 "quick": bool, "batch": int | [int] | null, "models": [str] | null,
                 "flush_l2": bool, "rotate": "auto" | "always" | "never", "cuda_graphs": bool,
                 "warmup_ms": float, "rep_ms": float, "compile_on_cpu": bool, "budget_s": float | null,
                 "check": bool},
      "ceilings": null | {"gemm_tflops": float, "gemm_shape": [m, n, k], "gemm_dtype": str,
                          "copy_gbps": float, "copy_bytes": int},
      "rows": [row, ...],
      "wall_s": float,
      "complete": bool                       # false while the run is in progress or was cut short
    }

    row = {
      "op": str, "provider": str, "mode": "fwd" | "fwd+bwd" | "train",
      "shape": {param: int | float | str | bool | null},  "label": str, "dtype": "bf16" | "fp16" | "fp32",
      "device": "cuda" | "cpu", "status": "ok" | "skipped" | "error", "note": str | null,
      "median_ms": float | null, "p20_ms": float | null, "p80_ms": float | null,
      "min_ms": float | null, "n_reps": int | null,
      "flops": int | null, "bytes": int | null,           # benchmarks.flops, for this mode
      "tflops": float | null, "gbps": float | null,       # flops / median, bytes / median
      "pct_of_ceiling": float | null, "bound": "compute" | "memory" | null,   # null on CPU
      "speedup_vs": {reference_provider: float},          # reference median / this median (>1: faster)
      "best_reference": str | null,                       # vitkern rows: the fastest reference of the case
      "speedup_vs_best": float | null,                    #   and its median / this median
      "max_abs_err": float | null, "err_ok": bool | null, # vs the torch provider, same dtype
      "peak_mem_bytes": int | null,                       # CUDA: peak allocated during one call,
                                                          # above what was allocated before it
      "items_per_s": float | null,                        # images/s where a setup defines items
      "cuda_graph": bool | null,                          # CUDA: timed as graph replays; null on CPU
      "input_copies": int | null,                         # rotating input copies (1: none)
      "l2_flush": bool | null                             # L2 flushed before each repetition
    }

A reference provider is any whose name does not start with "vitkern" (:func:`benchmarks.report.is_reference`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from benchmarks.flops import ALL_MODES, TRAIN_MODE
from benchmarks.report import best_reference, is_reference, render_headline
from benchmarks.setups import Case, Setup, Unavailable, discover, shape_label
from benchmarks.setups._attention_refs import ATTENTION_PROVIDERS

__all__ = [
    "SCHEMA_VERSION",
    "PROVIDERS",
    "EXTRA_PROVIDERS",
    "ALL_PROVIDERS",
    "REFERENCE_PROVIDERS",
    "ROW_FIELDS",
    "Timing",
    "measure",
    "ProviderSkipped",
    "Prepared",
    "load_vitkern",
    "prepare",
    "reference_result",
    "environment",
    "measure_ceilings",
    "run",
    "validate_row",
    "validate_results",
    "render_markdown",
    "main",
]

SCHEMA_VERSION = 2
REPO_ROOT = Path(__file__).resolve().parent.parent

# Report order. The torch provider always runs first: its results are the correctness reference.
PROVIDERS = ("vitkern", "vitkern-triton", "vitkern-cuda", "vitkern-reference", "torch", "torch.compile")
# References that only some cases supply, through Case.references: torchvision for the model
# setups; SDPA held to one backend, flash-attn and xformers for the attention setups.
EXTRA_PROVIDERS = ("torchvision",) + ATTENTION_PROVIDERS
ALL_PROVIDERS = PROVIDERS + EXTRA_PROVIDERS
# Every provider that is not vitkern's: the ratios speedup_vs are against these.
REFERENCE_PROVIDERS = tuple(p for p in ALL_PROVIDERS if is_reference(p))
_VITKERN_BACKENDS = {"vitkern": "auto", "vitkern-triton": "triton", "vitkern-cuda": "cuda", "vitkern-reference": "reference"}
# Rotating input copies: the pool of copies is at least this many times the L2 cache.
ROTATE_L2_FACTOR = 2.0
ROTATE_MAX_COPIES = 256
ROTATE_MAX_POOL_BYTES = 4 << 30
DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100 SXM; the device's own size is used when torch reports it
# FLOP per byte above which a case counts as compute bound when no ceilings were measured
# (an H100's bf16 GEMM / copy ceilings: ~800 TFLOP/s over ~3 TB/s).
DEFAULT_RIDGE = 250.0

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# err_ok: max_abs_err <= tol * max(1, max |reference|)
_TOLERANCE = {"bf16": 4e-2, "fp16": 1e-2, "fp32": 2e-3}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


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


def _sync(device: torch.device) -> None:
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


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------


class ProviderSkipped(Unavailable):
    """A provider that does not apply here (e.g. torch.compile on the CPU); the message says why.

    The runner treats its base class :class:`benchmarks.setups.Unavailable`, raised while preparing
    or by the first call (an SDPA backend that refuses a shape), the same way: a "skipped" row."""


_VITKERN: dict = {}


def load_vitkern() -> tuple[Optional[ModuleType], Optional[str]]:
    """``(vitkern, None)``, or ``(None, reason)`` when it cannot be imported (cached)."""
    if "module" not in _VITKERN:
        try:
            import vitkern

            _VITKERN["module"], _VITKERN["error"] = vitkern, None
        except Exception as exc:  # a broken install must not stop the torch baselines
            _VITKERN["module"], _VITKERN["error"] = None, f"{type(exc).__name__}: {exc}"
    return _VITKERN["module"], _VITKERN["error"]


def _is_backend_unavailable(exc: BaseException) -> bool:
    vk = _VITKERN.get("module")
    cls = getattr(vk, "BackendUnavailableError", None)
    if cls is not None and isinstance(exc, cls):
        return True
    return type(exc).__name__ == "BackendUnavailableError"


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@dataclass
class Prepared:
    """One provider's zero-argument call for one case and mode, and the context it runs in.

    ``call_with(args)`` runs the same on other copies of the case's inputs (rotating buffers: see
    :func:`input_pool`); ``args`` are the case's own."""

    call: Callable[[], Any]
    context: Callable[[], ContextManager]
    note: Optional[str] = None
    call_with: Optional[Callable[[tuple], Any]] = None
    args: tuple = ()


def _grad_call(fn, args, leaves, grad_outputs):
    def call():
        pairs = [(o, g) for o, g in zip(_tensors(fn(*args)), grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)

    return call


def _grad_call_with(fn, args0, leaves, grad_outputs):
    """``call_with(args)``: forward and ``autograd.grad`` for a copy of ``args0``; a leaf that is one
    of ``args0`` is replaced by the copy's tensor at that position (other leaves, such as module
    parameters, are shared)."""
    position = {id(a): i for i, a in enumerate(args0) if isinstance(a, torch.Tensor)}
    slots = [position.get(id(leaf)) for leaf in leaves]
    grad_outputs = list(grad_outputs)

    def call_with(args):
        these = [leaf if i is None else args[i] for leaf, i in zip(leaves, slots)]
        pairs = [(o, g) for o, g in zip(_tensors(fn(*args)), grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], these, [g for _, g in pairs], allow_unused=True)

    return call_with


def reference_result(case: Case, mode: str):
    """The torch provider's result for ``mode`` (outputs for "fwd", input gradients for "fwd+bwd",
    the step's result for "train") and the output gradients that every provider's backward uses:
    ``(result, grad_outputs)``."""
    if mode == TRAIN_MODE:
        if case.train_step is None:
            raise ValueError("this case has no training step (Case.train_step)")
        out = case.train_step("torch", _unchanged)(*case.args)
        return [t.detach() if t is not None else None for t in _flat(out)], []
    with torch.no_grad():
        outs = _tensors(case.torch_fn(*case.args))
    gen = torch.Generator(device=outs[0].device).manual_seed(1234) if outs else None
    grad_outputs = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outs]
    if mode == "fwd":
        return [o.detach() for o in outs], grad_outputs
    grads = _grad_call(case.torch_fn, case.args, case.grad_inputs, grad_outputs)()
    return [g.detach() if g is not None else None for g in grads], grad_outputs


def prepare(
    case: Case,
    provider: str,
    mode: str,
    device: torch.device,
    grad_outputs: Sequence[torch.Tensor] = (),
    *,
    compile_on_cpu: bool = False,
    op: Optional[str] = None,
    whole_model: bool = False,
) -> Prepared:
    """The callable that runs ``provider`` on ``case`` in ``mode``.

    ``op`` (the setup's name) lets the note of the "vitkern" provider say when "auto" can only
    reach the reference on a GPU because no kernel backend is registered for the op, and lets
    "vitkern-cuda" skip the ops the CUDA extension does not implement; ``whole_model`` (a model setup,
    whose network uses several ops) turns that skip off.

    Raises :class:`ProviderSkipped` when the provider does not apply; other exceptions (a failed
    vitkern import) propagate.
    """
    if provider not in ALL_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {ALL_PROVIDERS}")
    if mode not in ALL_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {ALL_MODES}")
    if mode == TRAIN_MODE and case.train_step is None:
        raise ProviderSkipped("this case has no training step")
    note = None
    backend_ctx: Callable[[], ContextManager] = contextlib.nullcontext
    model, wrap = provider, _unchanged  # (train mode) whose training step, and how its forward is wrapped
    if provider == "vitkern-cuda":
        if device.type != "cuda":
            raise ProviderSkipped("the CUDA extension runs on CUDA tensors only (this is a CPU run)")
        vk, _ = load_vitkern()
        cuda_ops = tuple(getattr(getattr(vk, "_backend", None), "CUDA_EXTENSION_OPS", ()) or ())
        if vk is not None and op is not None and not whole_model and op not in cuda_ops:
            raise ProviderSkipped(
                f"the CUDA extension has no {op} kernel (it implements {', '.join(sorted(cuda_ops)) or 'none'}); "
                "use_backend('cuda') would run 'auto' here"
            )
    if provider == "torch":
        fn = case.torch_fn
        note = case.torch_label
    elif provider == "torch.compile":
        if device.type != "cuda" and not compile_on_cpu:
            raise ProviderSkipped("torch.compile runs on GPU only by default (a CPU compile costs ~20 s; --compile-on-cpu)")
        import torch._dynamo as dynamo  # (not "import torch._dynamo": that would make torch a local name here)

        dynamo.reset()  # a fresh compile per case: no recompile limit, no automatic dynamic shapes
        model, wrap = "torch", lambda f: torch.compile(f, dynamic=False)
        fn = wrap(case.torch_fn) if mode != TRAIN_MODE else None
        note = f"torch.compile({case.torch_label})"
    elif provider in EXTRA_PROVIDERS:
        ref = case.references.get(provider)
        if ref is None or ref.fn is None:
            raise ProviderSkipped(ref.label if ref is not None else f"no {provider} reference for this case")
        fn, note = ref.fn, ref.label
    else:
        vk, err = load_vitkern()
        if vk is None:
            raise RuntimeError(f"import vitkern failed: {err}")
        fn = case.vitkern_fn(vk)
        model = "vitkern"
        backend = _VITKERN_BACKENDS[provider]
        backend_ctx = lambda: vk.use_backend(backend)  # noqa: E731 (use_backend switches on construction)
        if device.type == "cpu" and provider != "vitkern-reference":
            from vitkern._backend import triton_interpreting

            if triton_interpreting():
                note = "Triton interpreter (TRITON_INTERPRET=1): checks correctness, the time means nothing"
            elif provider == "vitkern":
                note = "auto -> reference on the CPU"
        elif provider == "vitkern" and op is not None:
            try:
                registered = tuple(vk._backend.registered_backends(op))
            except Exception:
                registered = ()
            if registered and not any(b in registered for b in ("triton", "cuda")):
                note = "auto -> reference: no kernel backend registered for this op"

    args = tuple(case.args)
    if mode == TRAIN_MODE:
        step = case.train_step(model, wrap)
        call_with = lambda a: step(*a)  # noqa: E731
        context = backend_ctx
    elif mode == "fwd":
        call_with = lambda a: fn(*a)  # noqa: E731

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.no_grad())
            stack.enter_context(backend_ctx())
            return stack

    else:
        call_with = _grad_call_with(fn, args, list(case.grad_inputs), list(grad_outputs))
        context = backend_ctx
    return Prepared(call=lambda: call_with(args), context=context, note=note, call_with=call_with, args=args)


def _unchanged(fn):
    return fn


def _flat(out) -> list:
    """Tensors (and None placeholders, e.g. unused gradients) of a nested output, in order."""
    if out is None or isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _max_abs_err(result, reference) -> tuple[Optional[float], float]:
    """(max |result - reference| over all tensors, max |reference|); None when they do not match up."""
    got, want = _flat(result), _flat(reference)
    if len(got) != len(want):
        return None, 0.0
    err, scale = 0.0, 0.0
    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        if g is None or w is None:
            return None, 0.0
        if tuple(g.shape) != tuple(w.shape):
            return None, 0.0
        diff = (g.detach().float() - w.float()).abs()
        d = float(diff.max()) if diff.numel() else 0.0
        err = math.inf if not math.isfinite(d) else max(err, d)  # (max() would drop a NaN)
        scale = max(scale, float(w.float().abs().max()) if w.numel() else 0.0)
    return err, scale


# ------------------------------------------------------------------------------------------------
# Environment and ceilings
# ------------------------------------------------------------------------------------------------


def _run_quiet(cmd: Sequence[str], cwd=None, timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _cpu_name() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _fp32_precision() -> Optional[str]:
    try:
        return str(torch.backends.cuda.matmul.fp32_precision)
    except Exception:
        try:
            return torch.get_float32_matmul_precision()
        except Exception:
            return None


def environment(device: torch.device) -> dict:
    """Where the numbers come from: device, driver and library versions, commit and date (no hostname)."""
    vk, vk_err = load_vitkern()
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": _cpu_name() or "cpu",
        "device_count": 1,
        "compute_capability": None,
        "gpu_memory_bytes": None,
        "l2_cache_bytes": None,
        "driver_version": None,
        "cuda_version": torch.version.cuda,
        "cudnn_version": None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "xformers": _version("xformers"),
        "python": platform.python_version(),
        "vitkern": getattr(vk, "__version__", None),
        "vitkern_import_error": vk_err,
        "cuda_extension_available": None,
        "backend_default": None,
        "git_commit": None,
        "git_dirty": None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "torch_num_threads": torch.get_num_threads(),
        "matmul_fp32_precision": _fp32_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_count"] = torch.cuda.device_count()
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = int(props.total_memory)
        l2 = getattr(props, "L2_cache_size", None)
        env["l2_cache_bytes"] = int(l2) if l2 else None
        try:
            env["cudnn_version"] = torch.backends.cudnn.version()
        except Exception:
            pass
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver_version"] = smi.splitlines()[0].strip() if smi else None
    if vk is not None:
        try:
            env["cuda_extension_available"] = bool(vk.cuda_extension_available())
        except Exception:
            env["cuda_extension_available"] = None
        try:
            env["backend_default"] = vk.get_backend()
        except Exception:
            pass
    commit = _run_quiet(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit:
        env["git_commit"] = commit
        status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
        env["git_dirty"] = bool(status) if status is not None else None
    return env


def _gemm_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: torch.mm(a, b), device, flush_l2=False, warmup_ms=100, rep_ms=300)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def _copy_ceiling(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, flush_l2=False, warmup_ms=50, rep_ms=200)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9  # read + write


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """GPU ceilings for ``pct_of_ceiling``: an 8192^3 GEMM in ``dtype`` (cuBLAS through torch.mm)
    and a 1 GiB device-to-device copy, each the median of many repetitions (about 0.5 s each)."""
    n, nbytes = 8192, 1 << 30
    gemm_tflops = _gemm_ceiling(device, dtype, n)
    copy_gbps = _copy_ceiling(device, nbytes)
    torch.cuda.empty_cache()
    return {
        "gemm_tflops": round(gemm_tflops, 2),
        "gemm_shape": [n, n, n],
        "gemm_dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "copy_gbps": round(copy_gbps, 1),
        "copy_bytes": nbytes,
    }


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------

ROW_FIELDS: dict[str, tuple] = {
    "op": (str,),
    "provider": (str,),
    "mode": (str,),
    "shape": (dict,),
    "label": (str,),
    "dtype": (str,),
    "device": (str,),
    "status": (str,),
    "note": (str, type(None)),
    "median_ms": (float, type(None)),
    "p20_ms": (float, type(None)),
    "p80_ms": (float, type(None)),
    "min_ms": (float, type(None)),
    "n_reps": (int, type(None)),
    "flops": (int, type(None)),
    "bytes": (int, type(None)),
    "tflops": (float, type(None)),
    "gbps": (float, type(None)),
    "pct_of_ceiling": (float, type(None)),
    "bound": (str, type(None)),
    "speedup_vs": (dict,),
    "max_abs_err": (float, type(None)),
    "err_ok": (bool, type(None)),
    "peak_mem_bytes": (int, type(None)),
    "items_per_s": (float, type(None)),
    "best_reference": (str, type(None)),
    "speedup_vs_best": (float, type(None)),
    "cuda_graph": (bool, type(None)),
    "input_copies": (int, type(None)),
    "l2_flush": (bool, type(None)),
}
_STATUSES = ("ok", "skipped", "error")
_ENV_FIELDS = (
    "device_type", "device_name", "device_count", "compute_capability", "gpu_memory_bytes", "l2_cache_bytes",
    "driver_version", "cuda_version", "cudnn_version", "torch", "triton", "timm", "torchvision", "flash_attn",
    "xformers", "python", "vitkern", "vitkern_import_error",
    "cuda_extension_available", "backend_default", "git_commit", "git_dirty", "date", "platform", "cpu",
    "cpu_count", "torch_num_threads", "matmul_fp32_precision", "triton_interpret",
)
_CONFIG_FIELDS = (
    "ops", "model_ops", "providers", "modes", "dtype", "device", "quick", "batch", "models", "flush_l2", "rotate",
    "cuda_graphs", "warmup_ms", "rep_ms", "compile_on_cpu", "budget_s", "check",
)


class SchemaError(ValueError):
    """A results document or row that does not follow the schema in this module's docstring."""


def _new_row(setup: Setup, shape: dict, provider: str, mode: str, dtype_name: str, device: torch.device, case: Optional[Case]) -> dict:
    cost = case.cost if case is not None else None
    return {
        "op": setup.name,
        "provider": provider,
        "mode": mode,
        "shape": dict(shape),
        "label": shape_label(shape),
        "dtype": dtype_name,
        "device": device.type,
        "status": "ok",
        "note": None,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "min_ms": None,
        "n_reps": None,
        "flops": cost.flops_for(mode) if cost is not None else None,
        "bytes": cost.bytes_for(mode) if cost is not None else None,
        "tflops": None,
        "gbps": None,
        "pct_of_ceiling": None,
        "bound": None,
        "speedup_vs": {},
        "max_abs_err": None,
        "err_ok": None,
        "peak_mem_bytes": None,
        "items_per_s": None,
        "best_reference": None,
        "speedup_vs_best": None,
        "cuda_graph": None,
        "input_copies": None,
        "l2_flush": None,
    }


def _fill_timing(row: dict, t: Timing, ceilings: Optional[dict], items: Optional[int]) -> None:
    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, min_ms=t.min_ms, n_reps=t.n_reps)
    seconds = t.median_ms * 1e-3
    if seconds <= 0:
        return
    if row["flops"] is not None:
        row["tflops"] = row["flops"] / seconds / 1e12
    if row["bytes"] is not None:
        row["gbps"] = row["bytes"] / seconds / 1e9
    if items:
        row["items_per_s"] = items / seconds
    if ceilings:
        compute_s = (row["flops"] or 0) / (ceilings["gemm_tflops"] * 1e12)
        memory_s = (row["bytes"] or 0) / (ceilings["copy_gbps"] * 1e9)
        floor_s = max(compute_s, memory_s)
        if floor_s > 0:
            row["pct_of_ceiling"] = 100.0 * floor_s / seconds
            row["bound"] = "compute" if compute_s >= memory_s else "memory"


def _fill_speedups(rows: list[dict]) -> None:
    """For rows of one (op, shape, mode): speedup_vs[ref] = ref median / this median, and for
    vitkern's rows the fastest reference (best_reference) and the ratio against it."""
    refs = {r["provider"]: r["median_ms"] for r in rows if is_reference(r["provider"]) and r["status"] == "ok"}
    best = best_reference(rows)
    for row in rows:
        if row["status"] != "ok" or not row["median_ms"]:
            continue
        row["speedup_vs"] = {p: ms / row["median_ms"] for p, ms in refs.items() if p != row["provider"] and ms}
        if best is not None and not is_reference(row["provider"]):
            row["best_reference"] = best["provider"]
            row["speedup_vs_best"] = best["median_ms"] / row["median_ms"]


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_row(row: Any) -> None:
    """Raise :class:`SchemaError` listing every way ``row`` departs from the row schema."""
    problems = []
    if not isinstance(row, dict):
        raise SchemaError(f"row must be a dict, got {type(row).__name__}")
    missing = [k for k in ROW_FIELDS if k not in row]
    extra = [k for k in row if k not in ROW_FIELDS]
    if missing:
        problems.append(f"missing fields {missing}")
    if extra:
        problems.append(f"unknown fields {extra}")
    for key, types in ROW_FIELDS.items():
        if key not in row:
            continue
        value = row[key]
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            continue  # JSON writes 2.0 as 2.0, but hand-written rows may hold ints
        if isinstance(value, bool) and bool not in types:
            problems.append(f"{key} must be {'/'.join(t.__name__ for t in types)}, got bool")
        elif not isinstance(value, types):
            problems.append(f"{key} must be {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")
    if row.get("mode") not in ALL_MODES:
        problems.append(f"mode must be one of {ALL_MODES}, got {row.get('mode')!r}")
    if row.get("status") not in _STATUSES:
        problems.append(f"status must be one of {_STATUSES}, got {row.get('status')!r}")
    if row.get("dtype") not in DTYPES:
        problems.append(f"dtype must be one of {tuple(DTYPES)}, got {row.get('dtype')!r}")
    if row.get("device") not in ("cuda", "cpu"):
        problems.append(f"device must be 'cuda' or 'cpu', got {row.get('device')!r}")
    if row.get("bound") not in (None, "compute", "memory"):
        problems.append(f"bound must be null, 'compute' or 'memory', got {row.get('bound')!r}")
    if row.get("status") == "ok":
        for key in ("median_ms", "p20_ms", "p80_ms", "n_reps"):
            if row.get(key) is None:
                problems.append(f"an ok row needs {key}")
        if None not in (row.get("p20_ms"), row.get("median_ms"), row.get("p80_ms")):
            if not row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]:
                problems.append("p20_ms <= median_ms <= p80_ms does not hold")
    elif not row.get("note"):
        problems.append(f"a {row.get('status')!r} row needs a note saying why")
    if row.get("device") == "cpu" and row.get("pct_of_ceiling") is not None:
        problems.append("pct_of_ceiling must be null on the CPU")
    speedups = row.get("speedup_vs")
    if isinstance(speedups, dict):
        for k, v in speedups.items():
            if not isinstance(k, str) or not is_reference(k) or not isinstance(v, (int, float)) or isinstance(v, bool):
                problems.append(f"speedup_vs entry {k!r}: {v!r} is not a reference provider's ratio")
    best = row.get("best_reference")
    if best is not None and (not isinstance(best, str) or not is_reference(best)):
        problems.append(f"best_reference must be a reference provider, got {best!r}")
    if (best is None) != (row.get("speedup_vs_best") is None):
        problems.append("best_reference and speedup_vs_best are set together")
    if row.get("input_copies") is not None and not (isinstance(row["input_copies"], int) and row["input_copies"] >= 1):
        problems.append("input_copies must be null or a positive int")
    if row.get("device") == "cpu" and row.get("cuda_graph"):
        problems.append("cuda_graph must not be true on the CPU")
    shape = row.get("shape")
    if isinstance(shape, dict):
        for k, v in shape.items():
            if not isinstance(v, (int, float, str, bool, type(None))):
                problems.append(f"shape[{k!r}] must be a JSON scalar, got {type(v).__name__}")
    if problems:
        raise SchemaError(f"bad row {row.get('op')}/{row.get('provider')}/{row.get('mode')}: " + "; ".join(problems))


def validate_results(doc: Any) -> None:
    """Raise :class:`SchemaError` if ``doc`` (a parsed results.json) departs from the schema."""
    if not isinstance(doc, dict):
        raise SchemaError("results must be a JSON object")
    problems = []
    for key in ("schema_version", "environment", "config", "ceilings", "rows", "wall_s", "complete"):
        if key not in doc:
            problems.append(f"missing {key!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version must be {SCHEMA_VERSION}, got {doc.get('schema_version')!r}")
    env = doc.get("environment")
    if not isinstance(env, dict):
        problems.append("environment must be an object")
    else:
        missing = [k for k in _ENV_FIELDS if k not in env]
        if missing:
            problems.append(f"environment lacks {missing}")
        if any(k in env for k in ("hostname", "host", "node")):
            problems.append("environment must not record the hostname")
    config = doc.get("config")
    if not isinstance(config, dict) or [k for k in _CONFIG_FIELDS if k not in config]:
        problems.append(f"config must be an object with {list(_CONFIG_FIELDS)}")
    ceilings = doc.get("ceilings")
    if ceilings is not None:
        if not isinstance(ceilings, dict) or not all(k in ceilings for k in ("gemm_tflops", "copy_gbps")):
            problems.append("ceilings must be null or hold gemm_tflops and copy_gbps")
    if not isinstance(doc.get("rows"), list):
        problems.append("rows must be a list")
    if problems:
        raise SchemaError("; ".join(problems))
    for row in doc["rows"]:
        validate_row(row)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    ops: list
    providers: list
    modes: list
    dtype: str
    device: str
    quick: bool = False
    batch: Any = None  # None, an int, or a list of ints (a batch sweep)
    models: Optional[list] = None  # model names (a model setup's shape "name") to keep; None: all
    model_ops: list = field(default_factory=list)  # the setups in ops that are whole models (Setup.kind)
    flush_l2: bool = True
    rotate: str = "auto"  # "auto" | "always" | "never": rotating input copies (see should_rotate)
    cuda_graphs: bool = False
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    compile_on_cpu: bool = False
    budget_s: Optional[float] = None
    check: bool = True


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Progress:
    """A progress bar on a terminal (tqdm, when installed), one line per case in a log, or nothing."""

    def __init__(self, total: int, verbose: bool):
        self.total, self.verbose, self.bar = total, verbose, None
        if verbose and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def start(self, index: int, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:60])
        elif self.verbose:
            _log(f"[{index}/{self.total}] {text}")

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plan_cases(setups: dict[str, Setup], config: RunConfig, device_type: str) -> list[tuple]:
    """``(shape index, setup index, setup, shape)`` in run order: every setup's first shape, then every
    setup's second shape, and so on. ``config.models`` keeps only the listed models' shapes of the
    model setups (op setups are not filtered)."""
    per_setup = []
    for si, s in enumerate(setups.values()):
        names = config.models if (config.models and s.kind == "model") else None
        per_setup.append((si, s, s.shapes(device_type, quick=config.quick, batch=config.batch, names=names)))
    return sorted(
        ((shi, si, s, shape) for si, s, shapes in per_setup for shi, shape in enumerate(shapes)),
        key=lambda item: (item[0], item[1]),
    )


def run(
    setups: dict[str, Setup],
    config: RunConfig,
    *,
    ceilings: Optional[dict] = None,
    on_progress: Optional[Callable[[list], None]] = None,
    verbose: bool = True,
) -> list[dict]:
    """Run every (setup, shape, mode, provider) and return the rows, grouped by op then shape.

    Cases run breadth first (:func:`plan_cases`), so a time budget (``config.budget_s``; the cases
    past it become "skipped" rows) cuts the extra shapes rather than whole ops. ``on_progress(rows)``
    is called after each case (the CLI rewrites results.json there, so a run cut short still leaves
    its rows).
    """
    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]
    start = time.perf_counter()
    order = list(dict.fromkeys(p for p in ("torch",) + ALL_PROVIDERS if p in config.providers))
    plan = plan_cases(setups, config, device.type)
    results: dict[tuple, list] = {}
    progress = _Progress(len(plan), verbose)

    def ordered_rows() -> list[dict]:
        return [row for key in sorted(results, key=lambda k: (k[1], k[0])) for row in results[key]]

    for index, (shi, si, setup, shape) in enumerate(plan, 1):
        label = shape_label(shape)
        modes = [m for m in ALL_MODES if m in config.modes and m in setup.shape_modes(shape)]
        rows = results.setdefault((shi, si), [])
        over_budget = config.budget_s is not None and time.perf_counter() - start > config.budget_s
        progress.start(index, f"{setup.name} {label}" + (" (skipped: time budget)" if over_budget else ""))
        if over_budget:
            for mode in modes:
                for provider in _core(order):
                    row = _new_row(setup, shape, provider, mode, config.dtype, device, None)
                    row.update(status="skipped", note=f"time budget of {config.budget_s:g} s exhausted")
                    rows.append(row)
            progress.done()
            continue
        try:
            torch.manual_seed(0)
            case = setup.build(shape, dtype, device)
        except Exception as exc:
            for mode in modes:
                for provider in _core(order):
                    row = _new_row(setup, shape, provider, mode, config.dtype, device, None)
                    row.update(status="error", note=f"building the case failed: {_short(exc)}")
                    rows.append(row)
            progress.done()
            continue
        for mode in modes:
            rows.extend(_run_mode(setup, shape, case, mode, order, config, device, ceilings))
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.done()
        if on_progress is not None:
            on_progress(ordered_rows())
    progress.close()
    return ordered_rows()


def _core(order: list) -> list:
    """The providers every case has (the extra references come from a built case)."""
    return [p for p in order if p not in EXTRA_PROVIDERS]


def _l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
            if l2:
                return int(l2)
        except Exception:
            pass
    return DEFAULT_L2_BYTES


def _check(row: dict, result, reference, dtype_name: str) -> None:
    err, scale = _max_abs_err(result, reference)
    if err is None:
        row["err_ok"] = False
        row["note"] = _join(row["note"], "outputs do not match the reference's count/shapes")
    elif not math.isfinite(err):
        row["err_ok"] = False
        row["note"] = _join(row["note"], "non-finite values (NaN/inf) where the reference is finite")
    else:
        row["max_abs_err"] = err
        row["err_ok"] = bool(err <= _TOLERANCE[dtype_name] * max(1.0, scale))


def _check_replay(row: dict, output, reference, dtype_name: str, device: torch.device) -> None:
    """The graph's output after its last replay against the reference: a replay that computes
    something else (a stale input, a kernel that was not captured) marks the row outside tolerance."""
    _sync(device)
    probe = {"note": None, "err_ok": None, "max_abs_err": None}
    _check(probe, output, reference, dtype_name)
    if probe["err_ok"] is False:
        row["err_ok"] = False
        detail = probe["note"] or f"max abs err {probe['max_abs_err']:.3g}"
        row["note"] = _join(row["note"], f"CUDA graph replay output differs from the reference ({detail})")


def _timed_call(prepared: Prepared, row: dict, config: RunConfig, device: torch.device, ridge: float):
    """The callable to time and the L2 flush setting, after choosing (and recording in ``row``) the
    method: a CUDA graph replay (``--cuda-graphs``), rotating input copies, or the plain call."""
    on_gpu = device.type == "cuda"
    flush = config.flush_l2 and on_gpu
    if on_gpu and config.cuda_graphs and row["mode"] == TRAIN_MODE:
        # a failed capture would leave garbage in the parameters' .grad (and AdamW needs
        # capturable=True): training steps are timed eagerly
        row["note"] = _join(row["note"], "training steps are not captured: timed without a CUDA graph")
    elif on_gpu and config.cuda_graphs:
        row["input_copies"] = 1
        try:
            replay = cuda_graph_call(prepared.call, device)
        except Exception as exc:
            row["cuda_graph"] = False
            row["note"] = _join(row["note"], f"CUDA graph capture failed, timed without a graph: {_short(exc, 160)}")
            torch.cuda.synchronize(device)
            row["l2_flush"] = flush
            return prepared.call, flush
        row["cuda_graph"] = True
        row["l2_flush"] = flush
        return replay, flush
    if on_gpu:
        row["cuda_graph"] = False
    copies = 1
    if prepared.call_with is not None and should_rotate(config.rotate, on_gpu, row["mode"], row["flops"], row["bytes"], ridge):
        l2 = _l2_bytes(device)
        copies = rotation_copies(tensor_bytes(prepared.args), l2)
        if copies > 1:
            pool = input_pool(prepared.args, copies)
            # the copies only stand in for a flush if they really exceed the L2
            flush = flush and tensor_bytes(prepared.args) * (copies - 1) < ROTATE_L2_FACTOR * l2
            row["input_copies"], row["l2_flush"] = copies, flush
            return RotatingCall(prepared.call_with, pool), flush
    row["input_copies"], row["l2_flush"] = 1, flush
    return prepared.call, flush


def _run_mode(setup, shape, case, mode, order, config, device, ceilings) -> list[dict]:
    group = []
    reference, grad_outputs = None, []
    ridge = ceilings["gemm_tflops"] * 1e3 / ceilings["copy_gbps"] if ceilings else DEFAULT_RIDGE
    try:
        reference, grad_outputs = reference_result(case, mode)
        _sync(device)
    except Exception as exc:
        reference_error = _short(exc)
    else:
        reference_error = None
    for provider in order:
        if provider in EXTRA_PROVIDERS and provider not in case.references:
            continue  # a reference this case does not have at all (e.g. torchvision for an op): no row
        row = _new_row(setup, shape, provider, mode, config.dtype, device, case)
        group.append(row)
        if provider == "torch" and reference_error is not None:
            row.update(status="error", note=reference_error)
            continue
        try:
            prepared = prepare(
                case, provider, mode, device, grad_outputs, compile_on_cpu=config.compile_on_cpu, op=setup.name,
                whole_model=setup.kind == "model",
            )
        except Unavailable as exc:
            row.update(status="skipped", note=str(exc))
            continue
        except Exception as exc:
            row.update(status="error", note=_short(exc))
            continue
        row["note"] = prepared.note
        interpreted = bool(prepared.note and prepared.note.startswith("Triton interpreter"))
        pool_fn = None
        try:
            with prepared.context():
                result = prepared.call()  # first call: compiles, autotunes, checks
                _sync(device)
                if config.check and reference is not None and provider != "torch":
                    _check(row, result, reference, config.dtype)
                del result
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    prepared.call()
                    torch.cuda.synchronize(device)
                    row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
                if interpreted:
                    timing = measure(prepared.call, device, warmup=0, reps=2)
                else:
                    pool_fn, flush = _timed_call(prepared, row, config, device, ridge)
                    timing = measure(pool_fn, device, warmup_ms=config.warmup_ms, rep_ms=config.rep_ms, flush_l2=flush)
                    if isinstance(pool_fn, GraphReplay) and config.check and reference is not None and provider != "torch":
                        _check_replay(row, pool_fn.output, reference, config.dtype, device)
        except Exception as exc:
            if isinstance(exc, Unavailable) or _is_backend_unavailable(exc):
                row.update(status="skipped", note=_short(exc) if not isinstance(exc, Unavailable) else str(exc))
            else:
                row.update(status="error", note=_short(exc))
                if os.environ.get("VITKERN_BENCH_TRACEBACK") == "1":
                    traceback.print_exc()
            continue
        finally:
            del pool_fn  # the input copies / the CUDA graph, before the next provider
        _fill_timing(row, timing, ceilings if device.type == "cuda" else None, case.items)
    _fill_speedups(group)
    return group


def _join(a: Optional[str], b: str) -> str:
    return f"{a}; {b}" if a else b


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------

CPU_BANNER = (
    "No CUDA device: kernel timings need a GPU. This is the CPU reference path: vitkern runs its "
    "PyTorch reference here (backend auto -> reference), the Triton provider is skipped, and the "
    "times below are CPU wall clock at tiny shapes, which say nothing about kernel speed. Each "
    "provider's output is checked against the torch module (max abs err)."
)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _fmt_rate(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.01 else f"{value:.4f}"


class _Notes:
    """Footnotes: long notes (skip reasons, errors) become ``[n]`` in a table cell."""

    def __init__(self):
        self.texts: dict[str, int] = {}

    def ref(self, text: Optional[str]) -> str:
        if not text:
            return ""
        if text not in self.texts:
            self.texts[text] = len(self.texts) + 1
        return f"[{self.texts[text]}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {text}" for text, n in self.texts.items()]


# The references that get a column of their own in the console table (the full Markdown tables show
# every reference); the others are in the "vs best" column when they are the fastest.
_PRIMARY_REFERENCES = ("torch", "torch.compile", "torchvision")


def _layout(rows: list[dict], full: bool = True) -> tuple[list[str], bool, bool]:
    refs = [
        p for p in REFERENCE_PROVIDERS
        if (full or p in _PRIMARY_REFERENCES) and any(r["provider"] == p and r["status"] == "ok" for r in rows)
    ]
    on_gpu = any(r["device"] == "cuda" for r in rows)
    show_items = any(r["items_per_s"] is not None for r in rows)
    return refs, on_gpu, show_items


def _groups(rows: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """Rows grouped by (op, shape, dtype) in run order, each group sorted by mode then provider."""
    rank = {p: i for i, p in enumerate(ALL_PROVIDERS)}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["op"], r["label"], r["dtype"]), []).append(r)
    out = []
    for (op, label, dtype), members in groups.items():
        members = sorted(members, key=lambda r: (ALL_MODES.index(r["mode"]) if r["mode"] in ALL_MODES else 9, rank.get(r["provider"], 99)))
        out.append((op, label, dtype, members))
    return out


def _header(refs, on_gpu, show_items, *, full: bool) -> list[str]:
    header = ["mode", "provider", "median ms", "p20-p80 ms" if full else "spread", "TFLOP/s", "GB/s"]
    if on_gpu:
        header += ["% ceil", "peak mem"]
    if show_items:
        header += ["img/s"]
    header += [f"vs {p}" if full else f"vs {p.replace('torch.compile', 'compile')}" for p in refs]
    header += ["vs best"]
    if full and on_gpu:
        header += ["timing"]
    return header + ["max abs err", "note"]


def _timing_method(r: dict) -> str:
    if r["status"] != "ok":
        return ""
    if r["device"] != "cuda":
        return "wall clock"
    if r["cuda_graph"]:
        return "CUDA graph"
    parts = []
    if r["input_copies"] and r["input_copies"] > 1:
        parts.append(f"{r['input_copies']} input copies")
    if r["l2_flush"]:
        parts.append("L2 flush")
    return ", ".join(parts) or "warm L2"


def _cells(r: dict, refs, on_gpu, show_items, notes: _Notes, *, full: bool) -> list[str]:
    ok = r["status"] == "ok"
    if ok:
        spread = (
            f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
            if full
            else f"±{50 * (r['p80_ms'] - r['p20_ms']) / r['median_ms']:.0f}%" if r["median_ms"] else "-"
        )
    else:
        spread = ""
    cells = [r["mode"], r["provider"], f"{r['median_ms']:.4g}" if ok else r["status"], spread, _fmt_rate(r["tflops"]), _fmt_rate(r["gbps"])]
    if on_gpu:
        pct = _fmt(r["pct_of_ceiling"], ".1f")
        cells += [pct + (f" {r['bound'][:3]}" if r["bound"] else ""), _fmt_bytes(r["peak_mem_bytes"])]
    if show_items:
        cells += [_fmt(r["items_per_s"], ".0f")]
    cells += [f"{r['speedup_vs'][p]:.2f}x" if p in r["speedup_vs"] else "-" for p in refs]
    best = r.get("best_reference")
    cells += [f"{r['speedup_vs_best']:.2f}x {best.replace('torch.compile', 'compile')}" if best else "-"]
    if full and on_gpu:
        cells += [_timing_method(r)]
    err = _fmt(r["max_abs_err"], ".1e")
    if r["err_ok"] is False:
        err += " FAIL"
    note = r["note"] or ""
    cells += [err, note if len(note) <= (60 if full else 32) else notes.ref(note)]
    return cells


def render_text(rows: list[dict]) -> str:
    """The console table as plain text (used when rich is not installed)."""
    _, on_gpu, _ = _layout(rows)
    notes = _Notes()
    lines = []
    for op, label, dtype, members in _groups(rows):
        refs, _, show_items = _layout(members, full=False)  # the reference and img/s columns this table needs
        header = _header(refs, on_gpu, show_items, full=False)
        body = [_cells(r, refs, on_gpu, show_items, notes, full=False) for r in members]
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
        lines += ["", f"{op}  {label}  {dtype}", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    if notes.texts:
        lines += ["", "notes:"] + notes.lines()
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    """One table per (op, shape), then the numbered notes. Plain text when rich is missing."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_text(rows))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file has no width to fit
    _, on_gpu, _ = _layout(rows)
    notes = _Notes()
    for op, label, dtype, members in _groups(rows):
        refs, _, show_items = _layout(members, full=False)  # the reference and img/s columns this table needs
        header = _header(refs, on_gpu, show_items, full=False)
        table = Table(
            title=f"[bold]{op}[/]  {label}  {dtype}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            padding=(0, 1),
            collapse_padding=True,
        )
        body = [_cells(r, refs, on_gpu, show_items, notes, full=False) for r in members]
        for i, h in enumerate(header):
            if h == "note":  # the one column that gives way when the terminal is narrow
                table.add_column(h, justify="left", no_wrap=True, overflow="ellipsis", min_width=4)
            else:
                width = max(len(h), *(len(c[i]) for c in body))
                table.add_column(h, justify="left" if h in ("mode", "provider") else "right", no_wrap=True, min_width=width)
        mode = None
        for r, cells in zip(members, body):
            if mode is not None and r["mode"] != mode:
                table.add_section()
            mode = r["mode"]
            style = None
            if r["status"] == "error" or r["err_ok"] is False:
                style = "red"
            elif r["status"] == "skipped":
                style = "dim"
            elif r["provider"] == "vitkern":
                style = "bold"
            table.add_row(*cells, style=style)
        console.print(table)
    if notes.texts:
        console.print("notes:", style="bold")
        for line in notes.lines():
            console.print(line, highlight=False, markup=False)


def _run_line(doc: dict) -> str:
    cfg = doc["config"]
    if cfg.get("cuda_graphs"):
        timing = "CUDA graph replay"
    elif cfg["device"] == "cuda":
        timing = f"L2 flush {'on' if cfg['flush_l2'] else 'off'}, rotating input copies {cfg.get('rotate', 'auto')}"
    else:
        timing = "CPU wall clock"
    batch = cfg.get("batch")
    batch = "" if batch is None else f", batch {batch if isinstance(batch, int) else ','.join(map(str, batch))}"
    return (
        f"Run: dtype {cfg['dtype']}, modes {', '.join(cfg['modes'])}, {'quick' if cfg['quick'] else 'full'} shapes{batch}, "
        f"{timing}, wall time {doc['wall_s']:.1f} s" + ("" if doc["complete"] else " (incomplete)") + "."
    )


def render_markdown(doc: dict, plots: Sequence[str] = ()) -> str:
    """summary.md: the headline table, environment, ceilings, the plots (file names in the same
    folder), then one table per (op, shape)."""
    env, cfg, ceil = doc["environment"], doc["config"], doc["ceilings"]
    lines = [f"# vitkern benchmarks: {env['device_name']}", ""]
    if env["device_type"] != "cuda":
        lines += [f"> {CPU_BANNER}", ""]
    lines += [
        "## Headline",
        "",
        "vitkern (backend auto) against the fastest reference measured in the same run, for each op's first "
        "shape and the first model's batch sweep; the tables further down have every shape and provider.",
        "",
        render_headline(doc).rstrip("\n"),
        "",
        _run_line(doc),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Environment", "", "| key | value |", "| --- | --- |"]
    for key in (
        "device_name", "compute_capability", "l2_cache_bytes", "driver_version", "cuda_version", "torch", "triton",
        "timm", "torchvision", "flash_attn", "xformers", "python", "vitkern", "cuda_extension_available", "git_commit",
        "git_dirty", "date", "platform", "cpu", "torch_num_threads",
    ):
        lines.append(f"| {key} | {env.get(key)} |")
    if env.get("vitkern_import_error"):
        lines.append(f"| vitkern_import_error | {env['vitkern_import_error']} |")
    lines += [""]
    if ceil:
        lines += [
            "## Ceilings (measured at the start of this run)",
            "",
            f"- GEMM {ceil['gemm_dtype']} {'x'.join(map(str, ceil['gemm_shape']))}: {ceil['gemm_tflops']:.1f} TFLOP/s",
            f"- device-to-device copy of {ceil['copy_bytes'] / 2**30:.0f} GiB: {ceil['copy_gbps']:.0f} GB/s (read + write)",
            "",
            "`% ceil` = the roofline floor max(FLOPs / GEMM ceiling, bytes / copy ceiling) as a percentage of the "
            "median time (`com`: compute bound, `mem`: memory bound).",
            "",
        ]
    lines += [
        "`vs X` = X's median / this median (above 1: faster than X), measured in the same run; `vs best` is against "
        "the fastest reference of that case (named). `max abs err` is against the torch provider in the same dtype. "
        "FLOPs and minimum bytes: `benchmarks/flops.py`."
        + (" `timing`: CUDA events per repetition, with the L2 flushed before each, or rotating copies of the "
           "inputs that exceed the L2 (memory-bound cases), or CUDA graph replays (`--cuda-graphs`)." if env["device_type"] == "cuda" else ""),
        "",
    ]
    rows = doc["rows"]
    _, on_gpu, _ = _layout(rows)
    notes = _Notes()
    current_op = None
    for op, label, dtype, members in _groups(rows):
        refs, _, show_items = _layout(members)  # the reference and img/s columns this table needs
        header = _header(refs, on_gpu, show_items, full=True)
        if op != current_op:
            lines += [f"## {op}", ""]
            current_op = op
        lines += [f"**{label}** ({dtype})", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in members:
            cells = _cells(r, refs, on_gpu, show_items, notes, full=True)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    if notes.texts:
        lines += ["## Notes", ""] + [f"- {line}" for line in notes.lines()] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_dir(device: torch.device, device_name: str) -> Path:
    """``benchmarks/results/<date>-<device>/`` on a GPU. CPU runs (not meant to be committed) go to
    the git-ignored ``benchmarks/results/_scratch/<date>-cpu/``. An existing run gets a suffix."""
    date = _dt.date.today().isoformat()
    base = REPO_ROOT / "benchmarks" / "results"
    if device.type == "cuda":
        path = base / f"{date}-{_slug(device_name)}"
    else:
        path = base / "_scratch" / f"{date}-cpu"
    candidate, n = path, 2
    while (candidate / "results.json").exists():
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


def _split(value: Optional[str]) -> Optional[list]:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark vitkern's ops against PyTorch / timm / torch.compile in one run.",
    )
    p.add_argument("--ops", help="comma-separated ops or model setups (default: all; see --list)")
    p.add_argument(
        "--models",
        help="comma-separated model setups (vit) or model names (ViT-B/16, ViT-L/16, ...): run those; with --ops, "
        "both (default: all; on the CPU the model runs its tiny config whatever the name)",
    )
    p.add_argument("--providers", help=f"comma-separated providers (default: all of {', '.join(ALL_PROVIDERS)})")
    p.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help="comma-separated modes; each setup runs those it has (train: model setups only; default: %(default)s)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="element type (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--batch", help="replace every shape's batch size: one value, or a comma-separated sweep (1,8,64,256)")
    p.add_argument("--quick", action="store_true", help="one shape per op and shorter timing loops")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda when present")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<date>-<device>/)")
    p.add_argument("--list", action="store_true", help="list the ops, their shapes and formulas, and exit")
    p.add_argument("--no-flush-l2", action="store_true", help="do not flush the L2 cache between repetitions")
    p.add_argument(
        "--rotate",
        choices=("auto", "always", "never"),
        default="auto",
        help="rotate through copies of the inputs that together exceed the L2 cache, one copy per repetition "
        "(auto: on a GPU, for memory-bound cases; default: %(default)s)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA graph replays of each provider's call (captured once) instead of eager calls: no launch "
        "overhead, which dominates small batches; a call that cannot be captured is timed eagerly with a note",
    )
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--warmup-ms", type=float, help="warmup time per measurement (default: 25 GPU, 20 CPU)")
    p.add_argument("--rep-ms", type=float, help="timed repetitions fill about this long (default: 100 GPU, 150 CPU; quick: half)")
    p.add_argument("--compile-on-cpu", action="store_true", help="also run torch.compile on the CPU (~20 s per compile)")
    p.add_argument("--no-ceilings", action="store_true", help="skip the GPU GEMM / copy ceiling measurement")
    p.add_argument("--budget-s", type=float, help="stop starting new cases after this many seconds (they become skipped rows)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the torch provider's outputs")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default on the CPU: 1, since tiny shapes gain nothing from more and other load on the "
        "machine makes multi-threaded timings erratic; on a GPU: torch's default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _list(setups: dict[str, Setup]) -> None:
    for name, s in setups.items():
        print(f"{name}{' (model)' if s.kind == 'model' else ''}: {s.description}")
        print(f"  modes: {', '.join(s.modes)}; formula: {s.formula}")
        for kind, shapes in (("gpu", s.gpu_shapes), ("cpu", s.cpu_shapes)):
            for i, shape in enumerate(shapes):
                print(f"  {kind}{' (quick)' if i == 0 else ''}: {shape_label(shape)}")
    print(
        f"providers: {', '.join(PROVIDERS)}, and where a setup has one: {', '.join(EXTRA_PROVIDERS)} "
        f"(references for speedups: {', '.join(REFERENCE_PROVIDERS)})"
    )


def _finite(value):
    """The document with NaN / inf floats as null: results.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return _DTYPE_NAMES.get(value, str(value))
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def select_setups(ops: Optional[list], models: Optional[list]) -> tuple[dict[str, Setup], Optional[list]]:
    """The setups that ``--ops`` and ``--models`` name (all when neither is given), and the model
    names that narrow the model setups' shapes (None: every model). ``--models`` takes a model setup
    ("vit") or a model's name ("ViT-B/16", any shape name of a model setup); unknown names raise
    ``KeyError`` listing the known ones."""
    if ops is None and models is None:
        return discover(), None
    everything = discover()
    chosen = dict(discover(ops)) if ops is not None else {}
    names: list = []
    if models is not None:
        model_setups = {n: s for n, s in everything.items() if s.kind == "model"}
        known_names = {
            str(shape.get("name")): n
            for n, s in model_setups.items()
            for shape in list(s.gpu_shapes) + list(s.cpu_shapes)
            if shape.get("name")
        }
        unknown = [m for m in models if m not in model_setups and m not in known_names and m != "all"]
        if unknown:
            raise KeyError(f"unknown model(s) {unknown}; known: {list(model_setups) + sorted(known_names)}")
        for m in models:
            if m == "all":
                chosen.update(model_setups)
            elif m in model_setups:
                chosen[m] = model_setups[m]
            else:
                chosen[known_names[m]] = model_setups[known_names[m]]
                names.append(m)
    ordered = {n: s for n, s in everything.items() if n in chosen}
    return ordered, (names or None)


def _parse_batch(value: Optional[str]):
    if value is None:
        return None
    values = [int(v) for v in _split(value)]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--batch needs positive integers, got {value!r}")
    return values[0] if len(values) == 1 else values


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    wall_start = time.perf_counter()
    try:
        setups, model_names = select_setups(_split(args.ops), _split(args.models))
        batch = _parse_batch(args.batch)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        _list(setups)
        return 0
    providers = _split(args.providers) or list(ALL_PROVIDERS)
    bad = [p for p in providers if p not in ALL_PROVIDERS]
    modes = _split(args.modes) or list(ALL_MODES)
    bad_modes = [m for m in modes if m not in ALL_MODES]
    if bad or bad_modes:
        print(f"error: unknown providers {bad} / modes {bad_modes}; providers: {ALL_PROVIDERS}, modes: {ALL_MODES}", file=sys.stderr)
        return 2

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (25.0 if on_gpu else 20.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (100.0 if on_gpu else 150.0) * (0.5 if args.quick else 1.0)
    config = RunConfig(
        ops=list(setups),
        model_ops=[n for n, s in setups.items() if s.kind == "model"],
        providers=providers,
        modes=modes,
        dtype=dtype_name,
        device=device.type,
        quick=args.quick,
        batch=batch,
        models=model_names if on_gpu else None,
        flush_l2=on_gpu and not args.no_flush_l2,
        rotate=args.rotate,
        cuda_graphs=on_gpu and args.cuda_graphs,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        compile_on_cpu=args.compile_on_cpu,
        budget_s=args.budget_s,
        check=not args.no_check,
    )

    if args.threads is not None or not on_gpu:
        torch.set_num_threads(max(1, args.threads or 1))
    if not on_gpu:
        print(CPU_BANNER, flush=True)
        if model_names:
            print(f"(--models {','.join(model_names)}: on the CPU the model setups run their tiny config)", flush=True)
        if args.cuda_graphs:
            print("(--cuda-graphs: no effect on the CPU)", flush=True)
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print(
                "TRITON_INTERPRET=1: the vitkern and vitkern-triton providers run Triton's interpreter where a kernel "
                "exists (a correctness check; 2 timed calls whose times mean nothing).",
                flush=True,
            )
    env = environment(device)
    if env["vitkern_import_error"]:
        print(f"warning: import vitkern failed ({env['vitkern_import_error']}); vitkern providers will be error rows", file=sys.stderr)
    out_dir = Path(args.out) if args.out else default_out_dir(device, env["device_name"])
    out_dir.mkdir(parents=True, exist_ok=True)
    ceilings = None
    if on_gpu and not args.no_ceilings:
        if not args.quiet:
            _log("measuring ceilings: GEMM and device-to-device copy ...")
        try:
            ceilings = measure_ceilings(device, DTYPES[dtype_name])
        except Exception as exc:
            _log(f"warning: the ceiling measurement failed ({_short(exc)}); pct_of_ceiling will be null")
        else:
            print(f"ceilings: GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s ({dtype_name}), copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)

    doc = {
        "schema_version": SCHEMA_VERSION,
        "environment": env,
        "config": asdict(config),
        "ceilings": ceilings,
        "rows": [],
        "wall_s": 0.0,
        "complete": False,
    }
    results_path = out_dir / "results.json"

    def progress(rows):
        doc["rows"] = rows
        doc["wall_s"] = round(time.perf_counter() - wall_start, 2)
        _write_json(results_path, doc)

    rows = run(setups, config, ceilings=ceilings, on_progress=progress, verbose=not args.quiet)
    doc["rows"] = rows
    doc["wall_s"] = round(time.perf_counter() - wall_start, 2)
    doc["complete"] = not any(r["status"] == "skipped" and (r["note"] or "").startswith("time budget") for r in rows)
    _write_json(results_path, doc)
    plots: list = []
    if not args.no_plots:
        try:
            from benchmarks.plot import write_plots

            plots = write_plots(json.loads(results_path.read_text()), out_dir, log=None if args.quiet else _log)
        except Exception as exc:  # a plotting problem must not lose the run
            _log(f"warning: writing the plots failed ({_short(exc)})")
    (out_dir / "summary.md").write_text(render_markdown(doc, [p.name for p in plots]))
    schema_problem = None
    try:
        validate_results(json.loads(results_path.read_text()))
    except SchemaError as exc:
        schema_problem = str(exc)
        print(f"error: results.json does not follow the schema: {exc}", file=sys.stderr)

    print_table(rows)
    if on_gpu:
        print("\nHeadline (vitkern vs the fastest reference; summary.md has it as Markdown):", flush=True)
        print(render_headline(doc), flush=True)
    errors = [r for r in rows if r["status"] == "error"]
    mismatches = [r for r in rows if r["err_ok"] is False]
    ok = sum(r["status"] == "ok" for r in rows)
    print(
        f"{ok} ok, {sum(r['status'] == 'skipped' for r in rows)} skipped, {len(errors)} errors, "
        f"{len(mismatches)} outside tolerance; {doc['wall_s']:.1f} s. Wrote {results_path}, {out_dir / 'summary.md'}"
        + (f" and {len(plots)} plot(s)" if plots else ""),
        flush=True,
    )
    third_party = [r for r in errors + mismatches if r["provider"] in ATTENTION_PROVIDERS]
    if third_party:
        print(
            f"({len(third_party)} of those are third-party attention references (SDPA backends, flash-attn, xformers): "
            "reported, but they do not fail the run)",
            flush=True,
        )
    if not on_gpu:
        print("Kernel timings need a GPU: run `python -m benchmarks` (or scripts/gpu_check.sh) on a CUDA machine.", flush=True)
    failing = [r for r in errors + mismatches if r["provider"] not in ATTENTION_PROVIDERS]
    return 1 if failing or schema_problem else 0


if __name__ == "__main__":
    sys.exit(main())
