"""What the benchmark-suite tests share: the repository root on ``sys.path`` (``benchmarks`` is not
an installed package, and a plain ``pytest`` from anywhere must still import it), and
``python -m benchmarks`` run in a subprocess as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m benchmarks ARGS`` from the repository root, without the test harness's Triton
    interpreter switch or a backend override (what a user's CPU run sees)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VITKERN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
