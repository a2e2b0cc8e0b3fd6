#!/usr/bin/env bash
# On a GPU machine: install vitkern, build the CUDA extension, run the GPU tests, the test suite,
# the static compile report and the benchmark suite; write every log and result to one folder.
#
# usage: scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check-out)
# env:   PYTHON               interpreter to use (default: python, else python3, on PATH)
#        GPU_CHECK_BUDGET_S   total wall-clock budget in seconds (default 570: under 10 minutes)
#        VITKERN_CUDA_ARCHS   extension archs (default here: this GPU's arch only, e.g. 9.0a)
#        BENCH_ARGS           extra arguments for `python -m benchmarks` (the main benchmark step)
#        GRAPHS_RESERVE_S     seconds kept for the CUDA-graph benchmark step (default 80; 0 skips it)
#        VITKERN_FORCE_CUDA_BUILD  1 (the default here): the import step fails when the extension
#                             did not build or load (the install itself never forces, so that a
#                             failed extension build still leaves the Triton path to test); 0: a
#                             warning only
#
# Made for a machine with torch, triton, pybind11, ninja and timm preinstalled and no package
# registry: the install is `pip install -e . --no-build-isolation --no-deps`. Every step runs under
# `timeout`, within what is left of the budget (later steps keep a reserve, the benchmarks the
# largest); a failing step does not stop the ones after it. At the end the script prints each
# step's exit code and time, writes them to OUT_DIR/steps.tsv, and exits 1 if any step failed.
#
# OUT_DIR afterwards: install.log, env.log, import.log, smoke.log (+ smoke.json), pytest_gpu.log, pytest.log,
# compile_check.log (+ compile_check.json), bench.log, bench/ (results.json, summary.md and the
# plots speedup_headline.png, speedup_vs_batch.png, speedup_vs_seqlen.png), bench_graphs.log,
# bench-graphs/ (the same for ViT-B/16 inference as CUDA graph replays), steps.tsv.
# To publish: copy bench/ to benchmarks/results/<date>-<gpu>/, commit it, and run
# `python -m benchmarks.readme benchmarks/results/<date>-<gpu>` to update the README's results.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-${OUT:-$root/gpu-check-out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  python="$(command -v python || command -v python3 || true)"
fi
if [[ -z "$python" ]]; then
  echo "gpu_check: no python on PATH (set PYTHON)" >&2
  exit 1
fi

budget="${GPU_CHECK_BUDGET_S:-570}"
force_extension="${VITKERN_FORCE_CUDA_BUILD:-1}"
unset VITKERN_FORCE_CUDA_BUILD   # the install skips a failed extension build; the import step judges
started=$(date +%s)
unset TRITON_INTERPRET           # real kernels on the GPU; the compile check refuses the interpreter
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

names=()
codes=()
secs=()
failed=0

elapsed() { echo $(( $(date +%s) - started )); }

# run_step NAME CAP RESERVE CMD...: run CMD with its output in OUT_DIR/NAME.log, for at most CAP
# seconds and never into the last RESERVE seconds of the budget (kept for the steps after it).
run_step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  local left=$(( budget - $(elapsed) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  local log="$out/$name.log"
  echo
  echo "=== [$(elapsed) s] $name (limit ${limit} s): $*"
  if (( limit < 5 )); then
    echo "no time left in the ${budget} s budget: step not run" | tee "$log"
    names+=("$name"); codes+=("not-run"); secs+=(0); failed=1
    return 0
  fi
  local t0=$(date +%s) rc
  timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then
    echo "TIMED OUT after ${limit} s" >>"$log"
  fi
  tail -n "${TAIL_LINES:-25}" "$log"
  echo "--- $name: exit $rc after ${dt} s (log: $log)"
  names+=("$name"); codes+=("$rc"); secs+=("$dt")
  (( rc != 0 )) && failed=1
  return 0
}

# The extension for this GPU's arch only (a two-arch build takes twice as long), unless set.
if [[ -z "${VITKERN_CUDA_ARCHS:-}" ]]; then
  cap="$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
  case "$cap" in
    9.0) export VITKERN_CUDA_ARCHS="9.0a" ;;
    [0-9]*.[0-9]*) export VITKERN_CUDA_ARCHS="$cap" ;;
  esac
fi
echo "gpu_check: python=$python out=$out budget=${budget}s VITKERN_CUDA_ARCHS=${VITKERN_CUDA_ARCHS:-default}"

# 1. Install (builds the extension). Reserve: GPU tests, compile report and the benchmarks.
run_step install 300 270 "$python" -m pip install -v -e . --no-build-isolation --no-deps

# 2. Machine and versions.
TAIL_LINES=60 run_step env 30 0 bash -c '
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$1" - <<"PY"
import importlib, importlib.metadata, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("torch sees no CUDA device")
for name in ("triton", "timm", "torchvision", "transformers", "pybind11", "ninja", "numpy", "pytest", "pytest-benchmark", "rich", "safetensors"):
    try:
        importlib.import_module(name.replace("-", "_"))
        print(name, importlib.metadata.version(name))
    except Exception as exc:
        print(name, "not available:", type(exc).__name__)
PY' env "$python"

# 3. Import; the extension must load: a failure when forced (the default here), else a warning.
run_step import 60 0 bash -c '
  "$1" - <<"PY"
import vitkern
print("vitkern", vitkern.__version__, "from", vitkern.__file__)
ok = vitkern.cuda_extension_available()
print("cuda_extension_available:", ok)
if not ok:
    try:
        from vitkern._extension import extension_error
        print("WARNING: the CUDA extension did not load:", extension_error())
    except Exception as exc:
        print("WARNING: the CUDA extension did not load (no reason available: %s)" % exc)
PY
  rc=$?
  if (( rc == 0 )) && ! "$1" -c "import vitkern, sys; sys.exit(0 if vitkern.cuda_extension_available() else 1)"; then
    echo "--- extension build messages from install.log:"
    grep -n -i -E "error|vitkern setup|skipp|nvcc|extension" "$2/install.log" | tail -n 40 || true
    if [[ "$3" == "1" ]]; then
      echo "FAILED: the CUDA extension is unavailable and VITKERN_FORCE_CUDA_BUILD=1 (set it to 0 to only warn)"
      rc=1
    fi
  fi
  exit $rc' import "$python" "$out" "$force_extension"

# 3b. Smoke stage: every public op forward and backward on the GPU at one ViT-B/16 shape, bf16 and
#     fp32, each backend; a worker-thread backward; a second device when there is one. A failure
#     here is reported at the end; the long steps still run.
TAIL_LINES=70 run_step smoke 130 300 "$python" scripts/gpu_smoke.py --json "$out/smoke.json"

if ! "$python" -c "import pytest" 2>/dev/null; then
  echo "gpu_check: pytest is not installed: the test steps will fail"
fi

# 4. The GPU tests (exit 5 = none collected, reported as such), then the default test set.
run_step pytest_gpu 150 240 bash -c '"$1" -m pytest tests -q -m gpu --durations=30 -p no:cacheprovider; rc=$?
  if (( rc == 5 )); then echo "no tests are marked gpu"; exit 0; fi; exit $rc' pytest_gpu "$python"
run_step pytest 240 210 "$python" -m pytest tests -q --durations=30 -p no:cacheprovider

# 5. The static compile report (registers, spills, shared memory, MMA per kernel config).
run_step compile_check 150 180 "$python" -m vitkern.testing.compile_check --full --json "$out/compile_check.json"

# 6. The benchmark suite: everything left of the budget but the CUDA-graph step's reserve; it stops
#    starting new cases in time to write its results and plots (rows it could not reach are recorded
#    as skipped).
graphs_reserve="${GRAPHS_RESERVE_S:-80}"
left=$(( budget - $(elapsed) - 10 - graphs_reserve ))
bench_budget=$(( left > 150 ? left - 75 : left / 2 ))
TAIL_LINES=400 run_step bench "$left" "$graphs_reserve" "$python" -m benchmarks --out "$out/bench" --budget-s "$bench_budget" --quiet ${BENCH_ARGS:-}

# 7. Launch overhead: ViT-B/16 inference timed as CUDA graph replays (vitkern vs timm eager and
#    torchvision; a provider that cannot be captured is timed eagerly, with a note), batch 256 then
#    1, 8, 64 as the budget allows (batch 1 and 8 are the launch-bound ones).
if (( graphs_reserve > 0 )); then
  left=$(( budget - $(elapsed) - 5 ))
  graphs_budget=$(( left > 40 ? left - 30 : left / 2 ))
  TAIL_LINES=60 run_step bench_graphs "$left" 0 "$python" -m benchmarks --models ViT-B/16 --modes fwd \
    --providers vitkern,vitkern-triton,torch,torchvision --cuda-graphs --out "$out/bench-graphs" \
    --budget-s "$graphs_budget" --quiet
fi

echo
echo "=== gpu_check finished in $(elapsed) s (budget ${budget} s); results in $out"
printf "step\texit\tseconds\n" >"$out/steps.tsv"
for i in "${!names[@]}"; do
  printf "%-14s exit %-8s %5s s\n" "${names[$i]}" "${codes[$i]}" "${secs[$i]}"
  printf "%s\t%s\t%s\n" "${names[$i]}" "${codes[$i]}" "${secs[$i]}" >>"$out/steps.tsv"
done
if (( failed )); then
  echo "gpu_check: FAILED (a step above exited non-zero or did not run)"
  exit 1
fi
echo "gpu_check: all steps passed"
echo "To publish the results: cp -r $out/bench benchmarks/results/<date>-<gpu> (see bench/results.json for the"
echo "GPU and date), commit it, then: $python -m benchmarks.readme benchmarks/results/<date>-<gpu>"
exit 0
