"""pytest-benchmark tests over the benchmark setups (see benchmarks/conftest.py).

``pytest benchmarks/ --benchmark-only`` times every op's quick shape for each provider and mode;
``--benchmark-compare`` / ``--benchmark-autosave`` work as usual. The full report with FLOP/s,
% of ceiling and ratios is ``python -m benchmarks``.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.flops import ALL_MODES
from benchmarks.cases import ALL_PROVIDERS, EXTRA_PROVIDERS
from benchmarks.providers import is_backend_unavailable, load_vitkern, prepare, reference_result
from benchmarks.results import DTYPES
from benchmarks.setups import Unavailable

# The CPU path only checks that the suite runs (its times say nothing about kernels): keep it short.
# On a GPU pytest-benchmark's own defaults (and --benchmark-max-time etc.) apply.
pytestmark = [] if torch.cuda.is_available() else [pytest.mark.benchmark(max_time=0.1, min_rounds=3, warmup=False)]


@pytest.fixture(scope="module")
def bench_case(bench_setup, bench_device, bench_dtype):
    torch.manual_seed(0)
    shape = bench_setup.shapes(bench_device.type, quick=True)[0]
    return shape, bench_setup.build(shape, DTYPES[bench_dtype], bench_device)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("provider", ALL_PROVIDERS)
def test_bench(benchmark, bench_setup, bench_case, bench_device, provider, mode):
    shape, case = bench_case
    if mode not in bench_setup.shape_modes(shape):
        pytest.skip(f"{bench_setup.name} has no {mode} mode at this shape")
    if provider.startswith("vitkern") and load_vitkern()[0] is None:
        pytest.fail(f"import vitkern failed: {load_vitkern()[1]}")
    if provider in EXTRA_PROVIDERS and provider not in case.references:
        pytest.skip(f"{bench_setup.name} has no {provider} reference")
    _, grad_outputs = reference_result(case, mode)
    try:
        prepared = prepare(
            case, provider, mode, bench_device, grad_outputs,
            op=bench_setup.name, whole_model=bench_setup.kind == "model",
        )
    except Unavailable as exc:
        pytest.skip(str(exc))
    if prepared.note and prepared.note.startswith("Triton interpreter"):
        pytest.skip("Triton interpreter: no meaningful timing")
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else (lambda: None)

    def step():
        prepared.call()
        sync()

    with prepared.context():
        try:
            step()  # compile / autotune outside the timing
        except Unavailable as exc:  # e.g. an SDPA backend that refuses this shape
            pytest.skip(str(exc))
        except Exception as exc:
            if is_backend_unavailable(exc):
                pytest.skip(str(exc))
            raise
        benchmark.group = f"{bench_setup.name} {mode}"
        benchmark.extra_info.update(
            shape=shape, provider=provider, mode=mode,
            flops=case.cost.flops_for(mode), bytes=case.cost.bytes_for(mode),
        )
        benchmark(step)
