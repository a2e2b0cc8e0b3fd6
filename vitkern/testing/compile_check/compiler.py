"""Compiling the planned jobs: ``triton.compile`` per job in a pool of worker processes (Triton's
cache kept between runs), ptxas statistics (registers, spills) cached beside it, the MMA
instruction read from the PTX."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

from vitkern.testing.compile_check.plan import CompileJob, plan
from vitkern.testing.compile_check.report import blocks_per_sm, evaluate, parse_ptxas_log


def _ptxas_flags(options: dict) -> list[str]:
    """The flags Triton's make_cubin passes to ptxas (minus the file names)."""
    from triton import knobs

    flags = []
    if knobs.compilation.disable_line_info:
        flags += ["-lineinfo", "-suppress-debug-info"]
    elif getattr(knobs.nvidia, "disable_ptxas_opt", False):
        flags += ["-g"]
    else:
        flags += ["-lineinfo"]
    if not options.get("enable_fp_fusion", True):
        flags += ["--fmad=false"]
    flags += ["-v"]
    if getattr(knobs.nvidia, "disable_ptxas_opt", False):
        flags += ["--opt-level", "0"]
    flags += ["--regAllocOptLevel=2"]
    if options.get("ptx_options"):
        flags += options["ptx_options"].split(" ")
    return flags


def _stats_path(ptx: str, arch: int, flags: Sequence[str]) -> Path:
    from triton import knobs

    h = hashlib.sha256((ptx + f"|{arch}|" + " ".join(flags)).encode()).hexdigest()
    return Path(knobs.cache.dir) / "vitkern-ptxas" / f"{h}.json"


def _save_stats(path: Path, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, path)


def _run_ptxas(ptx: str, arch: int, flags: Sequence[str]) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory(prefix="vitkern-ptxas-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [ptxas, *flags, f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc.stdout + proc.stderr


_WGMMA_RE = re.compile(r"\bwgmma\.mma_async[\w.]*")
_MMA_RE = re.compile(r"\bmma\.sync[\w.]*")
_TMA_RE = re.compile(r"\bcp\.async\.bulk\.tensor")


def _compile_job(job: CompileJob) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = job.describe()
    src = job.source()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log on a cache miss
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        # Triton's CompilationError quotes the source first and the reason last.
        msg = [line for line in str(e).strip().splitlines() if line.strip()]
        cause = e.__cause__ if e.__cause__ is not None else e.__context__
        if cause is not None:
            msg.append(f"{type(cause).__name__}: {str(cause).strip()}")
        head = msg[:1]
        tail = [line for line in msg[-3:] if line not in head]
        row["error"] = (f"{type(e).__name__}: " + " | ".join(head + tail))[:1500]
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = compiled.asm.get("ptx") if hasattr(compiled.asm, "get") else compiled.asm["ptx"]
    metadata = compiled.metadata
    row["shared"] = int(metadata.shared)
    row["name"] = metadata.name
    if not ptx:
        row["error"] = "no PTX in the compiled kernel (TRITON_STORE_BINARY_ONLY?)"
        return row
    flags = _ptxas_flags(job.options)
    path = _stats_path(ptx, job.arch, flags)
    stats = parse_ptxas_log(log.getvalue(), metadata.name)
    row["cached"] = stats is None
    if stats is None and path.exists():
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            stats = None
    if stats is None:
        try:
            stats = parse_ptxas_log(_run_ptxas(ptx, job.arch, flags), metadata.name)
        except Exception as e:
            row["error"] = f"ptxas -v: {type(e).__name__}: {e}"
            return row
    if stats is not None:
        _save_stats(path, stats)
        row.update(stats)
    row["blocks_per_sm"] = blocks_per_sm(row.get("n_regs"), job.options.get("num_warps"), row["shared"], job.arch)
    wg = _WGMMA_RE.search(ptx)
    mma = _MMA_RE.search(ptx)
    row["wgmma"] = wg is not None
    row["mma"] = mma is not None
    row["mma_instr"] = (wg or mma).group(0) if (wg or mma) else None
    row["tma"] = _TMA_RE.search(ptx) is not None
    return row


_JOBS: list[CompileJob] = []


def _compile_index(i: int) -> dict:
    return _compile_job(_JOBS[i])


def _warm_compiler_caches(archs: Iterable[int]) -> None:
    """Fill Triton's per-process caches (the hash of its own sources and libtriton, the ptxas
    version) once, before the workers fork, instead of once per worker (about 1 s each)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        from triton.runtime.cache import triton_key

        triton_key()
        for arch in archs:
            get_ptxas_version(arch)
    except Exception:  # only an optimisation
        pass


def _compile_all(jobs: list[CompileJob], workers: int) -> list[dict]:
    global _JOBS
    _JOBS = jobs
    _warm_compiler_caches(sorted({j.arch for j in jobs}))
    import multiprocessing

    if workers <= 1 or len(jobs) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_compile_job(j) for j in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork: the workers inherit the planned jobs (JITFunctions, captured arguments). Nothing in
    # this process has touched CUDA or created an MLIR context yet.
    ctx = multiprocessing.get_context("fork")
    results: dict[int, dict] = {}
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_compile_index, i): i for i in range(len(jobs))}
            for future, i in futures.items():
                results[i] = future.result()
    except BrokenProcessPool:
        # A worker died (a crash in the compiler or ptxas): compile the rest one per process,
        # so that the job that kills its process is named.
        for i in range(len(jobs)):
            if i in results:
                continue
            try:
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    results[i] = pool.submit(_compile_index, i).result()
            except BrokenProcessPool:
                results[i] = dict(jobs[i].describe(), error="the compiling process died (crash in the compiler)")
    return [results[i] for i in range(len(jobs))]


def check(modules: Sequence[str], archs: Sequence[int] = (80, 90), full: bool = False, workers: int = 1,
          plan_only: bool = False) -> list[dict]:
    """Plan and compile in this process (it must not be interpreting); the rows, evaluated."""
    jobs, plan_rows = plan(modules, archs, full)
    if plan_only:
        rows = [dict(j.describe(), plan_only=True) for j in jobs]
    else:
        rows = _compile_all(jobs, workers)
    rows = plan_rows + sorted(rows, key=lambda r: (r["module"], r["kernel"], r["arch"], r["config"],
                                                   r["constexprs"], r["signature"]))
    for r in rows:
        r["problems"] = evaluate(r)
    return rows
