"""The results schema: the rows a run produces, how they are filled, checked and written.

``results.json`` is the record of a run; the README section, ``summary.md`` and the plots are all
rendered from it alone. Its schema (version :data:`SCHEMA_VERSION`; :func:`validate_results`
checks it)::

    {
      "schema_version": 3,
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
      "l2_flush": bool | null,                            # L2 flushed before each repetition
      "auto_choices": null | [                            # "vitkern" rows: what "auto" ran for
        {"op": str, "shape_class": str, "backend": str,   #   each op and shape class of the case
         "source": "measured" | "cache" | "static" | "only",
         "times_ms": {backend: float | null}}             #   each candidate's time (null: failed)
      ]
    }

A reference provider is any whose name does not start with "vitkern" (:func:`benchmarks.cases.is_reference`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.cases import best_reference, is_reference
from benchmarks.flops import ALL_MODES
from benchmarks.setups import Case, Setup, shape_label
from benchmarks.timing import Timing

SCHEMA_VERSION = 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

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
    "auto_choices": (list, type(None)),
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


def new_row(
    setup: Setup, shape: dict, provider: str, mode: str, dtype_name: str, device: torch.device, case: Optional[Case]
) -> dict:
    """The row of one (setup, shape, provider, mode) before it runs: "ok", its FLOPs and bytes from the
    case's cost (none when the case could not be built), every measured field null."""
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
        "auto_choices": None,
    }


def fill_timing(row: dict, t: Timing, ceilings: Optional[dict], items: Optional[int]) -> None:
    """The timing fields of ``row`` and the rates from its median: TFLOP/s, GB/s, items/s, and against
    ``ceilings`` (GPU runs) the roofline ``pct_of_ceiling`` and whether the case is compute or memory bound."""
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


def fill_speedups(rows: list[dict]) -> None:
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


def short_error(exc: BaseException, limit: int = 300) -> str:
    """An exception as a one-line note of at most ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def join_notes(a: Optional[str], b: str) -> str:
    """A row's note ``a`` with ``b`` appended."""
    return f"{a}; {b}" if a else b


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
    for choice in row.get("auto_choices") or ():
        if not isinstance(choice, dict) or set(choice) != {"op", "shape_class", "backend", "source", "times_ms"}:
            problems.append(f"auto_choices entries need op, shape_class, backend, source, times_ms: got {choice!r}")
        elif choice["source"] not in ("measured", "cache", "static", "only"):
            problems.append(f"auto_choices source must be measured / cache / static / only, got {choice['source']!r}")
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


def _finite(value):
    """The document with NaN / inf floats as null: results.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` through a temporary file, so that a reader never sees half a document."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value))
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
