"""Planning: the compile cases' captured launches become distinct compile jobs, each with the
signature, constexprs and attributes that Triton's own JIT would derive (in the compile process:
no interpreter, kernels are JITFunctions)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from typing import Any, Iterable, Sequence


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
    from vitkern.ops import _config, _triton
    from vitkern.testing.compile_check.cases import capture, registered_cases, run_cases

    if _config.INTERPRETING:
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (see the module docstring)")
    for m in modules:
        importlib.import_module(m)
    wanted = set(modules)
    entries = [e for e in _triton.registered_kernels() if e.module in wanted]
    cases = [c for c in registered_cases() if c.module in wanted and (full or not c.slow)]

    jobs: dict[str, CompileJob] = {}
    plan_rows: list[dict] = []
    launched: set[int] = set()
    for arch in archs:
        with capture(arch) as launches:
            for c in cases:
                try:
                    run_cases(c)
                except Exception as e:
                    plan_rows.append({"kernel": c.name, "module": c.module, "arch": arch, "config": "",
                                      "problems_plan": [f"compile cases raised {type(e).__name__}: {e}"]})
        for launch in launches:
            launched.add(id(launch.entry))
        add_launches(launches, arch, full, jobs, plan_rows)
    for name in _unregistered_jit_functions(wanted):
        plan_rows.append({"kernel": name, "module": name.split(":")[0], "arch": "-", "config": "",
                          "problems_plan": ["@triton.jit function not in the kernel registry "
                                            "(register_kernel / register_helper)"]})
    for entry in entries:
        if id(entry) not in launched:
            plan_rows.append(_plan_problem(entry, "-", "no compile case launches this kernel "
                                           "(add it to the op's compile_cases.py)"))
    return list(jobs.values()), plan_rows


def _unregistered_jit_functions(modules: Iterable[str]) -> list[str]:
    """Every JITFunction Triton created in ``modules`` (module globals or not) that is neither a
    registered kernel nor a registered helper."""
    from triton.runtime import jit

    from vitkern.ops import _triton

    known = getattr(jit, "_triton_jit_function_registry", {})
    wanted = set(modules)
    return sorted(name for name, fn in known.items()
                  if fn.module in wanted and _triton.kernel_entry(fn) is None and not _triton.is_registered_helper(fn))


def _plan_problem(entry, arch, message: str) -> dict:
    return {"kernel": entry.qualname, "module": entry.module, "arch": arch, "config": "",
            "problems_plan": [message]}


def add_launches(launches: Sequence[Any], arch: int, full: bool, jobs: dict, plan_rows: list) -> list[list[str]]:
    """Turn captured ``launches`` (for ``arch``) into compile jobs, added to ``jobs`` (key -> job;
    a specialisation compiled before is shared) and plan problems to ``plan_rows``; returns each
    launch's job keys (one per config it expands to)."""
    from triton.compiler import ASTSource

    keys_per_launch: list[list[str]] = []
    for launch in launches:
        entry = launch.entry
        keys: list[str] = []
        keys_per_launch.append(keys)
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
            keys.append(key)
    return keys_per_launch
