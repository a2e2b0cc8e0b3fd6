"""The compile cases: each op's ``compile_cases.py`` registers functions that call its launchers
with representative inputs, and :func:`capture` records the launches they make instead of running
them.

Default cases launch every kernel variant (constexpr flags, dtypes) once, plus the benchmark
shapes; ``@compile_cases(slow=True)`` cases run only in the full check. Cases use CPU (or meta)
tensors: nothing runs under capture and large CPU tensors are never touched, so the benchmark
shapes cost nothing (see :mod:`vitkern.ops._triton` on pointer alignment).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

from vitkern.ops._config import arch_override, KernelConfig

__all__ = ["CasesEntry", "CapturedLaunch", "compile_cases", "registered_cases", "capture", "run_cases"]


@dataclasses.dataclass(frozen=True)
class CasesEntry:
    """A registered compile-cases function (see :func:`compile_cases`)."""

    fn: Callable[[], Any]
    slow: bool

    @property
    def module(self) -> str:
        return self.fn.__module__

    @property
    def name(self) -> str:
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


_CASES: list[CasesEntry] = []


def compile_cases(fn=None, *, slow: bool = False):
    """Register a function that calls an op's launchers with representative inputs.

    The static compile check runs it under :func:`capture` once per arch. Default cases should
    launch every kernel variant (constexpr flags, dtypes) once, plus the benchmark shapes;
    ``slow=True`` cases run only in the full check.
    """

    def decorate(f):
        _CASES.append(CasesEntry(f, slow))
        return f

    if fn is not None:
        return decorate(fn)
    return decorate


def registered_cases(module_prefix: Optional[str] = None) -> list[CasesEntry]:
    """The registered cases, of the modules at or below ``module_prefix`` when given."""
    return [c for c in _CASES if module_prefix is None or c.module == module_prefix
            or c.module.startswith(module_prefix + ".")]


@dataclasses.dataclass
class CapturedLaunch:
    """One launch recorded under :func:`capture` (nothing ran)."""

    entry: Any  # vitkern.ops._triton.KernelEntry
    grid: Any
    args: tuple
    kwargs: dict
    config: Optional[KernelConfig]  # a config forced by the launcher (config=...)
    arch: int
    case: Optional[str]


class _Recorder:
    """The launch hook of one capture: checks each launch's arguments and records it."""

    def __init__(self, arch: int):
        self.arch = arch
        self.launches: list[CapturedLaunch] = []
        self.case: Optional[str] = None

    def __call__(self, entry, grid, args: tuple, kwargs: dict, forced: Optional[KernelConfig]) -> None:
        from vitkern.ops._triton import check_launch_args

        check_launch_args(entry, args, kwargs, forced)
        self.launches.append(CapturedLaunch(entry, grid, args, dict(kwargs), forced, self.arch, self.case))


_ACTIVE: dict[str, Optional[_Recorder]] = {"recorder": None}


@contextlib.contextmanager
def capture(arch: int) -> Iterator[list[CapturedLaunch]]:
    """Record launches instead of running them, as on an ``arch`` family device (80 or 90).

    ``with capture(90) as launches: cases()`` fills ``launches`` with :class:`CapturedLaunch`;
    :func:`~vitkern.ops._config.device_arch` and :func:`~vitkern.ops._config.num_sms` report
    ``arch`` meanwhile. Not thread-safe (the compile check captures in one thread); does not nest.
    """
    from vitkern.ops import _triton

    with arch_override(arch):
        recorder = _Recorder(arch)
        previous = _triton.set_launch_hook(recorder)
        if previous is not None:
            _triton.set_launch_hook(previous)
            raise RuntimeError("capture() does not nest")
        _ACTIVE["recorder"] = recorder
        try:
            yield recorder.launches
        finally:
            _ACTIVE["recorder"] = None
            _triton.set_launch_hook(None)


def run_cases(cases: CasesEntry) -> None:
    """Run one cases function inside an active capture, tagging its launches."""
    recorder = _ACTIVE["recorder"]
    if recorder is None:
        raise RuntimeError("run_cases needs an active capture()")
    recorder.case = cases.name
    try:
        cases.fn()
    finally:
        recorder.case = None
