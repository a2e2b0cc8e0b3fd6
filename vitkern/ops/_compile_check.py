"""Static GPU compile check: every registered kernel config compiles for sm_80 and sm_90, no GPU.

For each module, the registered :func:`~vitkern.ops._config.compile_cases` run under
:func:`~vitkern.ops._config.capture` for each arch family; every captured launch (expanded over
the kernel's autotuning configs for that arch) becomes Triton's own
``ASTSource(fn, signature, constexprs, attrs)``: the signature and specialisation come from the
captured arguments through the binder that ``JITFunction.run`` uses
(``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args``), so the
check compiles what the launcher launches: pointer dtypes, int widths, 16-byte pointer alignment,
ints divisible by 16 and ints equal to 1 (which become constexprs), exactly as at run time.
As a cross-check, each launch is also handed to ``JITFunction.run`` itself (with a stand-in driver
reporting the target arch, stopped just before it compiles): a specialisation that differs from
the JIT's is a problem; the row's ``jit_check`` says "same", or "unavailable: ..." where this
Triton's internals do not allow the cross-check.
``triton.compile(src, target=GPUTarget("cuda", arch, 32))`` then builds PTX and cubin with the
ptxas that ships with Triton; no GPU or CUDA driver is needed.

Each distinct (kernel, specialisation, options, arch) compiles once, in a pool of worker
processes, with Triton's cache kept between runs (``TRITON_CACHE_DIR``, else the repository's
git-ignored ``.triton-cache/``). Per compiled kernel the check records registers, spill bytes
(from ``ptxas -v``: "N bytes spill stores"; cuobjdump's LOCAL field stays 0 when ptxas spills),
dynamic shared memory (``compiled.metadata.shared``) and the MMA instruction in the PTX, and
flags: compile errors, any spill, shared memory over the arch limit (227 KB sm_90, 163 KB sm_80),
and a missing wgmma (sm_90) / mma.sync (sm_80) where the kernel's ``expects_wgmma`` rule says
its dots must run on tensor cores.

The compile runs in a subprocess without ``TRITON_INTERPRET``: under the interpreter
``@triton.jit`` returns ``InterpretedFunction`` objects, which ``triton.compile`` rejects
("'InterpretedFunction' object has no attribute 'cache_key'"; a JITFunction rebuilt from one
fails on its callees: "Unsupported function referenced: <...InterpretedFunction ...>"), and
``dot_operand`` must compile its GPU branch.

Command line (gpu_check runs this)::

    python -m vitkern.ops._compile_check [--full] [--archs 80,90] [--json out.json] [MODULE ...]

prints one row per compiled kernel and exits 1 when a row has a problem. From Python,
:func:`run_compile_check` returns the rows (dicts) and works from any process, the test process
with ``TRITON_INTERPRET=1`` included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

__all__ = [
    "SHARED_LIMITS",
    "ops_modules",
    "run_compile_check",
    "plan",
    "check",
    "CompileJob",
    "CheckReport",
    "evaluate",
    "format_rows",
    "parse_ptxas_log",
    "default_workers",
    "main",
]

#: Dynamic shared memory per block, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}

_REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Row evaluation and formatting (pure functions: usable from any process)
# --------------------------------------------------------------------------------------------


def evaluate(row: dict) -> list[str]:
    """The problems of one result row (empty when the compiled kernel passes)."""
    if row.get("problems_plan"):
        return list(row["problems_plan"])
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    if row.get("plan_only"):
        return []
    problems = []
    if row.get("n_regs") is None:
        problems.append("no ptxas statistics")
    stores, loads = row.get("spill_stores") or 0, row.get("spill_loads") or 0
    if stores or loads:
        problems.append(f"spills: {stores} bytes spill stores, {loads} bytes spill loads")
    limit = SHARED_LIMITS.get(row["arch"])
    if limit is not None and (row.get("shared") or 0) > limit:
        problems.append(f"shared memory {row['shared']} B over the sm_{row['arch']} limit {limit} B")
    if row.get("expects_wgmma"):
        if row["arch"] >= 90 and not row.get("wgmma"):
            problems.append(f"no wgmma in the sm_{row['arch']} PTX (found {row.get('mma_instr') or 'no MMA'})")
        if row["arch"] < 90 and not row.get("mma"):
            problems.append(f"no mma.sync in the sm_{row['arch']} PTX")
    return problems


def format_rows(rows: Sequence[dict]) -> str:
    """A plain-text table of result rows (what gpu_check prints)."""
    header = ("kernel", "arch", "config", "constexprs", "signature", "regs", "spill", "smem KB", "mma", "jit",
              "s", "status")
    lines = [header]
    for r in rows:
        problems = r.get("problems") or []
        mma = "wgmma" if r.get("wgmma") else "mma" if r.get("mma") else "-"
        spill = "" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
        smem = "" if r.get("shared") is None else f"{r['shared'] / 1024:.1f}"
        lines.append((
            r.get("kernel", "?"),
            f"sm_{r['arch']}" if isinstance(r.get("arch"), int) else str(r.get("arch", "")),
            r.get("config", ""),
            _truncate(r.get("constexprs", ""), 60),
            _compact_signature(r.get("signature", "")),
            "" if r.get("n_regs") is None else str(r["n_regs"]),
            spill,
            smem,
            mma,
            _jit_mark(r.get("jit_check", "")),
            "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
            "ok" if not problems else "FAIL: " + "; ".join(problems),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1]))
    return "\n".join(out)


def _jit_mark(jit_check: str) -> str:
    if jit_check in ("same", ""):
        return "=" if jit_check else ""
    return "n/a" if jit_check.startswith("unavailable") else "!"


def _compact_signature(sig: str) -> str:
    """"X:*bf16/16 N:i32" -> "*bf16/16,i32": the types and 16-divisibility, without names."""
    return ",".join(part.split(":", 1)[1] for part in sig.split() if ":" in part)


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_FUNC_RE = re.compile(r"Function properties for (\S+)")


def parse_ptxas_log(log: str, entry: Optional[str] = None) -> Optional[dict]:
    """Registers and spill bytes from ``ptxas -v`` output.

    Spill bytes are summed over every function in the log (non-inlined callees spill too);
    registers are the entry function's (the first "Used N registers" after its name).
    """
    if "ptxas info" not in log:
        return None
    stores = loads = stack = 0
    found = False
    for m in _SPILL_RE.finditer(log):
        found = True
        stack = max(stack, int(m.group(1)))
        stores += int(m.group(2))
        loads += int(m.group(3))
    regs = None
    start = 0
    if entry is not None:
        m = re.search(r"Compiling entry function '" + re.escape(entry) + "'", log)
        start = m.end() if m else 0
    m = _REGS_RE.search(log, start)
    if m:
        regs = int(m.group(1))
    if regs is None and not found:
        return None
    return {"n_regs": regs, "spill_stores": stores, "spill_loads": loads, "stack_frame": stack}


@dataclasses.dataclass
class CheckReport:
    """Rows of one check run, as returned by :func:`run_compile_check`."""

    rows: list[dict]
    wall_s: float
    workers: int
    command: list[str]
    output: str = ""

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r.get("problems")]

    def format(self) -> str:
        return format_rows(self.rows)


# --------------------------------------------------------------------------------------------
# Entry point for other processes (the test process runs with TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


def ops_modules() -> list[str]:
    """Every module under ``vitkern.ops`` (imported lazily by the check)."""
    import vitkern.ops

    return sorted(m.name for m in pkgutil.walk_packages(vitkern.ops.__path__, "vitkern.ops."))


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
    mma_instr, expects_wgmma, jit_check, compile_s, cached (Triton's cache had it), error, and
    problems (empty when it passes). Plan-level problems (a kernel no case launches, a case that
    raised, an unregistered JITFunction) come as rows with only kernel, module, arch, problems.
    ``full`` compiles every config and the ``slow`` cases; the default covers each kernel's
    captured variants with its first config plus the configs marked ``bench``. ``plan_only`` lists what would compile, compiling nothing.
    """
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="vitkern-compile-check-") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "vitkern.ops._compile_check", "--json", out, "--no-fail",
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


# --------------------------------------------------------------------------------------------
# Planning and compiling (in the compile process: no interpreter, kernels are JITFunctions)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileJob:
    """One distinct compile: a kernel's specialisation, options and target arch."""

    entry: Any  # KernelEntry
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    spec: dict
    key: str
    expects_wgmma: bool = False
    jit_check: str = ""
    cases: set = dataclasses.field(default_factory=set)

    def source(self):
        """Triton's ``ASTSource`` for this job (what ``JITFunction.run`` would build)."""
        from triton.compiler import ASTSource

        return ASTSource(self.entry.kernel, self.signature, self.constexprs, self.attrs)

    def compile(self):
        """``triton.compile`` for this job's arch (a cache hit when compiled before)."""
        import triton
        from triton.backends.compiler import GPUTarget

        return triton.compile(self.source(), target=GPUTarget("cuda", self.arch, 32), options=self.options)

    def describe(self) -> dict:
        fn = self.entry.kernel
        names = fn.arg_names
        const = []
        sig = []
        for i, name in enumerate(names):
            ty = self.signature[name]
            if ty == "constexpr":
                const.append(f"{name}={_short(self.constexprs.get((i,)))}")
            else:
                div = any(a and a[0][0] == "tt.divisibility" for p, a in self.attrs.items() if p[:1] == (i,))
                sig.append(f"{name}:{ty}{'/16' if div else ''}")
        return {
            "kernel": self.entry.qualname,
            "module": self.entry.module,
            "arch": self.arch,
            "config": self.config,
            "constexprs": " ".join(const),
            "signature": " ".join(sig),
            "cases": sorted(c for c in self.cases if c),
            "num_warps": self.options.get("num_warps"),
            "num_stages": self.options.get("num_stages"),
            "expects_wgmma": self.expects_wgmma,
            "jit_check": self.jit_check,
        }


def _short(value) -> str:
    if hasattr(value, "__name__"):
        return value.__name__
    return str(value)


def _specialize(kernel, arch: int, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    # JITFunction.run sets these two before binding.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kwargs)
    if hasattr(kernel, "_pack_args"):
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    else:  # older Triton inlines these steps in JITFunction.run:
        from triton._utils import find_paths_if, get_iterable_path

        options = backend.parse_options(kwargs)
        sigkeys = [x.name for x in kernel.params]
        sigvals = [x[0] for x in specialization]
        signature = dict(zip(sigkeys, sigvals))
        for k in kwargs:
            if k not in options.__dict__ and k not in sigkeys:
                raise KeyError("Keyword argument %s was specified but unrecognised" % k)
        paths = find_paths_if(sigvals, lambda _, val: val == "constexpr")
        constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in paths}
        attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
        paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
        attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in paths}
    return signature, constexprs, attrs, options


class _StopBeforeCompile(Exception):
    pass


class _StandInDriver:
    """What ``JITFunction.run`` asks of the driver before it compiles, for a target arch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"vitkern-static-check-sm{arch}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _jit_specialization(kernel, arch: int, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) as ``JITFunction.run`` itself computes them,
    stopped just before it compiles: run with a stand-in driver for ``arch`` and an instance
    ``_do_compile`` that records its arguments. Raises if this Triton's internals differ."""
    from triton.runtime.driver import driver

    seen = {}

    def record(key, signature, device, constexprs, options, attrs, warmup):
        seen.update(signature=signature, constexprs=constexprs, options=options, attrs=attrs)
        raise _StopBeforeCompile

    stand_in = _StandInDriver(arch)
    previous = driver._active
    driver.set_active(stand_in)
    kernel._do_compile = record
    try:
        kernel.run(*args, grid=None, warmup=True, **kwargs)
    except _StopBeforeCompile:
        pass
    finally:
        del kernel._do_compile
        driver._active = previous
        kernel.device_caches.pop(stand_in.device, None)
    if not seen:
        raise RuntimeError("JITFunction.run did not reach _do_compile")
    return seen["signature"], seen["constexprs"], seen["attrs"], seen["options"]


def _jit_cross_check(kernel, arch: int, args: tuple, kwargs: dict, ours: tuple) -> str:
    """"same" when the JIT derives the specialisation the check compiles; else what differs
    ("differs: ...", a problem), or why the JIT could not be asked ("unavailable: ...")."""
    try:
        theirs = _jit_specialization(kernel, arch, args, kwargs)
    except Exception as e:
        return f"unavailable: {type(e).__name__}: {e}"
    names = ("signature", "constexprs", "attrs", "options")
    diffs = []
    for name, a, b in zip(names, ours, theirs):
        if name == "options":
            a, b = a.__dict__, b.__dict__
        if a != b:
            diffs.append(f"{name}: check {a} vs JIT {b}")
    return "same" if not diffs else "differs: " + "; ".join(diffs)


def _spec_mapping(kernel, signature: dict, constexprs: dict, options) -> dict:
    spec: dict[str, Any] = {}
    for i, name in enumerate(kernel.arg_names):
        ty = signature[name]
        spec[name] = constexprs.get((i,)) if ty == "constexpr" else ty
    spec["num_warps"] = options.num_warps
    spec["num_stages"] = options.num_stages
    return spec


def plan(modules: Sequence[str], archs: Sequence[int] = (80, 90), full: bool = False
         ) -> tuple[list[CompileJob], list[dict]]:
    """The distinct compile jobs of ``modules``' registered kernels (in a process that is not
    interpreting), and rows for plan-level problems (a registered kernel no case launches, an
    autotuned kernel without a config for an arch, a launch the JIT would refuse)."""
    from triton.compiler import ASTSource

    from vitkern.ops import _config as cfg

    if cfg.INTERPRETING:
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (see the module docstring)")
    modules = _with_submodules(modules)
    wanted = set(modules)
    entries = [e for e in cfg.registered_kernels() if e.module in wanted]
    cases = [c for c in cfg.registered_cases() if c.module in wanted and (full or not c.slow)]

    jobs: dict[str, CompileJob] = {}
    plan_rows: list[dict] = []
    launched: set[int] = set()
    for arch in archs:
        with cfg.capture(arch) as launches:
            for c in cases:
                try:
                    cfg.run_cases(c)
                except Exception as e:
                    plan_rows.append({"kernel": c.name, "module": c.module, "arch": arch, "config": "",
                                      "problems_plan": [f"compile cases raised {type(e).__name__}: {e}"]})
        for launch in launches:
            entry = launch.entry
            launched.add(id(entry))
            if launch.config is not None:
                configs = [launch.config]
            elif entry.autotuned:
                configs = entry.check_configs(arch, full)
                if not configs:
                    plan_rows.append(_plan_problem(entry, arch, f"no config for sm_{arch}"))
                    continue
            else:
                configs = [None]
            for config in configs:
                kwargs = dict(launch.kwargs)
                if config is not None:
                    kwargs.update(config.all_kwargs())
                try:
                    signature, constexprs, attrs, options = _specialize(entry.kernel, arch, launch.args, kwargs)
                except Exception as e:  # a launch the JIT would refuse too
                    plan_rows.append(_plan_problem(entry, arch, f"cannot specialise: {type(e).__name__}: {e}"))
                    continue
                src = ASTSource(entry.kernel, signature, constexprs, attrs)
                key = hashlib.sha256(f"{entry.name}|{arch}|{src.hash()}|{options.hash()}".encode()).hexdigest()
                label = config.label() if config is not None else f"w{options.num_warps} s{options.num_stages}"
                job = jobs.get(key)
                if job is None:
                    jit_check = _jit_cross_check(entry.kernel, arch, launch.args, kwargs,
                                                 (signature, constexprs, attrs, options))
                    if jit_check.startswith("differs"):
                        plan_rows.append(_plan_problem(entry, arch, "static specialisation is not the JIT's: "
                                                       + jit_check))
                        continue
                    spec = _spec_mapping(entry.kernel, signature, constexprs, options)
                    try:
                        wants = entry.wants_wgmma(spec)
                    except Exception as e:
                        message = f"expects_wgmma rule raised {type(e).__name__}: {e}"
                        plan_rows.append(_plan_problem(entry, arch, message))
                        continue
                    job = CompileJob(entry, arch, signature, constexprs, attrs, dict(options.__dict__), label,
                                     spec, key, expects_wgmma=wants, jit_check=jit_check)
                    jobs[key] = job
                job.cases.add(launch.case)
    for name in _unregistered_jit_functions(wanted):
        plan_rows.append({"kernel": name, "module": name.split(":")[0], "arch": "-", "config": "",
                          "problems_plan": ["@triton.jit function not in the kernel registry "
                                            "(register_kernel / register_helper)"]})
    for entry in entries:
        if id(entry) not in launched:
            plan_rows.append(_plan_problem(entry, "-", "no compile case launches this kernel "
                                           "(add it to the module's @compile_cases)"))
    return list(jobs.values()), plan_rows


def _with_submodules(modules: Sequence[str]) -> list[str]:
    """``modules`` (imported) and every module under those that are packages: an op package keeps
    its kernels and compile cases in its submodules."""
    out = set()
    for m in modules:
        mod = importlib.import_module(m)
        out.add(m)
        for sub in pkgutil.walk_packages(getattr(mod, "__path__", []), m + "."):
            importlib.import_module(sub.name)
            out.add(sub.name)
    return sorted(out)


def _unregistered_jit_functions(modules: Iterable[str]) -> list[str]:
    """Every JITFunction Triton created in ``modules`` (module globals or not) that is neither a
    registered kernel nor a registered helper."""
    from triton.runtime import jit

    from vitkern.ops import _config as cfg

    known = getattr(jit, "_triton_jit_function_registry", {})
    wanted = set(modules)
    return sorted(name for name, fn in known.items()
                  if fn.module in wanted and cfg.kernel_entry(fn) is None and not cfg.is_registered_helper(fn))


def _plan_problem(entry, arch, message: str) -> dict:
    return {"kernel": entry.qualname, "module": entry.module, "arch": arch, "config": "",
            "problems_plan": [message]}


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
    wg = _WGMMA_RE.search(ptx)
    mma = _MMA_RE.search(ptx)
    row["wgmma"] = wg is not None
    row["mma"] = mma is not None
    row["mma_instr"] = (wg or mma).group(0) if (wg or mma) else None
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern.ops._compile_check", description=__doc__.split("\n")[0])
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
    modules = args.modules or ops_modules()
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
          f"{os.path.dirname(triton.__file__)}, archs {','.join(map(str, archs))}, {'full' if args.full else 'default'} set)")
    return 1 if failures and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
