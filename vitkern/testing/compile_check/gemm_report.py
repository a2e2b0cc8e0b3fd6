"""The static report of the ViT GEMMs: every GEMM of the ViT-S/16, B/16, L/16 and H/14 forward and
backward (qkv, proj, fc1, fc2: forward, dX, dW) at one batch size, and of DINOv2's ViT-g/14 with
its SwiGLU MLP (fc1: the SwiGLU GEMM, fc2's dX: the dH GEMM with the SwiGLU-gradient epilogue), as
the launchers issue them (``vitkern.ops.linear.launch`` / ``vitkern.ops.mlp.launch`` /
``vitkern.ops.swiglu.launch``: bf16 operands, the fp32 residual
stream of timm under autocast, fp32 gradients of the residual-stream outputs), compiled for sm_90
(and sm_80 on request) with its launch plan: tile, warps, stages, registers, spills, shared
memory, blocks per SM, wgmma / TMA, persistent or not, K splits, and the predicted SM use (tiles,
waves) on 132 SMs (108 on sm_80) from :func:`vitkern.ops.gemm.configs.plan_gemm`, beside the SM
use of the rule before the split choice (``sm_use_before``: split only below one wave, the bias
gradient turning the persistent loop off).

Command line (the committed report, ``benchmarks/compile_report_gemm.json``)::

    env -u TRITON_INTERPRET python -m vitkern.testing.compile_check.gemm_report \\
        --json benchmarks/compile_report_gemm.json

prints the table and exits 1 when a GEMM spills, fails to compile, or a dW GEMM's predicted SM
use is below :data:`MIN_DW_SM_USE`. The patch embedding's GEMM (its own gather and configs) and
the classifier head are not in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

#: (embedding width, MLP width, tokens at 224 px) per model.
VIT_MODELS = {
    "ViT-S/16": (384, 1536, 197),
    "ViT-B/16": (768, 3072, 197),
    "ViT-L/16": (1024, 4096, 197),
    "ViT-H/14": (1280, 5120, 257),
}
#: (embedding width, gate width H (fc1 has 2H outputs), tokens) of the SwiGLU-MLP models.
SWIGLU_MODELS = {
    "ViT-g/14 SwiGLU": (1536, 4096, 257),
}
#: The SM counts the plans are sized for (H100 / H200 SXM: 132; A100: 108).
REPORT_SMS = {90: 132, 80: 108}
#: Every dW GEMM must keep at least this predicted SM use.
MIN_DW_SM_USE = 0.90


@dataclasses.dataclass
class VitGemm:
    """One GEMM of a ViT block: ``call`` launches it as the op's launcher does."""

    model: str
    layer: str
    pass_: str  # "fwd", "dX", "dW"
    M: int
    N: int
    K: int
    call: Callable[[], None]
    epilogue: str = "none"  # the config table's epilogue kind, or "swiglu" (the SwiGLU forward GEMM)


def vit_gemms(batch: int = 256, models: Optional[Sequence[str]] = None) -> list[VitGemm]:
    """The GEMMs of each model's block, forward and backward, mirroring linear_forward /
    linear_backward (qkv, proj) and mlp_forward / mlp_backward (fc1, fc2) without LayerScale or
    drop path, as ``vitkern.ViT`` runs them: its residual adds deferred into the next norm
    (``Block.forward_deferred``), so proj and fc2 write a bf16 branch and their backward GEMMs
    read the bf16 stream gradient that norm's backward writes."""
    import torch

    from vitkern.ops.activation import Activation
    from vitkern.ops.gemm import Epilogue
    from vitkern.ops.gemm.launch import gemm

    bf16 = torch.bfloat16
    e = torch.empty
    out: list[VitGemm] = []
    for model in models or (*VIT_MODELS, *SWIGLU_MODELS):
        swiglu = model in SWIGLU_MODELS
        D, H, T = SWIGLU_MODELS[model] if swiglu else VIT_MODELS[model]
        M = batch * T

        def add(layer, pass_, m, n, k, fn):
            kind = {"fwd": {"qkv": "bias", "proj": "bias", "fc1": "swiglu" if swiglu else "act",
                            "fc2": "bias"}[layer],
                    "dX": ("glu_grad" if swiglu else "act_grad") if layer == "fc2" else "none", "dW": "none"}[pass_]
            out.append(VitGemm(model, layer, pass_, m, n, k, fn, kind))

        # qkv: y = x @ Wqkv^T + b (bf16 out); dX = g @ W; dW = g^T @ x with db from the row sums
        add("qkv", "fwd", M, 3 * D, D,
            lambda M=M, D=D: gemm(e(M, D, dtype=bf16), e(3 * D, D, dtype=bf16), e(M, 3 * D, dtype=bf16),
                                  Epilogue(bias=e(3 * D, dtype=bf16))))
        add("qkv", "dX", M, D, 3 * D,
            lambda M=M, D=D: gemm(e(M, 3 * D, dtype=bf16), e(3 * D, D, dtype=bf16).t(), e(M, D, dtype=bf16)))
        add("qkv", "dW", 3 * D, D, M,
            lambda M=M, D=D: gemm(e(M, 3 * D, dtype=bf16).t(), e(M, D, dtype=bf16).t(), e(3 * D, D, dtype=bf16),
                                  row_sum=True))
        # proj: the branch a @ Wo^T + b in bf16 (its residual add runs in the next norm, whose
        # backward writes the gradient g in bf16 too); dX = g @ Wo; dW = g^T @ a (+ db)
        add("proj", "fwd", M, D, D,
            lambda M=M, D=D: gemm(e(M, D, dtype=bf16), e(D, D, dtype=bf16), e(M, D, dtype=bf16),
                                  Epilogue(bias=e(D, dtype=bf16))))
        add("proj", "dX", M, D, D,
            lambda M=M, D=D: gemm(e(M, D, dtype=bf16), e(D, D, dtype=bf16).t(), e(M, D, dtype=bf16)))
        add("proj", "dW", D, D, M,
            lambda M=M, D=D: gemm(e(M, D, dtype=bf16).t(), e(M, D, dtype=bf16).t(), e(D, D, dtype=bf16),
                                  row_sum=True))
        if swiglu:
            _swiglu_gemms(add, M, D, H)
            continue
        # fc1: h = GELU(x @ W1^T + b1), pre stored; dX = dP @ W1; dW1 = dP^T @ x (+ db1)
        add("fc1", "fwd", M, H, D,
            lambda M=M, D=D, H=H: gemm(e(M, D, dtype=bf16), e(H, D, dtype=bf16), e(M, H, dtype=bf16),
                                       Epilogue(bias=e(H, dtype=bf16), activation=Activation.GELU,
                                                pre=e(M, H, dtype=bf16))))
        add("fc1", "dX", M, D, H,
            lambda M=M, D=D, H=H: gemm(e(M, H, dtype=bf16), e(H, D, dtype=bf16).t(), e(M, D, dtype=bf16)))
        add("fc1", "dW", H, D, M,
            lambda M=M, D=D, H=H: gemm(e(M, H, dtype=bf16).t(), e(M, D, dtype=bf16).t(), e(H, D, dtype=bf16),
                                       row_sum=True))
        # fc2: the branch h @ W2^T + b2 in bf16 (its add in the next norm); dP = (g @ W2) *
        # gelu'(pre) (the dU GEMM, g bf16 from that norm's backward); dW2 = g^T @ h (+ db2)
        add("fc2", "fwd", M, D, H,
            lambda M=M, D=D, H=H: gemm(e(M, H, dtype=bf16), e(D, H, dtype=bf16), e(M, D, dtype=bf16),
                                       Epilogue(bias=e(D, dtype=bf16))))
        add("fc2", "dX", M, H, D,
            lambda M=M, D=D, H=H: gemm(e(M, D, dtype=bf16), e(D, H, dtype=bf16).t(), e(M, H, dtype=bf16),
                                       Epilogue(act_grad=Activation.GELU, aux=e(M, H, dtype=bf16))))
        add("fc2", "dW", D, H, M,
            lambda M=M, D=D, H=H: gemm(e(M, D, dtype=bf16).t(), e(M, H, dtype=bf16).t(), e(D, H, dtype=bf16),
                                       row_sum=True))
    return out


def _swiglu_gemms(add, M: int, D: int, H: int) -> None:
    """The SwiGLU MLP's GEMMs as ``vitkern.ops.swiglu.launch`` issues them (packed fc1 weight)."""
    import torch

    from vitkern.ops.gemm import Epilogue
    from vitkern.ops.gemm.launch import gemm, swiglu_gemm

    bf16 = torch.bfloat16
    e = torch.empty

    def fc1_fwd():
        w = e(2 * H, D, dtype=bf16)
        b = e(2 * H, dtype=bf16)
        swiglu_gemm(e(M, D, dtype=bf16), w[:H], w[H:], e(M, H, dtype=bf16), b[:H], b[H:], e(M, 2 * H, dtype=bf16))

    # fc1: h = silu(g) * v from one GEMM (the packed pre-activation stored); dX = (dg, dv) @ W1;
    # dW1 = (dg, dv)^T @ x (+ db1)
    add("fc1", "fwd", M, H, D, fc1_fwd)
    add("fc1", "dX", M, D, 2 * H,
        lambda: gemm(e(M, 2 * H, dtype=bf16), e(2 * H, D, dtype=bf16).t(), e(M, D, dtype=bf16)))
    add("fc1", "dW", 2 * H, D, M,
        lambda: gemm(e(M, 2 * H, dtype=bf16).t(), e(M, D, dtype=bf16).t(), e(2 * H, D, dtype=bf16), row_sum=True))
    # fc2: the branch h @ W2^T + b2 in bf16 (its add in the next norm); dH = g @ W2 (g bf16) with
    # the SwiGLU-gradient epilogue writing (dg, dv); dW2 = g^T @ h (+ db2)
    add("fc2", "fwd", M, D, H,
        lambda: gemm(e(M, H, dtype=bf16), e(D, H, dtype=bf16), e(M, D, dtype=bf16),
                     Epilogue(bias=e(D, dtype=bf16))))
    add("fc2", "dX", M, H, D,
        lambda: gemm(e(M, D, dtype=bf16), e(D, H, dtype=bf16).t(), e(M, 2 * H, dtype=bf16),
                     Epilogue(glu_grad=True, aux=e(M, 2 * H, dtype=bf16))))
    add("fc2", "dW", D, H, M,
        lambda: gemm(e(M, D, dtype=bf16).t(), e(M, H, dtype=bf16).t(), e(D, H, dtype=bf16), row_sum=True))


def former_sm_use(M: int, N: int, K: int, config, sms: int, split_safe: bool) -> float:
    """Predicted SM use under the rule before the split choice: split K (at most 8 ways, >= 8
    BLOCK_K steps each, K >= 16 steps) only when the tiles are fewer than the SMs."""
    from vitkern.ops.gemm.configs import sm_use

    tiles = math.ceil(M / config.block_m) * math.ceil(N / config.block_n)
    k_tiles = math.ceil(K / config.block_k)
    split = 1
    if split_safe and k_tiles >= 16 and tiles < sms:
        split = max(1, min(8, sms // tiles, k_tiles // 8))
    return sm_use(tiles, split, sms)


_MODES = {0: "plain", 1: "tma", 2: "tma_t", 3: "plain_t"}


def build_report(batch: int = 256, archs: Sequence[int] = (90,), workers: int = 1,
                 models: Optional[Sequence[str]] = None) -> dict:
    """Capture, plan and compile every ViT GEMM (in a process that is not interpreting)."""
    import torch
    import triton

    from vitkern.ops import _config
    from vitkern.ops.gemm import select_config, select_swiglu_config
    from vitkern.ops.gemm.configs import GEMM_CONFIGS, SWIGLU_CONFIGS, plan_gemm
    from vitkern.testing.compile_check.cases import capture
    from vitkern.testing.compile_check.compiler import _compile_all
    from vitkern.testing.compile_check.plan import add_launches
    from vitkern.testing.compile_check.report import evaluate

    if _config.INTERPRETING:
        raise RuntimeError("the GEMM report compiles for the GPU: unset TRITON_INTERPRET")
    names = {id(c): n for n, c in (*GEMM_CONFIGS.items(), *SWIGLU_CONFIGS.items())}
    previous = _config.set_sm_carveout(0)  # the report sizes for the whole chip
    jobs: dict = {}
    plan_rows: list = []
    pending = []
    try:
        for arch in archs:
            sms = REPORT_SMS[arch]
            for g in vit_gemms(batch, models):
                with capture(arch) as launches:
                    g.call()
                gemm_launches = [la for la in launches if la.entry.qualname.endswith(("_gemm_kernel",
                                                                                      "_swiglu_gemm_kernel"))]
                if len(gemm_launches) != 1:
                    raise RuntimeError(f"{g.model} {g.layer} {g.pass_}: expected one GEMM launch, got {len(launches)}")
                launch = gemm_launches[0]
                keys = add_launches([launch], arch, False, jobs, plan_rows)[0]
                kw = launch.kwargs
                meta = launch.config.meta if launch.config is not None else {}
                split_safe = g.pass_ == "dW"
                kind = g.epilogue
                dtype = torch.bfloat16
                if kind == "swiglu":  # its own table; one program per tile, a 1-D grid
                    cfg = select_swiglu_config(g.M, g.N, g.K, dtype, arch)
                else:
                    cfg = select_config(g.M, g.N, g.K, dtype, arch, kind, num_sms=sms)
                plan = plan_gemm(g.M, g.N, g.K, cfg, sms, split_safe=split_safe, row_sum=g.pass_ == "dW")
                grid = tuple(launch.grid) + ((1,) if kind == "swiglu" else ())
                if (meta.get("BLOCK_M"), meta.get("BLOCK_N"), meta.get("BLOCK_K")) != (
                        cfg.block_m, cfg.block_n, cfg.block_k) or grid != (plan.programs, plan.split_k):
                    raise RuntimeError(f"{g.model} {g.layer} {g.pass_}: the launcher's launch {meta} grid "
                                       f"{launch.grid} is not the plan's {plan.describe()}")
                former_cfg = cfg if kind == "swiglu" else select_config(g.M, g.N, g.K, dtype, arch, "none")
                row = {
                    "model": g.model, "gemm": g.layer, "pass": g.pass_, "M": g.M, "N": g.N, "K": g.K,
                    "arch": arch, "epilogue": kind, "config": names.get(id(cfg), cfg.label()),
                    **plan.describe(),
                    "sm_use_before": round(former_sm_use(g.M, g.N, g.K, former_cfg, sms, split_safe), 4),
                    "loads": {op: _MODES[kw[f"{op}_MODE"]] for op in ("A", "B", "C", "R") if f"{op}_MODE" in kw},
                    "flatten": bool(meta.get("FLATTEN")),
                }
                row["loads"] = {k: v for k, v in row["loads"].items() if k != "R" or kind == "residual"}
                pending.append((row, keys))
    finally:
        _config.set_sm_carveout(previous)
    job_list = list(jobs.values())
    compiled = _compile_all(job_list, workers)
    by_key = {j.key: r for j, r in zip(job_list, compiled)}
    rows = []
    for row, keys in pending:
        c = by_key.get(keys[0]) if keys else None
        problems = list(evaluate(c)) if c is not None else ["not compiled (see plan problems)"]
        if c is not None:
            row.update({
                "regs": c.get("n_regs"), "spill_stores": c.get("spill_stores"), "spill_loads": c.get("spill_loads"),
                "shared_kb": round((c.get("shared") or 0) / 1024, 1), "blocks_per_sm": c.get("blocks_per_sm"),
                "wgmma": bool(c.get("wgmma")), "mma_instr": c.get("mma_instr"),
                "tma": any(v.startswith("tma") for v in row["loads"].values()),
            })
        if row["pass"] == "dW" and row["sm_use"] < MIN_DW_SM_USE:
            problems.append(f"predicted SM use {row['sm_use']:.2f} below {MIN_DW_SM_USE}")
        row["problems"] = problems
        rows.append(row)
    return {
        "schema": 1,
        "command": "env -u TRITON_INTERPRET python -m vitkern.testing.compile_check.gemm_report "
                   "--json benchmarks/compile_report_gemm.json",
        "triton": triton.__version__,
        "batch": batch,
        "sms": {str(a): REPORT_SMS[a] for a in archs},
        "min_dw_sm_use": MIN_DW_SM_USE,
        "plan_problems": [r.get("problems_plan") for r in plan_rows],
        "rows": rows,
    }


def format_report(report: dict) -> str:
    header = ("model", "gemm", "pass", "M", "N", "K", "arch", "config", "tile", "w", "s", "regs", "spill",
              "smem KB", "bl/SM", "wgmma", "tma", "pers", "split", "tiles", "waves", "SM use", "before", "status")
    lines = [header]
    for r in report["rows"]:
        lines.append((
            r["model"], r["gemm"], r["pass"], r["M"], r["N"], r["K"], f"sm_{r['arch']}", r["config"], r["tile"],
            r["warps"], r["stages"], r.get("regs", ""),
            "" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}",
            r.get("shared_kb", ""), r.get("blocks_per_sm", ""), "y" if r.get("wgmma") else "-",
            "y" if r.get("tma") else "-", "y" if r["persistent"] else "-", r["split_k"], r["tiles"], r["waves"],
            f"{r['sm_use']:.3f}", f"{r['sm_use_before']:.3f}",
            "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"]),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern.testing.compile_check.gemm_report",
                                     description="Static compile report of the ViT GEMMs (no GPU needed).")
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--archs", default="90", help="comma-separated arch families (default 90)")
    parser.add_argument("--models", default="",
                        help=f"comma-separated subset of {', '.join((*VIT_MODELS, *SWIGLU_MODELS))}")
    parser.add_argument("--workers", type=int, default=0, help="compile processes (default: CPU cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the report compiles for the GPU", file=sys.stderr)
        return 2
    from vitkern.testing.compile_check.runner import default_cache_dir, default_workers

    if "TRITON_CACHE_DIR" not in os.environ and default_cache_dir():
        os.environ["TRITON_CACHE_DIR"] = default_cache_dir()
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()] or None
    t0 = time.perf_counter()
    report = build_report(args.batch, archs, args.workers or default_workers(), models)
    print(format_report(report))
    failures = [r for r in report["rows"] if r["problems"]]
    print(f"\n{len(report['rows'])} GEMMs, {len(failures)} with problems, {time.perf_counter() - t0:.1f} s "
          f"(triton {report['triton']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 1 if failures or any(report["plan_problems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
