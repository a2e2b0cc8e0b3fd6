"""Running the compile check: :func:`run_compile_check` from any process (it starts a compile
process without ``TRITON_INTERPRET``, so the test process may interpret), and the command line
(``python -m vitkern.testing.compile_check``)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from vitkern.testing.compile_check.compiler import check
from vitkern.testing.compile_check.report import CheckReport, format_rows

_REPO_ROOT = Path(__file__).resolve().parents[3]



def ops_modules() -> list[str]:
    """Every module under ``vitkern.ops``, subpackages' modules included."""
    return expand_modules(["vitkern.ops"])


def expand_modules(names: Sequence[str]) -> list[str]:
    """``names`` with each package replaced by itself and every module below it: an op package
    (``vitkern.ops.attention``) keeps its kernels, launchers and compile cases in separate files."""
    out: set[str] = set()
    for name in names:
        out.add(name)
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):
            out.update(m.name for m in pkgutil.walk_packages(module.__path__, name + "."))
    return sorted(out)


def default_workers() -> int:
    """CPU cores for the check, shared with the other pytest-xdist workers if any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, cores // max(1, share))


def default_cache_dir() -> Optional[str]:
    """``TRITON_CACHE_DIR`` when set; else the repository's ``.triton-cache/`` in a source
    checkout (git-ignored); else None (Triton's default, ``~/.triton/cache``)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    if (_REPO_ROOT / ".git").exists() or (_REPO_ROOT / "pyproject.toml").exists():
        return str(_REPO_ROOT / ".triton-cache")
    return None


def run_compile_check(
    modules: Optional[Sequence[str]] = None,
    *,
    archs: Sequence[int] = (80, 90),
    full: bool = False,
    workers: Optional[int] = None,
    sys_path: Sequence[str] = (),
    plan_only: bool = False,
    timeout: Optional[float] = None,
) -> CheckReport:
    """Compile the registered kernels of ``modules`` (default: all of ``vitkern.ops``) in a
    subprocess without the interpreter, and return one row per compiled kernel.

    Rows are dicts: kernel, module, arch, config, constexprs, signature (``name:type``, ``/16``
    where Triton specialises divisibility by 16), cases, num_warps, num_stages, n_regs,
    spill_stores, spill_loads, stack_frame, shared (dynamic shared memory, bytes), wgmma, mma,
    mma_instr, tma (TMA copies in the PTX), expects_wgmma, jit_check, compile_s, cached (Triton's
    cache had it), error, and
    problems (empty when it passes). Plan-level problems (a kernel no case launches, a case that
    raised, an unregistered JITFunction) come as rows with only kernel, module, arch, problems.
    ``full`` compiles every config and the ``slow`` cases; the default covers each kernel's
    captured variants with its first config plus the configs marked ``bench``. ``plan_only`` lists
    what would compile, compiling nothing.
    """
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="vitkern-compile-check-") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "vitkern.testing.compile_check", "--json", out, "--no-fail",
               "--archs", ",".join(str(a) for a in archs), "--workers", str(workers), "--quiet"]
        if full:
            cmd.append("--full")
        if plan_only:
            cmd.append("--plan-only")
        for p in (str(_REPO_ROOT), *sys_path):
            cmd += ["--path", str(p)]
        cmd += list(modules or ())
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        cache = default_cache_dir()
        if cache:
            env["TRITON_CACHE_DIR"] = cache
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), *[str(p) for p in sys_path],
                                              env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=str(_REPO_ROOT), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"compile check process failed (exit {proc.returncode}):\n{output[-8000:]}")
        with open(out) as f:
            rows = json.load(f)
    return CheckReport(rows=rows, wall_s=wall, workers=workers, command=cmd, output=output)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitkern.testing.compile_check",
        description="Static GPU compile check of the registered Triton kernels (no GPU needed).",
    )
    parser.add_argument("modules", nargs="*", help="modules to check (default: every module of vitkern.ops)")
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--full", action="store_true", help="every config and the slow cases")
    parser.add_argument("--workers", type=int, default=0, help="compile processes (default: CPU cores)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--path", action="append", default=[], help="prepend to sys.path (repeatable)")
    parser.add_argument("--plan-only", action="store_true", help="list the compile jobs, compile nothing")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a row has a problem")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    for p in reversed(args.path):
        if p not in sys.path:
            sys.path.insert(0, p)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile check compiles for the GPU", file=sys.stderr)
        return 2
    if "TRITON_CACHE_DIR" not in os.environ and default_cache_dir():
        os.environ["TRITON_CACHE_DIR"] = default_cache_dir()
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    modules = expand_modules(args.modules) if args.modules else ops_modules()
    t0 = time.perf_counter()
    rows = check(modules, archs, args.full, args.workers or default_workers(), args.plan_only)
    wall = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    failures = [r for r in rows if r["problems"]]
    if not args.quiet:
        print(format_rows(rows))
    elif failures:
        print(format_rows(failures))
    import triton

    print(f"\n{len(rows)} rows, {len(failures)} with problems, {wall:.1f} s (triton {triton.__version__} from "
          f"{os.path.dirname(triton.__file__)}, archs {','.join(map(str, archs))}, "
          f"{'full' if args.full else 'default'} set)")
    return 1 if failures and not args.no_fail else 0
