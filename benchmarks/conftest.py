"""pytest-benchmark entry for the benchmark setups: ``pytest benchmarks/ --benchmark-only``.

The same setups as ``python -m benchmarks`` (:mod:`benchmarks.setups`), at their quick shape: the
first GPU shape on a CUDA device, the first (tiny) CPU shape otherwise. Kernel timings need a GPU;
on the CPU this times vitkern's PyTorch reference path. Options:

- ``--bench-ops layer_norm,attention``: only these ops (default: all);
- ``--bench-dtype bf16|fp16|fp32``: default bf16 on a GPU, fp32 on the CPU.

On the CPU the tests use one torch thread (as ``python -m benchmarks`` does) unless
``VITKERN_BENCH_THREADS`` is set, and a short pytest-benchmark time per test.
"""

import os

import pytest
import torch

from benchmarks.results import DTYPES
from benchmarks.setups import discover


def pytest_addoption(parser):
    group = parser.getgroup("vitkern benchmarks")
    group.addoption("--bench-ops", default=None, help="comma-separated benchmark ops (default: all)")
    group.addoption(
        "--bench-dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU"
    )


BENCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "bench_setup" not in metafunc.fixturenames:
        return
    ops = metafunc.config.getoption("--bench-ops")
    names = [n.strip() for n in ops.split(",") if n.strip()] if ops else None
    setups = list(discover(names).values())
    metafunc.parametrize("bench_setup", setups, ids=[s.name for s in setups], scope="module")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return BENCH_DEVICE


@pytest.fixture(scope="session")
def bench_dtype(request) -> str:
    return request.config.getoption("--bench-dtype") or ("bf16" if BENCH_DEVICE.type == "cuda" else "fp32")


@pytest.fixture(scope="session", autouse=True)
def _bench_threads():
    """One CPU thread on the CPU, as the runner does: tiny shapes, steadier timings on a shared machine."""
    if BENCH_DEVICE.type == "cpu" and "VITKERN_BENCH_THREADS" not in os.environ:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(previous)
    else:
        yield
