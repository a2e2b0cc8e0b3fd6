"""Where the numbers come from and what bounds them: the machine and library versions a run
records (no hostname), and the GPU ceilings its roofline percentages are against.

- :func:`environment`: device, driver, library versions, the vitkern build, commit and date.
- :func:`measure_ceilings` (GPU only): a large GEMM in the run's dtype and a 1 GiB device-to-device
  copy, measured at the start of the run; a row's ``pct_of_ceiling`` is the roofline floor
  ``max(flops / gemm_peak, bytes / copy_bandwidth)`` as a percentage of its measured median, and
  :func:`ridge_point` (their ratio) is where a case turns from memory to compute bound.
- :func:`l2_bytes`: the L2 size that rotating input copies must exceed.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks.providers import load_vitkern
from benchmarks.results import DTYPE_NAMES
from benchmarks.timing import measure

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100 SXM; the device's own size is used when torch reports it
# FLOP per byte above which a case counts as compute bound when no ceilings were measured
# (an H100's bf16 GEMM / copy ceilings: ~800 TFLOP/s over ~3 TB/s).
DEFAULT_RIDGE = 250.0


def _run_quiet(cmd: Sequence[str], cwd=None, timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _cpu_name() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _fp32_precision() -> Optional[str]:
    try:
        return str(torch.backends.cuda.matmul.fp32_precision)
    except Exception:
        try:
            return torch.get_float32_matmul_precision()
        except Exception:
            return None


def environment(device: torch.device) -> dict:
    """Where the numbers come from: device, driver and library versions, commit and date (no hostname)."""
    vk, vk_err = load_vitkern()
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": _cpu_name() or "cpu",
        "device_count": 1,
        "compute_capability": None,
        "gpu_memory_bytes": None,
        "l2_cache_bytes": None,
        "driver_version": None,
        "cuda_version": torch.version.cuda,
        "cudnn_version": None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "xformers": _version("xformers"),
        "python": platform.python_version(),
        "vitkern": getattr(vk, "__version__", None),
        "vitkern_import_error": vk_err,
        "cuda_extension_available": None,
        "backend_default": None,
        "git_commit": None,
        "git_dirty": None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "torch_num_threads": torch.get_num_threads(),
        "matmul_fp32_precision": _fp32_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_count"] = torch.cuda.device_count()
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = int(props.total_memory)
        l2 = getattr(props, "L2_cache_size", None)
        env["l2_cache_bytes"] = int(l2) if l2 else None
        try:
            env["cudnn_version"] = torch.backends.cudnn.version()
        except Exception:
            pass
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver_version"] = smi.splitlines()[0].strip() if smi else None
    if vk is not None:
        try:
            env["cuda_extension_available"] = bool(vk.cuda_extension_available())
        except Exception:
            env["cuda_extension_available"] = None
        try:
            env["backend_default"] = vk.get_backend()
        except Exception:
            pass
    commit = _run_quiet(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit:
        env["git_commit"] = commit
        status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
        env["git_dirty"] = bool(status) if status is not None else None
    return env


def _gemm_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: torch.mm(a, b), device, flush_l2=False, warmup_ms=100, rep_ms=300)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def _copy_ceiling(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, flush_l2=False, warmup_ms=50, rep_ms=200)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9  # read + write


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """GPU ceilings for ``pct_of_ceiling``: an 8192^3 GEMM in ``dtype`` (cuBLAS through torch.mm)
    and a 1 GiB device-to-device copy, each the median of many repetitions (about 0.5 s each)."""
    n, nbytes = 8192, 1 << 30
    gemm_tflops = _gemm_ceiling(device, dtype, n)
    copy_gbps = _copy_ceiling(device, nbytes)
    torch.cuda.empty_cache()
    return {
        "gemm_tflops": round(gemm_tflops, 2),
        "gemm_shape": [n, n, n],
        "gemm_dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "copy_gbps": round(copy_gbps, 1),
        "copy_bytes": nbytes,
    }


def ridge_point(ceilings: Optional[dict]) -> float:
    """FLOP per byte where the measured ceilings meet (:data:`DEFAULT_RIDGE` without them)."""
    return ceilings["gemm_tflops"] * 1e3 / ceilings["copy_gbps"] if ceilings else DEFAULT_RIDGE


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
            if l2:
                return int(l2)
        except Exception:
            pass
    return DEFAULT_L2_BYTES
