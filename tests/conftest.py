"""Test harness: the device fixture, the Triton interpreter switch and the gpu/slow markers.

Without a CUDA device, Triton kernels run on CPU tensors through the interpreter. The switch must be
set before triton is first imported, which is why it happens here, at conftest import time.
"""

import os

# The interpreter runs tl.dot through numpy; a multithreaded BLAS fighting pytest-xdist workers for
# two cores makes small matmuls ~1000x slower. Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vitkern  # noqa: E402  (imported after the interpreter switch on purpose)

DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("VITKERN_RUN_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (or VITKERN_RUN_SLOW=1)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
    # longest first: the compile check's one default-set run (minutes on one core) would otherwise
    # start near the end of the order and run on alone after the other worker has finished
    items.sort(key=lambda item: "runs_first" not in item.keywords)


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: CUDA when present, else the CPU (Triton through the interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    """Each test starts from a fixed seed and leaves the global backend choice as it found it."""
    torch.manual_seed(0)
    previous = vitkern.get_backend()
    yield
    vitkern.use_backend(previous)
