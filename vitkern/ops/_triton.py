"""The Triton side of the launch path: the kernel registry, one launch function, device helpers.

Every ``@triton.jit`` function under ``vitkern.ops`` is registered here, next to its definition:
a kernel with :func:`register_kernel` (with its autotuning configs, as data, if it is autotuned),
a device helper that is only called from other kernels with :func:`register_helper`. Launchers
start kernels through :func:`launch` only. Each op package also has a ``compile_cases.py``: small
functions (:func:`vitkern.testing.compile_check.compile_cases`) that call its launchers with
representative inputs (every variant, and the benchmark shapes). The static compile check
(:mod:`vitkern.testing.compile_check`) runs them while a launch hook records each call instead of
running it (:func:`set_launch_hook`), and compiles exactly what the launcher would have launched,
for sm_80 and sm_90. ``tests/test_kernel_registry.py`` fails when a JITFunction in
``vitkern.ops`` is not registered or no compile case launches it.

Only kernel and launcher modules import this module (and so Triton); config tables and device
queries are in the Triton-free :mod:`vitkern.ops._config`.

Usage, in an op module::

    import torch
    import triton
    import triton.language as tl

    from vitkern.ops._config import device_arch, KernelConfig
    from vitkern.ops._triton import dot_operand, launch, register_kernel, round_to, wgmma_expected
    from vitkern.testing.compile_check import compile_cases   # in the op's compile_cases.py

    @register_kernel(
        # Autotuned: launch() picks among the configs that apply to the device's arch family
        # (every such config on the GPU, only the first one under the interpreter).
        configs=[
            KernelConfig({"BLOCK_M": 1}, num_warps=4, num_stages=1),
            KernelConfig({"BLOCK_M": 4}, num_warps=8, num_stages=1, bench=True),
            KernelConfig({"BLOCK_M": 8}, num_warps=8, num_stages=1, archs=(90,)),
        ],
        key=["N"],
    )
    @triton.jit
    def _scale_rows_kernel(X, Y, W, M, N, stride_x, stride_y,
                           HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        ...
        tl.store(Y + offs, round_to(y, Y.dtype.element_ty), mask=mask)   # the one cast on store

    def _scale_rows(x, w=None):                      # the launcher
        M, N = x.shape
        y = torch.empty_like(x)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
        launch(_scale_rows_kernel, grid, x, y, w, M, N, x.stride(0), y.stride(0),
               HAS_W=w is not None, BLOCK_N=triton.next_power_of_2(N))
        return y

    # A kernel whose launcher picks its own meta-parameters registers without configs (the
    # launcher passes them, with num_warps / num_stages, to launch, or passes config=...).
    # expects_wgmma makes the check demand wgmma on sm_90 and mma.sync on sm_80.
    @register_kernel(expects_wgmma=wgmma_expected(operand="A", block_m="BLOCK_M"))
    @triton.jit
    def _gemm_kernel(A, B, C, ..., BLOCK_M: tl.constexpr, ...):
        ...
        acc = tl.dot(dot_operand(a), dot_operand(b), acc)   # bf16 stays bf16 on the GPU

    @compile_cases                      # default check: every variant once, benchmark shapes
    def _cases():                       # compile_cases.py
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.empty(8 * 197, 768, dtype=dtype)       # CPU or meta tensors: nothing runs
            _scale_rows(x)
            _scale_rows(x, torch.empty(768, dtype=dtype))
        _scale_rows(torch.empty(197, 769, dtype=torch.bfloat16)[:, 1:])   # a misaligned view

    @compile_cases(slow=True)           # full check only: more shapes
    def _more_cases():
        ...

A ``@triton.jit`` device function called only from kernels registers with ``@register_helper``
(above ``@triton.jit``); it is compiled inside its callers.

Cases use CPU tensors (or meta tensors): under the check's capture nothing runs and large CPU
tensors are never touched, so the benchmark shapes cost nothing. Triton specialises a pointer on
``data_ptr() % 16``: CPU allocations are 64-byte aligned and CUDA caching-allocator blocks
512-byte aligned, so fresh tensors are specialised alike on both, and a view's offset moves its
pointer alike on both (meta tensors count from address 0). Pass views with offsets where the op
really receives them (q/k/v inside a packed qkv, a sliced row). Launchers that choose configs by
arch read :func:`device_arch`; persistent grids read :func:`num_sms`; under capture both report
the arch being checked, under the interpreter fixed values (no device query).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation as _triton_allocation
from triton.runtime.jit import JITFunction

from vitkern.ops._config import device_arch, INTERPRETING, KernelConfig

try:  # the interpreter's kernel class (what @triton.jit returns under TRITON_INTERPRET=1)
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - very old Triton
    InterpretedFunction = JITFunction  # type: ignore[misc,assignment]

__all__ = [
    "dot_operand",
    "round_to",
    "autotune",
    "register_kernel",
    "register_helper",
    "KernelEntry",
    "kernel_entry",
    "registered_kernels",
    "registered_helpers",
    "is_registered_helper",
    "is_kernel_object",
    "base_kernel",
    "param_names",
    "wgmma_expected",
    "launch",
    "launch_device",
    "check_launch_args",
    "ensure_scratch_allocator",
    "set_launch_hook",
    "capturing",
]

# The interpreter flag as a constexpr global, so that @triton.jit code can branch on it: the
# compiler folds the branch away, the interpreter evaluates it.
_INTERPRETING = tl.constexpr(INTERPRETING)


# The registry's storage (filled by register_kernel / register_helper / compile_cases below).
KernelObject = Any  # JITFunction, or InterpretedFunction under the interpreter

_KERNELS: dict[int, "KernelEntry"] = {}
_HELPERS: dict[int, KernelObject] = {}


def is_kernel_object(obj) -> bool:
    """True for what ``@triton.jit`` returns (a JITFunction, or an InterpretedFunction)."""
    return isinstance(obj, (JITFunction, InterpretedFunction))


def base_kernel(obj):
    """The JITFunction / InterpretedFunction under autotune / heuristics wrappers."""
    seen = 0
    while not is_kernel_object(obj) and hasattr(obj, "fn") and seen < 16:
        obj = obj.fn
        seen += 1
    return obj


def register_helper(fn):
    """Mark a ``@triton.jit`` device function that is only called from other kernels.

    Helpers are compiled as part of their callers (inlined), so the compile check does not
    compile them on their own; registering them tells the registry test they are not a kernel
    that was forgotten. Use as a decorator above ``@triton.jit``.
    """
    base = base_kernel(fn)
    if not is_kernel_object(base):
        raise TypeError(f"register_helper expects a @triton.jit function, got {fn!r}")
    _HELPERS[id(base)] = base
    return fn


@register_helper
@triton.jit
def dot_operand(x):
    """``tl.dot`` operand: ``x`` unchanged when compiled, upcast to fp32 under the interpreter.

    Triton's interpreter multiplies the raw bit patterns of bfloat16 ``tl.dot`` operands (triton
    issue 11584). Wrap both operands, ``tl.dot(dot_operand(a), dot_operand(b), acc)``: compiled
    code keeps its 16-bit operands (wgmma / mma.sync on bf16), the CPU tests get fp32 products of
    the same bf16 values, so bf16 paths are still tested.
    """
    if _INTERPRETING:
        return x.to(tl.float32)
    else:
        return x


@register_helper
@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even under the interpreter too.

    Triton 3.8's interpreter casts fp32 to bfloat16 by truncation (round toward zero: error up to
    one bf16 ulp instead of half of one, so bf16 outputs fail tolerances that hold on the GPU,
    whose ``cvt.rn.bf16.f32`` rounds to nearest even). Use it for the one cast on store,
    ``tl.store(Y + offs, round_to(y, Y.dtype.element_ty), mask=mask)``; compiled code is exactly
    ``x.to(dtype)``.
    """
    if _INTERPRETING:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------------------------


def autotune(configs: Sequence[Union[KernelConfig, Mapping, triton.Config]], key: Sequence[str], **options):
    """``triton.autotune`` that also works under the interpreter.

    With more than one config ``triton.autotune`` needs the GPU driver for its benchmarker and
    fails under ``TRITON_INTERPRET=1`` ("0 active drivers"); there it gets only the first config.
    ``options`` go to ``triton.autotune`` (``reset_to_zero``, ``restore_value``,
    ``prune_configs_by``, ...). Registered kernels do not use this directly: :func:`launch` builds
    the autotuner from the registered configs of the device's arch family.
    """
    tconfigs = [KernelConfig.coerce(c).to_triton() for c in configs]
    if not tconfigs:
        raise ValueError("autotune needs at least one config")
    if INTERPRETING:
        tconfigs = tconfigs[:1]
    return triton.autotune(configs=tconfigs, key=list(key), **options)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

def _python_fn(kernel) -> Callable:
    return kernel.fn


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def _constexpr_names(kernel) -> set[str]:
    names = set()
    for p in _signature(_python_fn(kernel)).parameters.values():
        ann = p.annotation
        if ann is tl.constexpr or (isinstance(ann, str) and "constexpr" in ann):
            names.add(p.name)
    return names


def _param_names(kernel) -> list[str]:
    return list(_signature(_python_fn(kernel)).parameters)


WgmmaRule = Union[bool, Callable[[Mapping[str, Any]], bool]]


@dataclasses.dataclass
class KernelEntry:
    """A registered kernel: the kernel, its autotuning configs (if any) and its check rules."""

    kernel: KernelObject
    configs: Optional[tuple[KernelConfig, ...]]
    key: tuple[str, ...]
    expects_wgmma: WgmmaRule
    autotune_options: dict
    _tuners: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def module(self) -> str:
        return _python_fn(self.kernel).__module__

    @property
    def qualname(self) -> str:
        return _python_fn(self.kernel).__qualname__

    @property
    def name(self) -> str:
        return f"{self.module}:{self.qualname}"

    @property
    def autotuned(self) -> bool:
        return self.configs is not None

    def configs_for(self, arch: int) -> list[KernelConfig]:
        """The configs the autotuner picks from on ``arch`` (empty when not autotuned)."""
        return [c for c in (self.configs or ()) if c.applies_to(arch)]

    def check_configs(self, arch: int, full: bool) -> list[KernelConfig]:
        """The configs the compile check covers on ``arch``: all of them (``full``), else the
        first one plus those marked ``bench``."""
        configs = self.configs_for(arch)
        if full or not configs:
            return configs
        return [c for i, c in enumerate(configs) if i == 0 or c.bench]

    def wants_wgmma(self, spec: Mapping[str, Any]) -> bool:
        rule = self.expects_wgmma
        return bool(rule(spec)) if callable(rule) else bool(rule)

    def tuner(self, arch: int):
        """The ``triton.autotune`` wrapper for ``arch`` (built once per arch family)."""
        tuner = self._tuners.get(arch)
        if tuner is None:
            configs = self.configs_for(arch)
            if not configs:
                raise RuntimeError(f"{self.name} has no config for arch family {arch}")
            tuner = autotune(configs, self.key, **self.autotune_options)(self.kernel)
            self._tuners[arch] = tuner
        return tuner


def register_kernel(
    kernel=None,
    *,
    configs: Optional[Iterable[Union[KernelConfig, Mapping, triton.Config]]] = None,
    key: Sequence[str] = (),
    expects_wgmma: WgmmaRule = False,
    **autotune_options,
):
    """Register a ``@triton.jit`` kernel; use as a decorator above ``@triton.jit`` (or call).

    ``configs``: the kernel is autotuned over them (keyed on ``key``, plus the dtypes of the
    tensor arguments, as ``triton.autotune`` does); :func:`launch` picks among those whose
    ``archs`` include the device's family. Without ``configs`` the launcher passes the
    meta-parameters, ``num_warps`` and ``num_stages`` itself.

    ``expects_wgmma``: a bool, or a predicate over the compiled specialisation (a mapping from
    each kernel parameter name to its constexpr value or its signature type such as ``"*bf16"``,
    plus ``num_warps`` and ``num_stages``; see :func:`wgmma_expected`). When true the check
    demands wgmma in the sm_90 PTX and mma.sync in the sm_80 PTX: state it for 16-bit and TF32
    dots with BLOCK_M >= 64 and num_warps a multiple of 4.

    ``autotune_options`` go to ``triton.autotune`` (``reset_to_zero``, ``restore_value``, ...).
    """

    def decorate(k):
        base = base_kernel(k)
        if not is_kernel_object(base):
            raise TypeError(f"register_kernel expects a @triton.jit function, got {k!r}")
        parsed = None
        if configs is not None:
            parsed = tuple(KernelConfig.coerce(c) for c in configs)
            if not parsed:
                raise ValueError(f"{base.fn.__qualname__}: configs=[] registers no config; omit it instead")
            constexprs = _constexpr_names(base)
            for c in parsed:
                unknown = set(c.meta) - constexprs
                if unknown:
                    raise ValueError(
                        f"{base.fn.__qualname__}: config meta-parameters {sorted(unknown)} are not "
                        f"constexpr parameters of the kernel ({sorted(constexprs)})"
                    )
            names = set(_param_names(base))
            missing = [k_ for k_ in key if k_ not in names]
            if missing:
                raise ValueError(f"{base.fn.__qualname__}: autotune key {missing} names no kernel parameter")
        elif key or autotune_options:
            raise ValueError("key / autotune options need configs")
        _KERNELS[id(base)] = KernelEntry(base, parsed, tuple(key), expects_wgmma, dict(autotune_options))
        return k

    if kernel is not None:
        return decorate(kernel)
    return decorate


def kernel_entry(kernel) -> Optional[KernelEntry]:
    """The registry entry of ``kernel`` (or of the kernel under its autotune wrapper)."""
    return _KERNELS.get(id(base_kernel(kernel)))


def is_registered_helper(kernel) -> bool:
    return id(base_kernel(kernel)) in _HELPERS


def registered_kernels(module_prefix: Optional[str] = None) -> list[KernelEntry]:
    return [e for e in _KERNELS.values() if module_prefix is None or _in_module(e.module, module_prefix)]


def registered_helpers(module_prefix: Optional[str] = None) -> list[KernelObject]:
    return [h for h in _HELPERS.values() if module_prefix is None or _in_module(h.fn.__module__, module_prefix)]


def _in_module(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def wgmma_expected(operand: str = "A", block_m: str = "BLOCK_M", tf32: Optional[str] = None,
                   min_block_m: int = 64) -> Callable[[Mapping[str, Any]], bool]:
    """The usual ``expects_wgmma`` rule: a 16-bit dot operand (``operand`` names the pointer
    parameter it is loaded from), or fp32 when the constexpr named ``tf32`` is true; the
    ``block_m`` constexpr >= ``min_block_m``; num_warps a multiple of 4."""

    def rule(spec: Mapping[str, Any]) -> bool:
        ty = str(spec.get(operand, ""))
        sixteen = ty in ("*bf16", "*fp16")
        tf32_ok = ty == "*fp32" and tf32 is not None and bool(spec.get(tf32))
        return (sixteen or tf32_ok) and int(spec.get(block_m, 0)) >= min_block_m and spec["num_warps"] % 4 == 0

    return rule


def param_names(kernel) -> list[str]:
    """The kernel's parameter names, in order."""
    return _param_names(kernel)


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------

# Keyword arguments a launch may pass besides the kernel's parameters (Triton compile options).
_LAUNCH_OPTIONS = frozenset({
    "num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
    "launch_pdl", "debug", "sanitize_overflow", "ir_override", "extern_libs", "ptx_options",
})


def _check_launch_args(entry: KernelEntry, args: tuple, kwargs: dict) -> None:
    names = _param_names(entry.kernel)
    unknown = [k for k in kwargs if k not in names and k not in _LAUNCH_OPTIONS]
    if unknown:
        raise TypeError(f"launch of {entry.qualname}: unknown keyword arguments {unknown} (parameters: {names})")
    params = _signature(_python_fn(entry.kernel))
    try:
        params.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    except TypeError as e:
        raise TypeError(f"launch of {entry.qualname}: {e}") from None


def _first_device(args: tuple, kwargs: dict) -> Optional[torch.device]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def launch_device(args: tuple, kwargs: dict) -> Optional[int]:
    """The CUDA device index a launch must make current, or None when the current one is right.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, whatever
    device the tensors are on: a tensor on cuda:1 with device 0 current would run the kernel on
    the wrong GPU (an illegal address, or a race with peer access). The launching tensors' device
    is the first tensor argument's (launchers allocate every output on the inputs' device).
    Switching costs a few microseconds, so it happens only when the index differs.
    """
    device = _first_device(args, kwargs)
    if device is None or device.type != "cuda" or device.index is None:
        return None
    return None if device.index == torch.cuda.current_device() else device.index


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Scratch for device-side tensor descriptors, from torch's caching allocator on the current
    device (launch() has made it the launching tensors' device) and its current stream, the
    stream Triton launches on. Caching-allocator blocks are 512-byte aligned (alignment <= 128)."""
    device = torch.device("cpu") if INTERPRETING else torch.device("cuda", torch.cuda.current_device())
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_scratch_allocator() -> None:
    """Give this thread Triton's scratch allocator, needed by kernels that build tensor descriptors
    on the device (``tl.make_tensor_descriptor``).

    ``triton.set_allocator`` stores the allocator in a ``ContextVar``: every other thread (autograd
    runs backward on its own device thread on CUDA; a user's serving or DataLoader workers) starts
    with Triton's null allocator, which fails the launch ("no allocator was set"). So the check
    runs at every launch that needs it, in the launching thread (a ContextVar read: ~0.1 us). An
    allocator the user set in this context is kept.
    """
    if isinstance(_triton_allocation._allocator.get(), _triton_allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


# The one interception point of the launch path: None, or a function that receives each launch
# instead of it running (the static compile check records launches this way).
LaunchHook = Callable[["KernelEntry", Any, tuple, dict, Optional[KernelConfig]], Any]
_LAUNCH_HOOK: Optional[LaunchHook] = None


def set_launch_hook(hook: Optional[LaunchHook]) -> Optional[LaunchHook]:
    """Install ``hook(entry, grid, args, kwargs, forced_config)`` to receive every :func:`launch`
    instead of running it (None removes it); returns the previous hook."""
    global _LAUNCH_HOOK
    previous, _LAUNCH_HOOK = _LAUNCH_HOOK, hook
    return previous


def capturing() -> bool:
    """True while a launch hook receives launches (nothing runs: launchers skip their host-side
    work on the outputs, such as a reduction of split partials)."""
    return _LAUNCH_HOOK is not None


def check_launch_args(entry: KernelEntry, args: tuple, kwargs: dict, forced: Optional[KernelConfig]) -> None:
    """Bind a launch's arguments to the kernel's parameters as the JIT would, and refuse
    meta-parameters that an autotuned kernel's configs provide (run under the interpreter and by
    the compile check's capture, where a mistake would otherwise surface late or not at all)."""
    if forced is not None:
        extra = forced.all_kwargs()
    elif entry.autotuned:
        extra = entry.configs[0].all_kwargs()
    else:
        extra = {}
    _check_launch_args(entry, args, {**kwargs, **extra})
    if entry.autotuned and forced is None:
        clash = set(kwargs) & {k for c in entry.configs for k in c.all_kwargs()}
        if clash:
            raise TypeError(f"launch of {entry.qualname}: {sorted(clash)} come from the autotuned configs")


def launch(kernel, grid, *args, config: Optional[Union[KernelConfig, Mapping]] = None, **kwargs):
    """Launch a registered kernel: ``kernel[grid](*args, **kwargs)``, autotuned if it has configs.

    ``config`` forces one config of an autotuned kernel (or gives a plain kernel its meta and
    options from a KernelConfig). With a launch hook installed (:func:`set_launch_hook`) the hook
    receives the call and nothing runs. Unregistered kernels are refused, so the compile check
    cannot miss a launched kernel.
    """
    entry = kernel_entry(kernel)
    if entry is None:
        raise RuntimeError(
            f"{base_kernel(kernel)!r} is not registered: decorate it with register_kernel "
            "(vitkern.ops._triton) so the static compile check covers it"
        )
    forced = KernelConfig.coerce(config) if config is not None else None
    if _LAUNCH_HOOK is not None:
        return _LAUNCH_HOOK(entry, grid, args, kwargs, forced)
    if INTERPRETING:
        check_launch_args(entry, args, kwargs, forced)
    index = launch_device(args, kwargs)
    if index is not None:
        with torch.cuda.device(index):
            return _run(entry, grid, args, kwargs, forced)
    return _run(entry, grid, args, kwargs, forced)


def _run(entry: KernelEntry, grid, args: tuple, kwargs: dict, forced: Optional[KernelConfig]):
    """The launch itself, on the current device (see :func:`launch_device`)."""
    if forced is not None:
        return entry.kernel[grid](*args, **kwargs, **forced.all_kwargs())
    if entry.autotuned:
        if INTERPRETING:
            arch = device_arch()
        else:
            device = _first_device(args, kwargs)
            arch = device_arch(device if device is not None and device.type == "cuda" else None)
        return entry.tuner(arch)[grid](*args, **kwargs)
    return entry.kernel[grid](*args, **kwargs)
