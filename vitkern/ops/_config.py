"""Kernel configs as data and the device queries that pick them: no Triton import here.

Config tables (``vitkern/ops/<op>/configs.py``) are lists of :class:`KernelConfig`; launchers read
:func:`device_arch` (the arch family whose configs run) and :func:`available_sms` (persistent grids
and split-K choices: :func:`num_sms` less the SM carve-out, ``VITKERN_SM_CARVEOUT``).
This module imports only torch, so that ``import vitkern`` works where Triton is not installed
(macOS, Windows, CPU-only machines: the reference backend serves every op there); the Triton
side of the launch path (the kernel registry, :func:`~vitkern.ops._triton.launch`, the device
helpers ``dot_operand`` / ``round_to``) is :mod:`vitkern.ops._triton`, imported only by kernel
and launcher modules.

Device queries are never made under the interpreter (fixed values) nor while the static compile
check records launches (:func:`arch_override`: the arch being checked and its SM count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
from typing import Any, Iterator, Mapping, Optional, Union

import torch

__all__ = [
    "INTERPRETING",
    "TRITON_36",
    "INTERPRET_NUM_SMS",
    "CHECK_ARCHS",
    "KernelConfig",
    "arch_family",
    "arch_override",
    "available_sms",
    "device_arch",
    "num_sms",
    "set_sm_carveout",
    "sm_carveout",
    "triton_available",
]


def _env_flag(name: str) -> bool:
    # Triton's own parsing of its boolean knobs (getenv_bool in its C++ runtime)
    return os.environ.get(name, "").lower() in ("1", "true", "on")


#: True when @triton.jit kernels run on the CPU through ``TRITON_INTERPRET=1`` (read once, at
#: import; the switch must be set before triton is imported anyway).
INTERPRETING: bool = _env_flag("TRITON_INTERPRET")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# Found once at import: backend selection asks on every call, and torch.compile traces that call
# (a lookup through importlib there is a graph break on torch 2.11).
_TRITON_FOUND: bool = _find_triton()


def triton_available() -> bool:
    """True when Triton is importable (checked at import, without importing it)."""
    return _TRITON_FOUND


def _triton_version() -> tuple[int, int]:
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


#: Triton before 3.7 (the GPU machines run 3.6): its register allocation differs from 3.8's, and
#: the few config entries where no tile compiles without spills on both pick by it. Read from the
#: installed distribution's metadata, so config tables need no Triton import.
TRITON_36: bool = (0, 0) < _triton_version() < (3, 7)

#: Program count that :func:`num_sms` reports under the interpreter (persistent grids stay small).
INTERPRET_NUM_SMS = 4

#: The arch families the static compile check covers.
CHECK_ARCHS = (80, 90)

# SM counts reported under arch_override (A100 SXM, H100 SXM): they only size grids.
_OVERRIDE_NUM_SMS = {80: 108, 90: 132}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

_OPTION_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: constexpr meta-parameters plus the compiler options.

    ``archs``: the arch families (80, 90; see :func:`arch_family`) the config is meant for; None
    means every arch. ``bench``: a benchmark shape selects this config, so the default (fast)
    compile check covers it besides each kernel's first config; the full check covers all.
    """

    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    num_ctas: int = 1
    maxnreg: Optional[int] = None
    archs: Optional[tuple[int, ...]] = None
    bench: bool = False

    def __post_init__(self):
        object.__setattr__(self, "meta", dict(self.meta))
        if self.archs is not None:
            archs = (self.archs,) if isinstance(self.archs, int) else tuple(self.archs)
            object.__setattr__(self, "archs", archs)
        if self.num_warps <= 0 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        clash = set(self.meta) & set(_OPTION_FIELDS)
        if clash:
            raise ValueError(f"{sorted(clash)} are compiler options, not meta-parameters: pass them as fields")

    @classmethod
    def coerce(cls, value: Union["KernelConfig", Mapping[str, Any], Any]) -> "KernelConfig":
        """A KernelConfig from itself, a ``triton.Config``, or a flat dict such as
        ``{"BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "archs": (90,), "bench": True}``."""
        if isinstance(value, KernelConfig):
            return value
        if _is_triton_config(value):
            return cls(dict(value.kwargs), num_warps=value.num_warps, num_stages=value.num_stages,
                       num_ctas=value.num_ctas, maxnreg=value.maxnreg)
        if isinstance(value, Mapping):
            fields = {k: value[k] for k in (*_OPTION_FIELDS, "archs", "bench") if k in value}
            meta = {k: v for k, v in value.items() if k not in fields}
            return cls(meta, **fields)
        raise TypeError(f"cannot make a KernelConfig from {value!r}")

    def __hash__(self):
        return hash((tuple(sorted(self.meta.items())), self.num_warps, self.num_stages, self.num_ctas,
                     self.maxnreg, self.archs, self.bench))

    def applies_to(self, arch: int) -> bool:
        return self.archs is None or arch in self.archs

    def options(self) -> dict[str, Any]:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages, "num_ctas": self.num_ctas}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def all_kwargs(self) -> dict[str, Any]:
        """Meta-parameters and compiler options, as a launch passes them to the kernel."""
        return {**self.meta, **self.options()}

    def to_triton(self):
        """The ``triton.Config`` of this config (imports Triton)."""
        import triton

        return triton.Config(dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages,
                             num_ctas=self.num_ctas, maxnreg=self.maxnreg)

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.meta.items()]
        parts.append(f"w{self.num_warps}")
        parts.append(f"s{self.num_stages}")
        if self.num_ctas != 1:
            parts.append(f"ctas{self.num_ctas}")
        if self.maxnreg is not None:
            parts.append(f"maxnreg{self.maxnreg}")
        return " ".join(parts)



def _is_triton_config(value) -> bool:
    # A triton.Config can only exist once Triton is imported; do not import it to find out.
    import sys

    triton = sys.modules.get("triton")
    return triton is not None and isinstance(value, triton.Config)


# --------------------------------------------------------------------------------------------
# Device queries (never made under the interpreter or under arch_override)
# --------------------------------------------------------------------------------------------

_OVERRIDE: dict[str, Optional[int]] = {"arch": None}


@contextlib.contextmanager
def arch_override(arch: int) -> Iterator[None]:
    """Make :func:`device_arch` report ``arch`` (80 or 90) and :func:`num_sms` that family's SM
    count, without a device query: the static compile check's capture runs launchers as on that
    arch. Not thread-safe, does not nest."""
    if arch not in (80, 90):
        raise ValueError(f"capture arch must be 80 or 90, got {arch!r}")
    if _OVERRIDE["arch"] is not None:
        raise RuntimeError("arch_override() does not nest")
    _OVERRIDE["arch"] = arch
    try:
        yield
    finally:
        _OVERRIDE["arch"] = None


def arch_family(capability: int) -> int:
    """The config family of a compute capability (``major * 10 + minor``).

    90 for sm_90 and the data-centre parts after it (large shared memory; wgmma on sm_90), 80 for
    sm_80..sm_89 and consumer sm_12x. The static check compiles both families, for sm_80 and
    sm_90a; other archs run configs checked for their family.
    """
    if 90 <= capability < 120:
        return 90
    return 80


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.multi_processor_count


def _cuda_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device queries need a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device=None) -> int:
    """Streaming multiprocessor count, for persistent grids.

    Under the interpreter: :data:`INTERPRET_NUM_SMS` (no device query). Under :func:`arch_override`:
    the SM count of the arch being checked (it only sizes the grid).
    """
    arch = _OVERRIDE["arch"]
    if arch is not None:
        return _OVERRIDE_NUM_SMS[arch]
    if INTERPRETING:
        return INTERPRET_NUM_SMS
    return _cuda_properties(_cuda_index(device))[1]


def device_arch(device=None) -> int:
    """The arch family (80 or 90, see :func:`arch_family`) whose configs run on ``device``.

    Under :func:`arch_override`: the arch being checked. Under the interpreter: ``VITKERN_INTERPRET_ARCH``
    (default 90), so CPU tests take the sm_90 launch path unless told otherwise.
    """
    arch = _OVERRIDE["arch"]
    if arch is not None:
        return arch
    if INTERPRETING:
        return arch_family(int(os.environ.get("VITKERN_INTERPRET_ARCH", "90")))
    return arch_family(_cuda_properties(_cuda_index(device))[0])


# --------------------------------------------------------------------------------------------
# SM carve-out: SMs that persistent grids and split-K choices leave to other kernels
# --------------------------------------------------------------------------------------------

#: The environment variable of the SM carve-out (default 0).
SM_CARVEOUT_ENV = "VITKERN_SM_CARVEOUT"

_CARVEOUT: dict[str, Optional[int]] = {"value": None}  # set_sm_carveout's value; None: the env


def _check_carveout(value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source} must be a non-negative integer (SMs left to other kernels), got {value!r}")
    if value < 0:
        raise ValueError(f"{source} must be a non-negative integer (SMs left to other kernels), got {value}")
    return value


def sm_carveout() -> int:
    """SMs that persistent grids and the split-K choice leave free: :func:`set_sm_carveout`'s
    value when set, else ``VITKERN_SM_CARVEOUT`` (read at each call), else 0.

    With NCCL kernels of DDP / FSDP running beside the GEMMs, some SMs are busy: a grid sized to
    every SM then has CTAs that start a wave late. A carve-out of, e.g., the NCCL channel count
    sizes grids to the SMs that are free."""
    value = _CARVEOUT["value"]
    if value is not None:
        return value
    raw = os.environ.get(SM_CARVEOUT_ENV, "").strip()
    if not raw:
        return 0
    try:
        parsed = int(raw)
    except ValueError:
        raise ValueError(f"{SM_CARVEOUT_ENV} must be a non-negative integer (SMs left to other kernels), "
                         f"got {raw!r}") from None
    return _check_carveout(parsed, SM_CARVEOUT_ENV)


def set_sm_carveout(value: Optional[int]) -> Optional[int]:
    """Set the SM carve-out for this process (overrides ``VITKERN_SM_CARVEOUT``; None: back to the
    variable). Returns the previous setting (None when the variable applied). Checked against
    the device's SM count at launch (:func:`available_sms`)."""
    if value is not None:
        value = _check_carveout(value, "set_sm_carveout(value)")
    previous = _CARVEOUT["value"]
    _CARVEOUT["value"] = value
    return previous


def available_sms(device=None) -> int:
    """:func:`num_sms` less :func:`sm_carveout`: the SMs persistent grids and split-K choices size
    against. Raises ValueError, naming the setting, when the carve-out leaves no SM."""
    total = num_sms(device)
    carve = sm_carveout()
    if carve >= total:
        source = "set_sm_carveout()" if _CARVEOUT["value"] is not None else SM_CARVEOUT_ENV
        raise ValueError(f"{source} = {carve} must be below the SM count ({total}): it would leave no SM "
                         f"for persistent grids")
    return total - carve
