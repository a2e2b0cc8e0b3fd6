#!/usr/bin/env bash
# Build vitkern._C with CMake for one arch and check the module in a fresh Python process.
#
# usage: scripts/cmake_check.sh [build_dir]        (default build_dir: build-cmake)
# env:   VITKERN_CUDA_ARCHS   arch list (default 9.0a: one arch keeps the build short)
#        PYTHON               interpreter whose torch to build against (default: python on PATH)
#        CUDA_HOME/CUDA_PATH  toolkit root (default: found from `nvcc --dryrun`)
#        MAX_JOBS             parallel compile jobs (default: min(cores, memory GiB // 4))
#
# The check imports vitkern._extension (which declares the vitkern_cuda:: schemas), then the built
# file by path under another module name, and never imports vitkern._C in the same process: two
# libraries registering CUDA kernels for the same vitkern_cuda:: ops in one process would clash.
# Exits non-zero on any failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${1:-build-cmake}"
case "$build_dir" in /*) ;; *) build_dir="$PWD/$build_dir" ;; esac

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  python="$(command -v python || command -v python3 || true)"
fi
[[ -n "$python" ]] || { echo "cmake_check: no python on PATH (set PYTHON)" >&2; exit 1; }
command -v cmake >/dev/null || { echo "cmake_check: cmake not found" >&2; exit 1; }

helpers="$root/tools/cuda_build.py"
archs="$("$python" "$helpers" archs "${VITKERN_CUDA_ARCHS:-9.0a}")"
# VK_CUDA_HOME, VK_CUBLAS_*, VK_NVRTC_LIBRARY, VK_PYBIND11_CMAKE_DIR, VK_MAX_JOBS, ...
env_lines="$("$python" "$helpers" cmake-env)"
eval "$env_lines"

generator=()
if command -v ninja >/dev/null; then
  generator=(-G Ninja)
elif [[ -x "$(dirname "$python")/ninja" ]]; then
  generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(dirname "$python")/ninja")
fi

echo "cmake_check: python=$python archs=$archs CUDA=$VK_CUDA_HOME build_dir=$build_dir jobs=$VK_MAX_JOBS"
started=$(date +%s)
export TORCH_CUDA_ARCH_LIST="$archs"
cmake -S "$root" -B "$build_dir" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$python" \
  -DCMAKE_CUDA_COMPILER="$VK_CUDA_HOME/bin/nvcc" \
  -DCUDA_TOOLKIT_ROOT_DIR="$VK_CUDA_HOME" \
  -DCUDAToolkit_ROOT="$VK_CUDA_HOME" \
  -DTORCH_CUDA_ARCH_LIST="$archs" \
  -DCUDA_nvrtc_LIBRARY="$VK_NVRTC_LIBRARY" \
  -Dpybind11_DIR="$VK_PYBIND11_CMAKE_DIR" \
  -DVITKERN_CUBLAS_INCLUDE_DIR="$VK_CUBLAS_INCLUDE_DIR" \
  -DVITKERN_CUBLASLT_LIBRARY="$VK_CUBLASLT_LIBRARY" \
  -DVITKERN_CUBLAS_LIBRARY="$VK_CUBLAS_LIBRARY"
cmake --build "$build_dir" --parallel "$VK_MAX_JOBS"
echo "cmake_check: built in $(( $(date +%s) - started )) s"

shopt -s nullglob
modules=("$build_dir"/_C.*.so "$build_dir"/_C.s[o])
shopt -u nullglob
if [[ ${#modules[@]} -ne 1 ]]; then
  echo "cmake_check: expected one _C module in $build_dir, found: ${modules[*]:-none}" >&2
  exit 1
fi

"$python" - "${modules[0]}" "$archs" <<'PY'
import importlib.util
import sys

import torch

import vitkern._extension  # noqa: F401  (declares the vitkern_cuda:: schemas; the module adds kernels)

path, archs = sys.argv[1], sys.argv[2].split(";")
# Python looks up PyInit_<last part of the name>, so the name must end in "_C"; "vitkern_cmake"
# keeps it apart from vitkern._C (its parent package need not exist).
spec = importlib.util.spec_from_file_location("vitkern_cmake._C", path)
if spec is None or spec.loader is None:
    sys.exit(f"cmake_check: cannot load {path}")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert "vitkern._C" not in sys.modules, "vitkern._C must not be loaded in this process"
assert hasattr(torch.ops.vitkern_cuda, "patchify"), "torch.ops.vitkern_cuda.patchify is not registered"
for name in vitkern._extension._SCHEMAS:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitkern_cuda::{name}", "CUDA"), f"no CUDA kernel for {name}"
schema = str(torch.ops.vitkern_cuda.patchify.default._schema)
info = module.build_info()
print("cmake_check: schema", schema)
print("cmake_check: build_info", dict(info))
assert info["build_system"] == "cmake", info
assert info["archs"] == archs, (info["archs"], archs)
assert info["cublaslt_linked"] and info["cublaslt_version"] > 0, info
expected = sorted({int(a.split("+")[0].rstrip("af").replace(".", "")) * 10 for a in archs})
assert sorted(info["cuda_arch_list"]) == expected, (info["cuda_arch_list"], expected)
print(f"cmake_check: OK ({path})")
PY
