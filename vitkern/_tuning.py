"""The measured choice behind "auto": time each fast backend once per shape class, keep the winner.

On a tuned device (CUDA), the first eager call of an op in a new *shape class* (:func:`tuning_key`:
the op, the arch, whether the call needs a backward, each tensor argument's dtype and power-of-two
bucketed sizes, and the options that change the code path: flags, activation names, which
optional tensors are present) times every fast backend that accepts the call (:data:`CANDIDATES`:
"triton", "cuda", "torch"; never the fp32 reference, which materialises full score matrices) on
the call's own shapes, forward and, when the call needs one, backward; the fastest median wins.
The winner is kept in memory and in an on-disk cache (:func:`cache_path`) keyed by the GPU, its
driver and the versions of torch, triton and vitkern, so a later process (another DDP rank, the
next run) reads it instead of timing again.

Timing never happens while ``torch.compile`` traces, while a CUDA graph is being captured, under
``torch.use_deterministic_algorithms(True)`` (a candidate may be nondeterministic), on tensor
subclasses, or with ``VITKERN_AUTOTUNE=0``. There the choice is the cached one if any, else the
static table :data:`vitkern._backend.AUTO_CUDA_PREFERENCE` (seeded from committed GPU results),
else "torch". :func:`tune` runs a model once so that every shape class it has is measured before
a ``torch.compile`` or a graph capture needs it.

Timing costs a host synchronisation and a few repetitions of each candidate once per shape class
and process (none when the disk cache has it). Every candidate meets the op's documented tolerance
against the reference, so a different winner never moves a result beyond it; pin a backend with
``vitkern.use_backend(...)`` for bit-reproducible runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

__all__ = [
    "CANDIDATES",
    "TUNED_DEVICES",
    "Choice",
    "TuningTable",
    "cache_path",
    "choose",
    "clear_memory_cache",
    "cuda_event_timer",
    "tune",
    "tuning_key",
]

# The backends "auto" times against each other; the reference never runs on a tuned device's hot
# path (it is the fp32 correctness path and can run out of memory on long sequences).
CANDIDATES = ("triton", "cuda", "torch")

# Device types whose calls are timed; everything else keeps the fixed order of _backend.
TUNED_DEVICES = frozenset({"cuda"})

# Repetitions of each candidate: the warm-up ones compile and fill caches, the timed ones give the
# median. Small on purpose: this runs once per shape class, inside the user's first call.
WARMUP = 3
REPEATS = 10

CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Choice:
    """One shape class's decision. ``source``: "measured" (timed in this process), "cache" (read
    from the disk cache), "static" (the table or the "torch" fallback; nothing measured) or
    "only" (one candidate accepted the call). ``times_ms``: each timed candidate's median
    (``inf`` when it failed), empty unless measured."""

    op: str
    key: str
    backend: str
    source: str
    times_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Shape classes
# --------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _option(value) -> Optional[str]:
    # Options that change the code path: flags, names, integers (head counts, patch sizes). Float
    # options (scale, eps) do not change which kernel runs and would split classes needlessly.
    if isinstance(value, (bool, str)) or value is None:
        return str(value)
    if isinstance(value, torch.dtype):  # an output dtype (layer_norm's out_dtype)
        return _dtype_name(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return "x".join(str(v) for v in value)
    return None


def needs_backward(args: Sequence, kwargs: Mapping) -> bool:
    """Whether autograd will differentiate this call (so its backward is timed with it)."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def tuning_key(op: str, arch: str, args: Sequence, kwargs: Mapping, backward: bool) -> str:
    """The shape class of a call, as a string (the disk cache's key). Built from plain string and
    integer operations only, so that ``torch.compile`` traces it without a graph break."""
    parts = [op, arch, "fwd+bwd" if backward else "fwd"]
    named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, a in named:
        if isinstance(a, torch.Tensor):
            dims = "x".join(str(_bucket(d)) for d in a.shape)
            parts.append(name + ":" + _dtype_name(a.dtype) + "[" + dims + "]")
        else:
            option = _option(a)
            if option is not None:
                parts.append(name + "=" + option)
    return " ".join(parts)


def _arch(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return device.type


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def cuda_event_timer(runs: Mapping[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    """Median milliseconds of each run on ``device``'s current stream (CUDA events): ``WARMUP``
    untimed calls, then ``REPEATS`` timed ones. A run that raises (out of memory, a compile
    failure) gets ``inf``; the error goes to a warning, it never fails the user's call."""
    times: dict[str, float] = {}
    with torch.cuda.device(device):
        for name, run in runs.items():
            try:
                for _ in range(WARMUP):
                    run()
                torch.cuda.synchronize()
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(REPEATS)]
                for start, end in events:
                    start.record()
                    run()
                    end.record()
                torch.cuda.synchronize()
                times[name] = statistics.median(s.elapsed_time(e) for s, e in events)
            except Exception as error:  # noqa: BLE001  (a failing candidate is only excluded)
                torch.cuda.synchronize()
                times[name] = math.inf
                warnings.warn(f"vitkern auto-tuning: backend {name!r} failed while being timed and is "
                              f"skipped for this shape class ({type(error).__name__}: {error})", stacklevel=3)
    return times


# Replaceable for tests (a fake timer) and for a user who wants more repetitions.
timer: Callable[[Mapping[str, Callable[[], None]], torch.device], dict[str, float]] = cuda_event_timer


def _private_inputs(args: Sequence, kwargs: Mapping) -> tuple[list, dict, list[torch.Tensor]]:
    """The call's arguments with every tensor that needs a gradient replaced by a detached leaf of
    the same values, so timing never touches the user's autograd graph or ``.grad``."""
    leaves: list[torch.Tensor] = []

    def private(a):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            leaf = a.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        return a

    return [private(a) for a in args], {k: private(v) for k, v in kwargs.items()}, leaves


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _make_run(fn: Callable, args: Sequence, kwargs: Mapping, backward: bool) -> Callable[[], None]:
    p_args, p_kwargs, leaves = _private_inputs(args, kwargs)
    if not backward:
        def forward_only() -> None:
            with torch.no_grad():
                fn(*p_args, **p_kwargs)
        return forward_only
    grad: list[torch.Tensor] = []

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = _first_tensor(fn(*p_args, **p_kwargs))
        if not grad:
            grad.append(torch.ones_like(out))  # no RNG draw: tuning leaves the random stream alone
        out.backward(grad[0])

    return forward_backward


# --------------------------------------------------------------------------------------------
# When timing may run
# --------------------------------------------------------------------------------------------

_force_timing = threading.local()


def _autotune_enabled() -> bool:
    if getattr(_force_timing, "on", False):
        return True
    return os.environ.get("VITKERN_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def _stream_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def timing_blocked(args: Sequence, kwargs: Mapping) -> Optional[str]:
    """Why this call may not be timed (None: it may)."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if _stream_capturing():
        return "a CUDA graph is being captured"
    if torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms is on"
    if not _autotune_enabled():
        return "VITKERN_AUTOTUNE=0"
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter):
            return f"a tensor subclass ({type(a).__name__})"
    return None


# --------------------------------------------------------------------------------------------
# The caches: this process's choices, and the disk file shared across processes
# --------------------------------------------------------------------------------------------

_lock = threading.RLock()
_memory: dict[str, dict[str, dict]] = {}  # cache file -> key -> entry read from / written to it
_decisions: dict[str, Choice] = {}  # every decision of this process, for tune() and the benchmarks
_warned: set[str] = set()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment(device: torch.device) -> dict[str, str]:
    """What a measurement depends on besides the call: the device, its driver, the software."""
    from vitkern._version import __version__

    env = {"torch": torch.__version__, "triton": _version("triton"), "vitkern": __version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: "unknown")()
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   driver=str(driver), cuda=str(torch.version.cuda))
    else:
        env.update(device=device.type, machine=platform.machine())
    return env


def cache_dir() -> Path:
    """``$VITKERN_TUNING_CACHE``, else ``$XDG_CACHE_HOME/vitkern/tuning`` (``~/.cache/...``)."""
    explicit = os.environ.get("VITKERN_TUNING_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitkern" / "tuning"


def cache_path(device: torch.device) -> Path:
    """The cache file of ``device``'s environment: one file per GPU model, driver and versions."""
    env = environment(device)
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower() or "device"
    return cache_dir() / f"{slug}-{digest}.json"


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, stacklevel=4)


def _read_file(path: Path, env: dict, warn: bool) -> dict[str, dict]:
    """The entries of a cache file; a missing file is empty, a corrupt or foreign one is ignored
    (with one warning when ``warn``)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:
        reason = f"unreadable ({error})"
    else:
        try:
            data = json.loads(text)
        except ValueError as error:
            reason = f"not valid JSON ({error})"
        else:
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                reason = f"not a vitkern tuning cache of format {CACHE_FORMAT}"
            elif data.get("environment") != env:
                reason = "written for another GPU, driver or software version"
            elif not isinstance(data.get("entries"), dict):
                reason = "it has no entries table"
            else:
                return {k: v for k, v in data["entries"].items()
                        if isinstance(v, dict) and isinstance(v.get("backend"), str)}
    if warn:
        _warn_once(f"read:{path}", f"vitkern: ignoring the tuning cache {path}: {reason}; shapes are "
                                   "timed again and the file is rewritten")
    return {}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: the atomic replace still holds
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_file(path: Path, env: dict, entries: dict[str, dict]) -> None:
    """Merge ``entries`` into the file under an exclusive lock and replace it atomically, so
    concurrent writers (DDP ranks) neither lose each other's entries nor leave a torn file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_name(path.name + ".lock")):
            merged = {**_read_file(path, env, warn=False), **entries}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump({"format": CACHE_FORMAT, "environment": env, "entries": merged},
                              handle, indent=1, sort_keys=True)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as error:
        _warn_once(f"write:{path}", f"vitkern: cannot write the tuning cache {path} ({error}); the "
                                    "choices are kept for this process only (VITKERN_TUNING_CACHE moves it)")


def _file_entries(device: torch.device) -> tuple[Path, dict, dict[str, dict]]:
    path = cache_path(device)
    env = environment(device)
    entries = _memory.get(str(path))
    if entries is None:
        entries = _memory[str(path)] = _read_file(path, env, warn=True)
    return path, env, entries


def clear_memory_cache() -> None:
    """Forget this process's choices (the disk cache stays): the next call of each shape class
    reads the file again."""
    with _lock:
        _memory.clear()
        _decisions.clear()
        _settled.clear()


# --------------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------------


def static_choice(op: str, names: Sequence[str]) -> str:
    """The choice without a measurement: the table's order for ``op``, then "torch", then the
    candidates in their given order."""
    from vitkern._backend import AUTO_CUDA_PREFERENCE

    for name in (*AUTO_CUDA_PREFERENCE.get(op, ()), "torch", *names):
        if name in names:
            return name
    raise ValueError(f"no candidate backend for {op!r}")


@torch.compiler.assume_constant_result
def _choice_while_compiling(op: str, key: str, names: str, device_type: str, device_index: int) -> str:
    # Runs at trace time with the real values; torch.compile bakes the result into the graph (a
    # later change of the cache does not recompile, as a tuned choice should not).
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    candidates = names.split(",")
    with _lock:
        _, _, entries = _file_entries(device)
        entry = entries.get(key)
    if entry is not None and entry["backend"] in candidates:
        return entry["backend"]
    return static_choice(op, candidates)


def _call_signature(op: str, device: torch.device, names: tuple, args: Sequence, kwargs: Mapping) -> tuple:
    # The exact call (unbucketed sizes, requires_grad, grad mode, option values): the memo of
    # settled choices, much cheaper on every later call than building the shape-class string.
    return (op, device, names, torch.is_grad_enabled(),
            *[(a.shape, a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else a
              for a in (*args, *kwargs.values())])


_settled: dict[tuple, Choice] = {}  # call signature -> a choice that will not change in this process


def choose(op: str, device: torch.device, candidates: Mapping[str, Callable], args: Sequence,
           kwargs: Mapping) -> Choice:
    """The backend "auto" runs for this call among ``candidates`` (name -> implementation, every
    one of them able to serve it)."""
    names = tuple(candidates)
    if torch.compiler.is_compiling():
        key = tuning_key(op, _arch(device), args, kwargs, needs_backward(args, kwargs))
        index = -1 if device.index is None else device.index
        return Choice(op, key, _choice_while_compiling(op, key, ",".join(names), device.type, index), "static")
    signature = _call_signature(op, device, names, args, kwargs)
    try:
        settled = _settled.get(signature)
    except TypeError:  # an unhashable option value: no memo for this call
        signature, settled = None, None
    if settled is not None:
        return _remember(settled) if _recorders else settled
    choice = _decide(op, device, candidates, names, args, kwargs, needs_backward(args, kwargs))
    if signature is not None and choice.source != "static":  # a static choice is made again once timing is allowed
        with _lock:
            _settled[signature] = choice
    return choice


def _decide(op: str, device: torch.device, candidates: Mapping[str, Callable], names: tuple, args: Sequence,
            kwargs: Mapping, backward: bool) -> Choice:
    key = tuning_key(op, _arch(device), args, kwargs, backward)
    if len(names) == 1:
        return _remember(Choice(op, key, names[0], "only"))
    with _lock:
        path, env, entries = _file_entries(device)
        entry = entries.get(key)
    if entry is not None and entry["backend"] in names:
        times = {k: float(v) if v is not None else math.inf for k, v in entry.get("times_ms", {}).items()}
        return _remember(Choice(op, key, entry["backend"], "cache", times))
    blocked = timing_blocked(args, kwargs)
    if blocked is not None:
        return _remember(Choice(op, key, static_choice(op, names), "static"))
    runs = {name: _make_run(fn, args, kwargs, backward) for name, fn in candidates.items()}
    times = {name: float(t) for name, t in timer(runs, device).items() if name in candidates}
    finite = {name: t for name, t in times.items() if math.isfinite(t)}
    if not finite:
        return _remember(Choice(op, key, static_choice(op, names), "static", times))
    winner = min(finite, key=finite.get)
    entry = {"backend": winner, "times_ms": {k: (v if math.isfinite(v) else None) for k, v in times.items()}}
    with _lock:
        entries[key] = entry
        _write_file(path, env, {key: entry})
    return _remember(Choice(op, key, winner, "measured", times))


def _remember(choice: Choice) -> Choice:
    with _lock:
        _decisions[choice.key] = choice
    for record in _recorders:
        record[choice.key] = choice
    return choice


# --------------------------------------------------------------------------------------------
# vitkern.tune
# --------------------------------------------------------------------------------------------

_recorders: list[dict[str, Choice]] = []


class TuningTable(list):
    """The choices :func:`tune` made (a list of :class:`Choice`); ``str()`` renders the table."""

    def __str__(self) -> str:
        backends = [b for b in CANDIDATES if any(b in c.times_ms for c in self)]
        header = ["op", "shape class", *[f"{b} ms" for b in backends], "winner", "source"]
        rows = [header]
        for c in self:
            shape = c.key.split(" ", 1)[1] if " " in c.key else c.key
            rows.append([c.op, shape, *[_ms(c.times_ms.get(b)) for b in backends], c.backend, c.source])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _ms(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return "failed" if not math.isfinite(t) else f"{t:.4f}"


@contextlib.contextmanager
def recording() -> Iterator[dict[str, Choice]]:
    """Collect every decision made inside the block (key -> :class:`Choice`)."""
    record: dict[str, Choice] = {}
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)


def decisions() -> TuningTable:
    """Every decision this process has made so far."""
    with _lock:
        return TuningTable(_decisions.values())


def _tensors_in(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_in(o)


def tune(model: torch.nn.Module, example_inputs, backward: bool = True, *, verbose: bool = True) -> TuningTable:
    """Measure every shape class of ``model`` once, so that a later ``torch.compile`` or CUDA graph
    capture (which never time) finds them all in the cache.

    Runs ``model(*example_inputs)`` once in eager mode (through a compiled module's original
    module), with the gradient enabled when ``backward`` (so training shape classes are timed
    forward + backward) and timing on even under ``VITKERN_AUTOTUNE=0``. The model's parameters,
    their ``.grad`` and the random number streams are left as they were (buffers that a forward
    updates, such as batch-norm statistics, are not). Returns the choices as a :class:`TuningTable` and, when
    ``verbose``, prints it.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    module = getattr(model, "_orig_mod", model)
    cuda_devices = sorted({t.device.index or 0 for t in _tensors_in(example_inputs) if t.device.type == "cuda"})
    previous = getattr(_force_timing, "on", False)
    _force_timing.on = True
    try:
        # fork_rng: the tuning forward (dropout, drop path) leaves the random streams as they were
        with torch.random.fork_rng(devices=cuda_devices), recording() as record, \
                (torch.enable_grad() if backward else torch.no_grad()):
            module(*example_inputs)
    finally:
        _force_timing.on = previous
    table = TuningTable(record.values())
    if verbose:
        print(table)
    return table
