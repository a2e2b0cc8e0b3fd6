"""``import vitkern`` on a machine without Triton (macOS, Windows, CPU-only): the package imports,
never imports Triton, and every op runs its reference path; an explicit "triton" backend says why
it cannot run. Checked in a fresh interpreter whose import system refuses ``triton``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent('''
    import importlib.abc
    import sys


    class RefuseTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None


    sys.meta_path.insert(0, RefuseTriton())

    import torch

    import vitkern
    import vitkern.models
    import vitkern.nn
    import vitkern.testing.compile_check  # the checker imports Triton only when it runs

    assert "triton" not in sys.modules, sorted(m for m in sys.modules if m.startswith("triton"))

    torch.manual_seed(0)
    x = torch.randn(2, 197, 64)
    w, b = torch.randn(64), torch.randn(64)
    vitkern.layer_norm(x, w, b)
    vitkern.add_layer_norm(x, x, w, b)
    q = torch.randn(2, 4, 197, 16)
    vitkern.attention(q, q, q)
    vitkern.scaled_dot_product_attention(q, q, q)
    vitkern.linear(x, torch.randn(32, 64), torch.randn(32), activation="gelu")
    vitkern.mlp(x, torch.randn(128, 64), None, torch.randn(64, 128), None)
    model = vitkern.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    logits = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (2, 10)

    with vitkern.use_backend("triton"):
        try:
            vitkern.layer_norm(x, w, b)
        except vitkern.BackendUnavailableError as e:
            assert "Triton is not installed" in str(e), e
        else:
            raise AssertionError("the triton backend ran without Triton")
    assert "triton" not in sys.modules, sorted(m for m in sys.modules if m.startswith("triton"))
    print("ok")
''')


def _run(env_overrides: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)


def test_import_and_reference_path_without_triton():
    proc = _run({})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_interpreter_switch_without_triton_still_runs_the_reference():
    # TRITON_INTERPRET=1 makes "auto" try Triton on CPU tensors first; without Triton it must fall
    # back to the reference instead of failing the import or the call.
    proc = _run({"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
