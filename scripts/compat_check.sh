#!/usr/bin/env bash
# The GPU machines' stack on this machine: a second environment with their Triton (3.6.0) and
# torch (2.11, CUDA 13.0) on Python 3.12 where it is installed, the CUDA extension built against
# that torch, then, under it, the full static compile check (every config of every kernel, sm_80
# and sm_90) and the interpreter tests of every op. Prints the versions it used and a closing
# "N passed, N failed" line (compile rows plus tests); exits non-zero when anything failed.
#
# usage: scripts/compat_check.sh            (what `make compat` runs)
# env:   PYTHON_COMPAT   interpreter for the environment (default: python3.12, else python3)
#        VENV_COMPAT     the environment's folder (default .venv-compat)
#        COMPAT_PYTEST_ARGS  extra pytest arguments (default "-n 2")
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$(date +%s)
python="${PYTHON_COMPAT:-}"
if [[ -z "$python" ]]; then
  for candidate in python3.12 python3; do   # the first that runs (a version manager's shim may not)
    if "$candidate" -c "import sys" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
venv="${VENV_COMPAT:-.venv-compat}"
py="$venv/bin/python"
out="$venv/compat-results"

if [[ ! -x "$py" ]]; then
  "$python" -m venv "$venv" || exit 1
fi
mkdir -p "$out"
set -e
"$py" -m pip install -q --upgrade pip setuptools wheel
"$py" -m pip install -q -c constraints-compat.txt torch triton torchvision numpy pybind11 ninja
# The extension for one arch (half the build time); forced, so that a source that does not compile
# against this torch fails here.
VITKERN_CUDA_ARCHS="${VITKERN_CUDA_ARCHS:-9.0a}" VITKERN_FORCE_CUDA_BUILD=1 \
  "$py" -m pip install -q -c constraints-compat.txt -e ".[test]" --no-build-isolation
set +e

"$py" - <<'PY'
import platform, torch, triton, vitkern
print(f"compat: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, vitkern {vitkern.__version__}, "
      f"extension {'loaded' if vitkern.cuda_extension_available() else 'NOT loaded'}")
PY
"$py" -c "import vitkern, sys; sys.exit(0 if vitkern.cuda_extension_available() else 1)"
ext_rc=$?

env -u TRITON_INTERPRET "$py" -m vitkern.testing.compile_check --full --quiet --json "$out/compile_check.json"
TRITON_INTERPRET=1 "$py" -m pytest tests/ops tests/test_launch.py -q -p no:cacheprovider ${COMPAT_PYTEST_ARGS:--n 2} \
  --junitxml "$out/pytest.xml"

"$py" - "$out" "$ext_rc" "$(( $(date +%s) - started ))" <<'PY'
import json, sys, xml.etree.ElementTree as ET
out, ext_rc, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = json.load(open(f"{out}/compile_check.json"))
bad_rows = sum(1 for r in rows if r["problems"])
suites = ET.parse(f"{out}/pytest.xml").getroot()
suite = suites if suites.tag == "testsuite" else suites[0]
tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
failed = bad_rows + failures + errors + (ext_rc != 0)
passed = (len(rows) - bad_rows) + (tests - failures - errors - skipped) + (ext_rc == 0)
print(f"compat: {len(rows)} compile rows ({bad_rows} with problems), {tests} tests ({failures + errors} failed, "
      f"{skipped} skipped), extension {'built and loaded' if ext_rc == 0 else 'NOT available'}, {seconds} s")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
