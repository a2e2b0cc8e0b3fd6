"""The static GPU compile check (vitkern.testing.compile_check): kernels compile for sm_80 and sm_90
without a GPU, with no spills, shared memory under the limit, and wgmma where the dots need it,
from the specialisation Triton's JIT derives for the launcher's own arguments.

The self-test kernels in ``_compile_fixture_kernels`` prove the harness end to end, including a
config that spills and must be flagged. The check of ``vitkern.ops`` itself compiles every
kernel variant once per arch plus the configs marked ``bench``; the full set runs under ``slow``.
Compiles run in a subprocess without TRITON_INTERPRET, in parallel, with Triton's cache kept in
``.triton-cache/`` (or TRITON_CACHE_DIR) between runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton

from vitkern.ops import _config
from vitkern.testing.compile_check import SHARED_LIMITS, CheckReport, evaluate, parse_ptxas_log, run_compile_check

from _compile_rows import PACKAGE_CHECKS

TESTS_DIR = Path(__file__).resolve().parent
FIXTURE = "_compile_fixture_kernels"
TIMEOUT = 1800


def _rows(rows, kernel, arch=None):
    return [r for r in rows if r["kernel"] == kernel and (arch is None or r["arch"] == arch)]


def test_fixture_kernels_compile_check():
    """One check run over the self-test kernels: what passes, what is flagged, and the
    specialisation the rows carry (derived from the captured arguments by Triton's binder)."""
    report = run_compile_check([FIXTURE], sys_path=[str(TESTS_DIR)], timeout=TIMEOUT)
    print(report.format())
    print(f"compile check: {len(report.rows)} rows in {report.wall_s:.1f} s with {report.workers} workers")
    rows = report.rows
    assert {r["arch"] for r in rows} == {80, 90}

    # (a) the autotuned row-wise kernel: first config + the bench config, per captured variant
    for arch in (80, 90):
        rw = _rows(rows, "_rowwise_center_kernel", arch)
        assert {r["config"] for r in rw} == {"BLOCK_M=1 w4 s1", "BLOCK_M=4 w4 s1"}
        assert len(rw) == 6  # 3 captured variants x 2 configs
        for r in rw:
            assert r["problems"] == [], r
            assert r["n_regs"] and r["spill_stores"] == 0 and r["spill_loads"] == 0
            assert not r["wgmma"] and not r["expects_wgmma"]
        sigs = {r["signature"] for r in rw}
        # aligned bf16 allocations: pointers and the row stride 768 are specialised (/16);
        # M = 1576 and N = 768... N is divisible too, M is not
        assert "X:*bf16/16 Y:*bf16/16 M:i32 N:i32/16 stride_xm:i32/16 stride_ym:i32/16" in sigs
        # the misaligned fp32 view: X not /16, its stride 770 not /16; the output is aligned
        assert "X:*fp32 Y:*fp32/16 M:i32 N:i32/16 stride_xm:i32 stride_ym:i32/16" in sigs
        assert any("W=None" in r["constexprs"] and "HAS_W=False" in r["constexprs"] for r in rw)
        assert any("HAS_W=True" in r["constexprs"] and "W:*bf16/16" in r["signature"] for r in rw)

    # (b) the bf16 GEMM tile through dot_operand: bf16 wgmma on sm_90, bf16 mma.sync on sm_80
    (g90,) = _rows(rows, "_gemm_tile_kernel", 90)
    (g80,) = _rows(rows, "_gemm_tile_kernel", 80)
    for r in (g80, g90):
        assert r["problems"] == [], r
        assert r["expects_wgmma"] is True
        assert r["spill_stores"] == 0 and r["shared"] > 0
        # unit strides arrive as ints equal to 1, which Triton turns into constexprs
        assert "stride_ak=1" in r["constexprs"] and "stride_bk=1" in r["constexprs"]
        assert "BLOCK_M=128" in r["constexprs"] and r["num_warps"] == 4
    assert g90["wgmma"] and g90["mma_instr"].startswith("wgmma.mma_async") and "bf16.bf16" in g90["mma_instr"]
    assert g80["mma"] and not g80["wgmma"] and "bf16.bf16" in g80["mma_instr"]
    assert g90["config"] == "w4 s4" and g80["config"] == "w4 s3"  # the launcher's per-arch choice

    # (c) the spilling config is flagged on both arches: the check cannot silently pass
    for arch in (80, 90):
        (sp,) = _rows(rows, "_spill_rows_kernel", arch)
        assert sp["spill_stores"] > 0
        assert any(p.startswith("spills:") for p in sp["problems"]), sp
    assert {r["kernel"] for r in report.failures()} == {"_spill_rows_kernel"}

    # the JIT itself, asked through a stand-in driver, derives the same specialisation
    # (a difference would be a problem row; older Triton may not allow the cross-check)
    checks = {r["jit_check"] for r in rows}
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8):
        assert checks == {"same"}, checks
    else:
        assert all(c == "same" or c.startswith("unavailable") for c in checks), checks


def test_fixture_full_plan_covers_every_config():
    """The full check expands every config that applies to each arch, and the slow cases."""
    report = run_compile_check([FIXTURE], sys_path=[str(TESTS_DIR)], full=True, plan_only=True, timeout=TIMEOUT)
    rows = report.rows
    cfg80 = {r["config"] for r in _rows(rows, "_rowwise_center_kernel", 80)}
    cfg90 = {r["config"] for r in _rows(rows, "_rowwise_center_kernel", 90)}
    assert cfg80 == {"BLOCK_M=1 w4 s1", "BLOCK_M=4 w4 s1"}
    assert cfg90 == {"BLOCK_M=1 w4 s1", "BLOCK_M=4 w4 s1", "BLOCK_M=2 w2 s1"}  # archs=(90,) config
    slow = [r for r in rows if any(c.endswith(":_fixture_slow_cases") for c in r["cases"])]
    assert {r["signature"].split()[0] for r in slow} == {"X:*fp16/16"}
    # 3 default variants + 2 slow ones (fp16, N = 50 and 257), every config
    assert len(_rows(rows, "_rowwise_center_kernel", 90)) == 5 * 3
    assert all(r["problems"] == [] for r in rows)


@pytest.mark.runs_first
def test_ops_kernels_compile_check():
    """Every kernel variant in vitkern.ops, once per arch (plus the configs marked bench), and
    each op's own checks over its package's rows (tests/_compile_rows.py): one run compiles
    each job once, where each op's test compiling its own set repeated the shared GEMM jobs."""
    report = run_compile_check(timeout=TIMEOUT)
    print(report.format())
    print(f"compile check: {len(report.rows)} rows in {report.wall_s:.1f} s with {report.workers} workers")
    failures = report.failures()
    assert not failures, "kernels failing the static compile check:\n" + "\n".join(
        f"{r['module']}:{r['kernel']} sm_{r['arch']} [{r.get('config', '')}] {r.get('constexprs', '')}: "
        + "; ".join(r["problems"]) for r in failures)
    for package, check in PACKAGE_CHECKS.items():
        check(report.of_package(package).rows)


@pytest.mark.slow
def test_ops_kernels_compile_check_full():
    """Every config of every kernel in vitkern.ops, and the slow cases."""
    report = run_compile_check(full=True, timeout=TIMEOUT)
    print(report.format())
    failures = report.failures()
    assert not failures, "kernels failing the full static compile check:\n" + "\n".join(
        f"{r['module']}:{r['kernel']} sm_{r['arch']} [{r.get('config', '')}] {r.get('constexprs', '')}: "
        + "; ".join(r["problems"]) for r in failures)


# --------------------------------------------------------------------------------------------
# The row checks, on synthetic rows and logs
# --------------------------------------------------------------------------------------------

_PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'spill' for 'sm_90a'
ptxas info    : Function properties for spill
    1480 bytes stack frame, 1776 bytes spill stores, 1788 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 1480 bytes cumulative stack size
ptxas info    : Compile time = 668.269 ms
"""


def test_parse_ptxas_log():
    assert parse_ptxas_log(_PTXAS_LOG, "spill") == {
        "n_regs": 255, "spill_stores": 1776, "spill_loads": 1788, "stack_frame": 1480}
    clean = _PTXAS_LOG.replace("1480 bytes stack frame, 1776 bytes spill stores, 1788 bytes spill loads",
                               "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert parse_ptxas_log(clean)["spill_stores"] == 0
    assert parse_ptxas_log("") is None


def _row(**kw):
    base = dict(kernel="k", arch=90, n_regs=128, spill_stores=0, spill_loads=0, shared=1024,
                wgmma=True, mma=False, mma_instr="wgmma.mma_async", expects_wgmma=True)
    base.update(kw)
    return base


def test_evaluate_flags_each_problem():
    assert evaluate(_row()) == []
    assert evaluate(_row(spill_stores=8))[0].startswith("spills:")
    assert evaluate(_row(spill_stores=0, spill_loads=4))[0].startswith("spills:")
    assert evaluate(_row(shared=SHARED_LIMITS[90])) == []
    assert "over the sm_90 limit" in evaluate(_row(shared=SHARED_LIMITS[90] + 1))[0]
    assert "over the sm_80 limit" in evaluate(_row(arch=80, wgmma=False, mma=True, shared=SHARED_LIMITS[80] + 1))[0]
    assert "no wgmma" in evaluate(_row(wgmma=False, mma=True, mma_instr="mma.sync"))[0]
    assert evaluate(_row(wgmma=False, expects_wgmma=False, mma_instr=None)) == []
    assert "no mma.sync" in evaluate(_row(arch=80, wgmma=False, mma=False))[0]
    assert evaluate(_row(error="PTXASError: boom"))[0].startswith("compile error")
    assert evaluate(_row(n_regs=None)) == ["no ptxas statistics"]


def test_of_package_keeps_the_rows_a_run_over_the_package_alone_gives():
    """A kernel of another package that the package's cases launch is its row; a plan problem
    counts by its module; a package name is not a prefix of another's (gemm vs gemm_extra)."""
    rows = [
        _row(kernel="gemm", module="vitkern.ops.gemm.kernels",
             cases=["vitkern.ops.gemm.compile_cases:_fc1", "vitkern.ops.patch_embed.compile_cases:_fwd"]),
        _row(kernel="gemm2", module="vitkern.ops.gemm.kernels", cases=["vitkern.ops.mlp.compile_cases:_mlp"]),
        _row(kernel="colsum", module="vitkern.ops.patch_embed.kernels",
             cases=["vitkern.ops.patch_embed.compile_cases:_bwd"]),
        dict(kernel="orphan", module="vitkern.ops.patch_embed.kernels", arch="-", problems=["no compile case"]),
        _row(kernel="other", module="vitkern.ops.gemm_extra.kernels", cases=["vitkern.ops.gemm_extra.cases:_c"]),
    ]
    report = CheckReport(rows=rows, wall_s=1.0, workers=1, command=[])
    kernels = lambda package: [r["kernel"] for r in report.of_package(package).rows]  # noqa: E731
    assert kernels("vitkern.ops.patch_embed") == ["gemm", "colsum", "orphan"]
    assert kernels("vitkern.ops.gemm") == ["gemm"]
    assert kernels("vitkern.ops.mlp") == ["gemm2"]
    assert kernels("vitkern.ops") == [r["kernel"] for r in rows]
    assert report.of_package("vitkern.ops.gemm").wall_s == 1.0 and report.rows == rows


# --------------------------------------------------------------------------------------------
# On a GPU: the static compile is the JIT's compile
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_static_compile_matches_the_jit(device):
    """Run the fixture launches for real, then plan the same calls statically: every planned
    compile (every config of the autotuned kernel) has the cache hash of a kernel the JIT built."""
    if _config.INTERPRETING or device.type != "cuda":
        pytest.skip("needs compiled kernels on a CUDA device, not the interpreter")
    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor
    if arch not in (80, 90):
        pytest.skip(f"the check targets sm_80 and sm_90, this device is sm_{arch}")
    import _compile_fixture_kernels as fx
    from vitkern.testing.compile_check.plan import plan

    with torch.cuda.device(device):
        fx.fixture_calls(lambda shape, dtype: torch.randn(shape, dtype=dtype, device=device))
        torch.cuda.synchronize()
        index = torch.cuda.current_device()
    jit_hashes = {
        compiled.hash
        for kernel in (fx._rowwise_center_kernel, fx._gemm_tile_kernel)
        for compiled in kernel.device_caches[index][0].values()
    }
    jobs, problems = plan([FIXTURE], (arch,), full=True)
    jobs = [j for j in jobs if j.entry.qualname != "_spill_rows_kernel"
            and not any(c.endswith(":_fixture_slow_cases") for c in j.cases)]
    assert jobs and not problems
    for job in jobs:
        assert job.compile().hash in jit_hashes, job.describe()
