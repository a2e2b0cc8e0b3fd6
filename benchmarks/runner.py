"""The run: every (setup, shape, mode, provider) of a benchmark run, in order, into result rows.

``python -m benchmarks`` (:mod:`benchmarks.cli`) runs every setup in :mod:`benchmarks.setups` (one
module per op or model) for every provider (:mod:`benchmarks.providers`) and mode, timing each
call (:mod:`benchmarks.timing`) and filling one row of :mod:`benchmarks.results` per combination.
For one case and mode, :func:`run` computes the torch provider's result first (the correctness
reference), then for each provider: a first call (compiles, autotunes, is checked against the
reference), a second that measures the peak memory (CUDA), and the timed repetitions, eager, as
CUDA graph replays (``cuda_graphs``) or over rotating input copies (memory-bound cases).

- order and budget: every op's first shape (the ``--quick`` set) runs first, then every op's second
  shape, and so on (:func:`plan_cases`); past ``budget_s`` the remaining cases become "skipped"
  rows, so a cut-short run still covers every op. ``on_progress`` gets the rows after each case.
- failures: a provider that cannot serve a call (:class:`benchmarks.setups.Unavailable`, vitkern's
  ``BackendUnavailableError``) becomes a "skipped" row with the reason; any other exception an
  "error" row (``VITKERN_BENCH_TRACEBACK=1`` prints its traceback).
- a provider that runs Triton's interpreter (a CPU run under ``TRITON_INTERPRET=1``) gets two timed
  calls whose times mean nothing: the interpreter checks correctness only.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from benchmarks.cases import ALL_PROVIDERS, EXTRA_PROVIDERS
from benchmarks.environment import l2_bytes, ridge_point
from benchmarks.flops import ALL_MODES, TRAIN_MODE
from benchmarks.providers import Prepared, auto_choices, check_result, is_backend_unavailable, prepare, reference_result
from benchmarks.results import DTYPES, fill_speedups, fill_timing, join_notes, new_row, short_error
from benchmarks.setups import Setup, Unavailable, shape_label
from benchmarks.timing import (
    ROTATE_L2_FACTOR,
    GraphReplay,
    RotatingCall,
    cuda_graph_call,
    input_pool,
    measure,
    rotation_copies,
    should_rotate,
    sync,
    tensor_bytes,
)


@dataclass
class RunConfig:
    """What one run covers and how it times; results.json records it as "config"."""

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


def log(msg: str) -> None:
    """A progress or warning line, on stderr: stdout holds the tables."""
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
            log(f"[{index}/{self.total}] {text}")

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
        setup_order = [p for p in order if setup.providers is None or p in setup.providers]
        rows = results.setdefault((shi, si), [])
        over_budget = config.budget_s is not None and time.perf_counter() - start > config.budget_s
        progress.start(index, f"{setup.name} {label}" + (" (skipped: time budget)" if over_budget else ""))
        if over_budget:
            rows.extend(_unrun(setup, shape, modes, setup_order, config, device, "skipped",
                               f"time budget of {config.budget_s:g} s exhausted"))
            progress.done()
            continue
        try:
            torch.manual_seed(0)
            case = setup.build(shape, dtype, device)
        except Exception as exc:
            rows.extend(_unrun(setup, shape, modes, setup_order, config, device, "error",
                               f"building the case failed: {short_error(exc)}"))
            progress.done()
            continue
        for mode in modes:
            rows.extend(_run_mode(setup, shape, case, mode, setup_order, config, device, ceilings))
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.done()
        if on_progress is not None:
            on_progress(ordered_rows())
    progress.close()
    return ordered_rows()


def _unrun(
    setup: Setup, shape: dict, modes: list, order: list, config: RunConfig, device: torch.device, status: str, note: str
) -> list[dict]:
    """The rows of a case that does not run (past the time budget, or its build failed): every mode of
    every provider that each case has (the extra references come from a built case)."""
    return [
        dict(new_row(setup, shape, provider, mode, config.dtype, device, None), status=status, note=note)
        for mode in modes
        for provider in order
        if provider not in EXTRA_PROVIDERS
    ]


def _check_replay(row: dict, output, reference, dtype_name: str, device: torch.device) -> None:
    """The graph's output after its last replay against the reference: a replay that computes
    something else (a stale input, a kernel that was not captured) marks the row outside tolerance."""
    sync(device)
    probe = {"note": None, "err_ok": None, "max_abs_err": None}
    check_result(probe, output, reference, dtype_name)
    if probe["err_ok"] is False:
        row["err_ok"] = False
        detail = probe["note"] or f"max abs err {probe['max_abs_err']:.3g}"
        row["note"] = join_notes(row["note"], f"CUDA graph replay output differs from the reference ({detail})")


def _timed_call(prepared: Prepared, row: dict, config: RunConfig, device: torch.device, ridge: float):
    """The callable to time and the L2 flush setting, after choosing (and recording in ``row``) the
    method: a CUDA graph replay (``--cuda-graphs``), rotating input copies, or the plain call."""
    on_gpu = device.type == "cuda"
    flush = config.flush_l2 and on_gpu
    if on_gpu and config.cuda_graphs and row["mode"] == TRAIN_MODE:
        # a failed capture would leave garbage in the parameters' .grad (and AdamW needs
        # capturable=True): training steps are timed eagerly
        row["note"] = join_notes(row["note"], "training steps are not captured: timed without a CUDA graph")
    elif on_gpu and config.cuda_graphs:
        row["input_copies"] = 1
        try:
            replay = cuda_graph_call(prepared.call, device)
        except Exception as exc:
            row["cuda_graph"] = False
            row["note"] = join_notes(
                row["note"], f"CUDA graph capture failed, timed without a graph: {short_error(exc, 160)}"
            )
            torch.cuda.synchronize(device)
            row["l2_flush"] = flush
            return prepared.call, flush
        row["cuda_graph"] = True
        row["l2_flush"] = flush
        return replay, flush
    if on_gpu:
        row["cuda_graph"] = False
    copies = 1
    if prepared.call_with is not None and should_rotate(
        config.rotate, on_gpu, row["mode"], row["flops"], row["bytes"], ridge
    ):
        l2 = l2_bytes(device)
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
    ridge = ridge_point(ceilings)
    try:
        reference, grad_outputs = reference_result(case, mode)
        sync(device)
    except Exception as exc:
        reference_error = short_error(exc)
    else:
        reference_error = None
    for provider in order:
        if provider in EXTRA_PROVIDERS and provider not in case.references:
            continue  # a reference this case does not have at all (e.g. torchvision for an op): no row
        row = new_row(setup, shape, provider, mode, config.dtype, device, case)
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
            row.update(status="error", note=short_error(exc))
            continue
        row["note"] = prepared.note
        interpreted = bool(prepared.note and prepared.note.startswith("Triton interpreter"))
        pool_fn = None
        try:
            with prepared.context():
                with auto_choices(provider) as choices:
                    result = prepared.call()  # first call: compiles, autotunes, measures auto's choices, checks
                    sync(device)
                if choices:
                    row["auto_choices"] = choices
                if config.check and reference is not None and provider != "torch":
                    check_result(row, result, reference, config.dtype)
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
                    if (
                        isinstance(pool_fn, GraphReplay) and config.check and reference is not None
                        and provider != "torch"
                    ):
                        _check_replay(row, pool_fn.output, reference, config.dtype, device)
        except Exception as exc:
            if isinstance(exc, Unavailable) or is_backend_unavailable(exc):
                row.update(status="skipped", note=short_error(exc) if not isinstance(exc, Unavailable) else str(exc))
            else:
                row.update(status="error", note=short_error(exc))
                if os.environ.get("VITKERN_BENCH_TRACEBACK") == "1":
                    traceback.print_exc()
            continue
        finally:
            del pool_fn  # the input copies / the CUDA graph, before the next provider
        fill_timing(row, timing, ceilings if device.type == "cuda" else None, case.items)
    fill_speedups(group)
    return group
