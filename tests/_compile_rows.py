"""The op-specific checks of static compile rows, shared by the one default-set run over all of
``vitkern.ops`` (tests/test_static_compile.py, which hands each its package's rows through
``CheckReport.of_package``, so CI compiles each job once) and the ops' own full-set runs (slow)."""

import re

from vitkern.ops.layer_norm import configs as ln_configs


def check_gemm_rows(rows) -> None:
    """No problem row; the GEMM core compiled for both arches without spills, its 16-bit
    operands on wgmma (sm_90) and mma.sync (sm_80)."""
    assert rows, "no compile rows"
    problems = [(r["kernel"], r["arch"], r.get("config"), r.get("constexprs"), r["problems"]) for r in rows
                if r["problems"]]
    assert not problems, problems
    gemm_rows = [r for r in rows if r["kernel"] == "_gemm_kernel"]
    assert {r["arch"] for r in gemm_rows} == {80, 90}
    for r in gemm_rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        sixteen = "b_ptr:*bf16" in r["signature"] or "b_ptr:*fp16" in r["signature"]
        if sixteen:
            assert r["wgmma"] if r["arch"] == 90 else r["mma"], r


def check_layer_norm_backward_rows(rows) -> None:
    """Each backward entry's programs per SM fit the blocks per SM the compile reports for every
    variant built (no program in a second wave)."""
    assert not [r for r in rows if r["problems"]]
    rows = [r for r in rows if r["kernel"] == "_layer_norm_bwd_kernel"]
    assert rows, "no layer-norm backward rows"
    for r in rows:
        # a two-piece row (BLOCK_N + BLOCK_N2) runs its one-piece entry: the next power of two
        pieces = [int(v) for v in re.findall(r"BLOCK_N2?=(\d+)", r["config"])]
        block_n = ln_configs._block_n(sum(pieces))
        table = ln_configs._BWD_CONFIGS_SM90 if r["arch"] == 90 and block_n in ln_configs._BWD_CONFIGS_SM90 \
            else ln_configs._BWD_CONFIGS
        per_sm = table[block_n][1]
        assert r["blocks_per_sm"] >= per_sm, (r["arch"], r["config"], r["n_regs"], r["shared"], per_sm)
        assert r["spill_stores"] == 0


# package -> the check its rows of the default set pass
PACKAGE_CHECKS = {
    "vitkern.ops.gemm": check_gemm_rows,
    "vitkern.ops.patch_embed": check_gemm_rows,
    "vitkern.ops.layer_norm": check_layer_norm_backward_rows,
}
