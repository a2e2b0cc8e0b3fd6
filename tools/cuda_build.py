"""Build-time discovery for the vitkern CUDA extension (vitkern._C), and its source list.

Used by setup.py (loaded from this path with importlib, before vitkern is installed), by
scripts/cmake_check.sh (``python tools/cuda_build.py cmake-env``) and by
tests/test_build_helpers.py. Standard library only: nothing here imports torch, so the functions
can be unit-tested without compiling anything. It lives beside the build scripts, not in csrc/,
which holds only the C++/CUDA sources.

What it finds:
- the CUDA toolkit root: CUDA_HOME / CUDA_PATH when set, else the ``TOP=`` line that
  ``nvcc --dryrun`` prints (the ``nvcc`` first on PATH may be a wrapper script outside the toolkit,
  which makes torch's own guess, dirname(dirname(which nvcc)), wrong);
- cuBLAS / cuBLASLt headers and the versioned shared libraries, from the NVIDIA wheels that torch
  depends on (``site-packages/nvidia/cu13/...``; CUDA 12 wheels use ``nvidia/cublas/...``), else
  from the toolkit;
- nvrtc (torch's CMake package config wants it) the same way;
- the arch list (``VITKERN_CUDA_ARCHS`` -> ``TORCH_CUDA_ARCH_LIST``) and the ninja job count;
- the extension's sources, listed in tools/extension_sources.txt (CMakeLists.txt reads that file
  too, so a new source file is one line there).
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

# sm_80 code with its PTX (the PTX lets the driver JIT the kernels for GPUs newer than the list:
# sm_100, sm_120; it costs no extra compile pass, since the sm_80 code is built from that PTX)
# and sm_90a (wgmma / setmaxnreg). Never "9.0a+PTX": PTX of an arch-specific target only runs
# on that very arch.
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"
GIB = 1024**3
MEM_PER_JOB_GIB = 4

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """True when env[name] is 1/true/yes/on (case-insensitive); False when unset, empty or 0/false/no/off."""
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={env.get(name)!r}: expected one of 1/0, true/false, yes/no, on/off")


# --------------------------------------------------------------------------------------- version


def read_version(path: str) -> str:
    """The string assigned to ``__version__`` in `path`, read without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            if any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
                if isinstance(node.value.value, str):
                    return node.value.value
    raise ValueError(f"no __version__ = '...' assignment in {path}")


# -------------------------------------------------------------------------------------- sources

SOURCES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extension_sources.txt")


def read_sources(path: str = SOURCES_FILE) -> list[str]:
    """The source files listed in `path`, one a line, in order.

    A line that is empty or starts with '#', a space or a tab is skipped: the selection CMake's
    ``file(STRINGS ... REGEX "^[^# \\t]")`` makes, so that setup.py and CMakeLists.txt read the
    same list.
    """
    with open(path, encoding="utf-8") as f:
        sources = [line.rstrip("\n") for line in f if line[:1] not in ("", "\n", "#", " ", "\t")]
    if not sources:
        raise ValueError(f"no source files listed in {path}")
    return sources


# ------------------------------------------------------------------------------------ CUDA home


def parse_nvcc_dryrun_top(text: str) -> Optional[str]:
    """The value of the ``TOP=`` line in ``nvcc --dryrun`` output (``#$ TOP=/usr/local/cuda/bin/..``).

    Returns the path as printed (not resolved), or None when there is no such line.
    """
    for line in text.splitlines():
        m = re.match(r"^\s*#\$\s*TOP=(.*?)\s*$", line)
        if m and m.group(1):
            value = m.group(1)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            return value
    return None


def nvcc_dryrun_top(nvcc: str, run: Callable = subprocess.run) -> Optional[str]:
    """Run ``nvcc --dryrun -x cu -c /dev/null -o /dev/null`` and return the resolved TOP= path."""
    try:
        proc = run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    top = parse_nvcc_dryrun_top(proc.stdout or "")
    return os.path.realpath(top) if top else None


@dataclass(frozen=True)
class CudaHome:
    path: Optional[str]
    how: str  # how it was found, or why not

    @property
    def nvcc(self) -> Optional[str]:
        if not self.path:
            return None
        nvcc = os.path.join(self.path, "bin", "nvcc")
        return nvcc if os.path.isfile(nvcc) else None


def find_cuda_home(
    env: Mapping[str, str] = os.environ,
    which: Callable[[str], Optional[str]] = shutil.which,
    dryrun_top: Callable[[str], Optional[str]] = nvcc_dryrun_top,
    default_roots: Sequence[str] = ("/usr/local/cuda",),
) -> CudaHome:
    """The real CUDA toolkit root.

    Order: CUDA_HOME, CUDA_PATH (taken as given); else the resolved ``TOP=`` of ``nvcc --dryrun``
    for the nvcc on PATH (which may be a wrapper script); else the parent of the resolved nvcc
    binary; else the first of default_roots (/usr/local/cuda) that has bin/nvcc.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return CudaHome(env[var], f"${var}")
    nvcc = which("nvcc")
    if nvcc:
        top = dryrun_top(nvcc)
        if top and os.path.isfile(os.path.join(top, "bin", "nvcc")):
            return CudaHome(top, f"TOP= of `{nvcc} --dryrun`")
        parent = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(parent, "bin", "nvcc")):
            return CudaHome(parent, f"parent of {os.path.realpath(nvcc)}")
    for root in default_roots:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return CudaHome(root, root)
    return CudaHome(None, "nvcc not found (set CUDA_HOME to the CUDA toolkit root)")


# ------------------------------------------------------------------------------------ arch list

_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(\+PTX)?$", re.IGNORECASE)


def parse_arch_list(text: Optional[str]) -> list[str]:
    """Normalise an arch list to TORCH_CUDA_ARCH_LIST entries ("8.0", "9.0a", "9.0+PTX").

    Accepts entries separated by ';', ',' or whitespace, written as "8.0", "9.0a", "80", "90a",
    "sm_90a" or with "+PTX". Duplicates are dropped, order is kept. None or "" gives the default
    (DEFAULT_CUDA_ARCHS).
    """
    if text is None or not text.strip():
        text = DEFAULT_CUDA_ARCHS
    archs: list[str] = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        m = _ARCH_RE.match(item)
        if not m:
            raise ValueError(
                f"invalid CUDA arch {item!r} in {text!r}: expected entries like 8.0, 9.0a, 90a or sm_90a"
            )
        major, minor, suffix, ptx = m.groups()
        if minor is None:
            if len(major) < 2:
                raise ValueError(f"invalid CUDA arch {item!r} in {text!r}: write 8.0 or 80, not {item}")
            major, minor = major[:-1], major[-1]
        if ptx and suffix:
            raise ValueError(
                f"invalid CUDA arch {item!r} in {text!r}: the PTX of an arch-specific target "
                f"({major}.{minor}{suffix.lower()}) only runs on that arch, so it cannot serve newer "
                f"GPUs; add a generic PTX target instead, e.g. {major}.{minor}+PTX or 8.0+PTX"
            )
        arch = f"{int(major)}.{minor}{suffix.lower()}{'+PTX' if ptx else ''}"
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"empty CUDA arch list {text!r}")
    return archs


def arch_to_sm(arch: str) -> str:
    """"9.0a" -> "sm_90a", "8.0+PTX" -> "sm_80"."""
    base = arch.split("+")[0]
    major, minor = base.split(".")
    return f"sm_{major}{minor}"


# ------------------------------------------------------------------------------------- MAX_JOBS


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory_bytes(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable (else MemTotal) from /proc/meminfo, in bytes; None when unknown."""
    try:
        with open(meminfo, encoding="ascii") as f:
            text = f.read()
    except OSError:
        text = ""
    for key in ("MemAvailable", "MemTotal"):
        m = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def compute_max_jobs(cores: int, mem_bytes: Optional[int], mem_per_job_gib: int = MEM_PER_JOB_GIB) -> int:
    """Parallel compile jobs: min(cores, memory GiB // mem_per_job_gib), at least 1.

    Each nvcc or g++ job over the torch headers takes a few GiB; unknown memory means cores.
    """
    jobs = max(1, int(cores))
    if mem_bytes is not None:
        jobs = min(jobs, int(mem_bytes // GIB) // mem_per_job_gib)
    return max(1, jobs)


def max_jobs(env: Mapping[str, str] = os.environ) -> str:
    """MAX_JOBS from the environment when set, else compute_max_jobs for this machine."""
    if env.get("MAX_JOBS"):
        return env["MAX_JOBS"]
    return str(compute_max_jobs(available_cores(), available_memory_bytes()))


# ---------------------------------------------------------------------------- cuBLAS and nvrtc


def versioned_library(lib_dir: str, name: str, major: Optional[int] = None) -> Optional[str]:
    """Path of the shared library lib<name> in lib_dir that the dynamic loader would use.

    Prefers lib<name>.so.<major> (the soname) when major is given, else the soname-like file
    with the fewest version components (libcublasLt.so.13 over libcublasLt.so.13.1.0.3), else
    the unversioned lib<name>.so.
    """
    base = os.path.join(lib_dir, f"lib{name}.so")
    if major is not None and os.path.exists(f"{base}.{major}"):
        return f"{base}.{major}"
    versioned = []
    for path in glob.glob(glob.escape(base) + ".*"):
        suffix = path[len(base) + 1 :]
        if re.fullmatch(r"\d+(\.\d+)*", suffix):
            versioned.append((suffix.count("."), [int(p) for p in suffix.split(".")], path))
    if major is not None:
        same_major = [v for v in versioned if v[1][0] == major]
        versioned = same_major or versioned
    if versioned:
        # fewest components first; among equals, the newest version
        versioned.sort(key=lambda v: (v[0], [-x for x in v[1]]))
        return versioned[0][2]
    return base if os.path.exists(base) else None


@dataclass(frozen=True)
class CudaLibrary:
    """Headers and shared libraries of one NVIDIA component (cuBLAS, nvrtc)."""

    include_dir: Optional[str]
    lib_dir: str
    libraries: tuple[str, ...]  # full paths of the versioned .so files to link
    source: str  # "wheel nvidia/cu13", "toolkit", ...


def _wheel_dirs(site_dirs: Iterable[str], cuda_major: Optional[int]) -> list[str]:
    """site-packages/nvidia/<pkg> folders, the one matching torch's CUDA major first."""
    found: list[str] = []
    for site in site_dirs:
        nvidia = os.path.join(site, "nvidia")
        if not os.path.isdir(nvidia):
            continue
        for pkg in sorted(os.listdir(nvidia)):
            path = os.path.join(nvidia, pkg)
            if os.path.isdir(path) and path not in found:
                found.append(path)

    def rank(path: str) -> tuple[int, str]:
        name = os.path.basename(path)
        if cuda_major is not None and name == f"cu{cuda_major}":
            return (0, name)
        if name in ("cublas", "cuda_nvrtc"):
            return (1, name)
        return (2, name)

    return sorted(found, key=rank)


def find_cublas(
    site_dirs: Sequence[str], cuda_home: Optional[str], cuda_major: Optional[int] = None
) -> Optional[CudaLibrary]:
    """cuBLAS / cuBLASLt: the folder holding cublasLt.h and libcublasLt + libcublas beside it.

    Searches site_dirs/nvidia/*/include (the NVIDIA wheels torch was installed with; torch
    loads these very libraries, so linking them avoids a second copy), then the toolkit.
    """
    candidates = [(os.path.join(d, "include"), os.path.join(d, "lib"), "wheel nvidia/" + os.path.basename(d))
                  for d in _wheel_dirs(site_dirs, cuda_major)]
    if cuda_home:
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            candidates.append((os.path.join(cuda_home, "include"), os.path.join(cuda_home, lib), "toolkit"))
    for include_dir, lib_dir, source in candidates:
        if not os.path.isfile(os.path.join(include_dir, "cublasLt.h")):
            continue
        lt = versioned_library(lib_dir, "cublasLt", cuda_major)
        blas = versioned_library(lib_dir, "cublas", cuda_major)
        if lt and blas:
            return CudaLibrary(include_dir, lib_dir, (lt, blas), source)
    return None


def find_nvrtc(
    site_dirs: Sequence[str], cuda_home: Optional[str], cuda_major: Optional[int] = None
) -> Optional[CudaLibrary]:
    """libnvrtc (torch's CMake config links it): the wheels' nvidia/*/lib first, then the toolkit."""
    lib_dirs = [
        (os.path.join(d, "lib"), "wheel nvidia/" + os.path.basename(d)) for d in _wheel_dirs(site_dirs, cuda_major)
    ]
    if cuda_home:
        lib_dirs += [(os.path.join(cuda_home, lib), "toolkit") for lib in ("lib64", "lib")]
    for lib_dir, source in lib_dirs:
        lib = versioned_library(lib_dir, "nvrtc", cuda_major)
        if lib:
            return CudaLibrary(None, lib_dir, (lib,), source)
    return None


def cuda_major_of(version: Optional[str]) -> Optional[int]:
    """"13.0" -> 13; None -> None."""
    if not version:
        return None
    m = re.match(r"^(\d+)", version)
    return int(m.group(1)) if m else None


def cuda_mismatch(toolkit_version: Optional[str], torch_cuda: Optional[str]) -> Optional[str]:
    """Why a toolkit cannot build against a torch CUDA build, or None when it can.

    torch's cpp_extension refuses a toolkit whose CUDA major differs from ``torch.version.cuda``
    (it raises in the middle of the build; a minor difference is only a warning), so the check
    runs before the build starts. An unreadable toolkit version is left to torch to judge.
    """
    toolkit_major, torch_major = cuda_major_of(toolkit_version), cuda_major_of(torch_cuda)
    if toolkit_major is None or torch_major is None or toolkit_major == torch_major:
        return None
    return (
        f"the CUDA toolkit is {toolkit_version} but torch was built with CUDA {torch_cuda}: "
        f"the extension needs a CUDA {torch_major}.x toolkit (set CUDA_HOME to one)"
    )


def guard_build(
    build_ext_class: type, force: bool, log: Callable[[str], None], outputs: Callable[[], Sequence[str]] = lambda: ()
):
    """``build_ext_class`` whose failures become a skip with a one-line reason, unless ``force``.

    The extension is optional (the Triton backend runs without it), so a compile error, a
    toolkit torch refuses, or a linker failure must not abort ``pip install``. On a skipped build
    the module files of a previous build (``outputs()``) are removed, so that a stale
    ``vitkern._C`` built from other sources is never loaded. With ``force`` the error propagates.
    """

    class GuardedBuildExt(build_ext_class):
        def run(self):
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # noqa: BLE001  (any build failure)
                if force:
                    raise
                reason = " ".join(str(exc).split()) or type(exc).__name__
                removed = []
                for path in outputs():
                    if path and os.path.exists(path):
                        os.remove(path)
                        removed.append(path)
                for ext in getattr(self, "extensions", None) or ():
                    try:
                        path = self.get_ext_fullpath(ext.name)
                    except Exception:  # noqa: BLE001
                        continue
                    if path and os.path.exists(path):
                        os.remove(path)
                        removed.append(path)
                note = f" (removed the previous build: {', '.join(removed)})" if removed else ""
                log(
                    f"not building the CUDA extension vitkern._C: the build failed: {type(exc).__name__}: "
                    f"{reason[:400]}{note}; vitkern installs without it (set VITKERN_FORCE_CUDA_BUILD=1 to "
                    "make this an error)"
                )

    GuardedBuildExt.__name__ = f"Guarded{build_ext_class.__name__}"
    return GuardedBuildExt


def cuda_toolkit_version(cuda_home: str) -> Optional[str]:
    """"13.0" from the toolkit's cuda_runtime_api.h (CUDART_VERSION), None when unreadable."""
    for inc in (os.path.join(cuda_home, "include"), os.path.join(cuda_home, "targets", "x86_64-linux", "include")):
        try:
            with open(os.path.join(inc, "cuda_runtime_api.h"), encoding="utf-8", errors="replace") as f:
                m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read())
        except OSError:
            continue
        if m:
            v = int(m.group(1))
            return f"{v // 1000}.{(v % 1000) // 10}"
    return None


# ------------------------------------------------------------------------------------------- CLI


def _cmake_env(python_site_dirs: Sequence[str]) -> dict[str, str]:
    """Everything scripts/cmake_check.sh passes to CMake (imports torch and pybind11)."""
    import torch  # noqa: PLC0415  (only the CLI needs torch)

    home = find_cuda_home()
    if not home.path or not home.nvcc:
        raise SystemExit(f"error: CUDA toolkit not found: {home.how}")
    major = cuda_major_of(torch.version.cuda)
    site_dirs = [os.path.dirname(os.path.dirname(torch.__file__)), *python_site_dirs]
    cublas = find_cublas(site_dirs, home.path, major)
    if cublas is None:
        raise SystemExit("error: cuBLASLt (cublasLt.h + libcublasLt.so) not found in the NVIDIA wheels or the toolkit")
    nvrtc = find_nvrtc(site_dirs, home.path, major)
    if nvrtc is None:
        raise SystemExit("error: libnvrtc not found in the NVIDIA wheels or the toolkit")
    import pybind11  # noqa: PLC0415

    return {
        "VK_CUDA_HOME": home.path,
        "VK_TORCH_CMAKE_PREFIX": torch.utils.cmake_prefix_path,
        "VK_TORCH_LIB_DIR": os.path.join(os.path.dirname(torch.__file__), "lib"),
        "VK_PYBIND11_CMAKE_DIR": pybind11.get_cmake_dir(),
        "VK_CUBLAS_INCLUDE_DIR": cublas.include_dir or "",
        "VK_CUBLAS_LIB_DIR": cublas.lib_dir,
        "VK_CUBLASLT_LIBRARY": cublas.libraries[0],
        "VK_CUBLAS_LIBRARY": cublas.libraries[1],
        "VK_NVRTC_LIBRARY": nvrtc.libraries[0],
        "VK_MAX_JOBS": max_jobs(),
    }


def main(argv: Sequence[str]) -> int:
    usage = (
        "usage: cuda_build.py cuda-home | archs [LIST] | max-jobs | cmake-env\n"
        "  cmake-env prints shell assignments (VK_*=...) for scripts/cmake_check.sh"
    )
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    cmd, rest = argv[0], list(argv[1:])
    if cmd == "cuda-home":
        home = find_cuda_home()
        if not home.path:
            print(f"error: {home.how}", file=sys.stderr)
            return 1
        print(home.path)
    elif cmd == "archs":
        text = rest[0] if rest else os.environ.get("VITKERN_CUDA_ARCHS")
        print(";".join(parse_arch_list(text)))
    elif cmd == "max-jobs":
        print(max_jobs())
    elif cmd == "cmake-env":
        import site  # noqa: PLC0415

        for key, value in _cmake_env(site.getsitepackages()).items():
            print(f"{key}={shlex.quote(value)}")
    else:
        print(usage, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
