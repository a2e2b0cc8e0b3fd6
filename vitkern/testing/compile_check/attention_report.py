"""The attention compile report: per benchmark shape, the forward and backward kernels' configs and
what they compile to (no GPU): tile, warps, stages, registers, spills, shared memory, resident
blocks per SM, wgmma / TMA, and the grid against the SM count (predicted waves), under each Triton
given.

Command line (writes the committed ``benchmarks/compile_report_attention.json``)::

    python -m vitkern.testing.compile_check.attention_report --triton .triton36 \\
        --json benchmarks/compile_report_attention.json

``--triton PATH`` (repeatable) adds a leg with the Triton installed under PATH first on the path
(e.g. ``pip install --target .triton36 triton==3.6.0``); the Triton the interpreter imports is
always the first leg. Each leg compiles in its own process without ``TRITON_INTERPRET``, through
the compile check (:func:`~vitkern.testing.compile_check.run_compile_check`): each shape is a
compile case calling the launchers the way the registered ops do, so the rows are the
specialisations a run launches. Batch sizes only size the grid: the cases compile with a batch of
2 and the report counts the grid for the shape's own batch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from vitkern.testing.compile_check.cases import compile_cases

#: The benchmark shapes: name, batch, heads, tokens, head dim; bf16, packed qkv (the ViT path)
#: unless ``packed`` is False.
SHAPES = (
    dict(name="ViT-B/16", batch=256, heads=12, tokens=197, head_dim=64),
    dict(name="ViT-B/16@384", batch=256, heads=12, tokens=577, head_dim=64),
    dict(name="ViT-B/16@512", batch=256, heads=12, tokens=1025, head_dim=64),
    dict(name="ViT-L/16", batch=256, heads=16, tokens=257, head_dim=64),
    dict(name="ViT-H/14", batch=256, heads=16, tokens=257, head_dim=80),
    dict(name="SigLIP-so400m/14@384", batch=256, heads=16, tokens=729, head_dim=72),
    dict(name="ViT-B/16 batch 1", batch=1, heads=12, tokens=197, head_dim=64),
    dict(name="T=4096 D=128", batch=4, heads=16, tokens=4096, head_dim=128, packed=False),
)

#: SMs of the arch families' reference parts (H100 SXM, A100 SXM).
NUM_SMS = {90: 132, 80: 108}

MODULE = "vitkern.testing.compile_check.attention_report"


def _case_name(shape: dict) -> str:
    return "shape_" + re.sub(r"\W+", "_", shape["name"]).strip("_")


def _make_case(shape: dict):
    def case():
        import torch

        from vitkern.ops._config import device_arch, num_sms
        from vitkern.ops.attention.compile_cases import _case_run

        packed = shape.get("packed", True)
        # the batch only sizes the grid; 1 stays 1 (an argument equal to 1 may specialise). The
        # forward's key split is the one the shape's own batch gets
        b = 1 if shape["batch"] == 1 else 2
        splits = _kv_splits(shape, device_arch(), num_sms())
        _case_run(torch.bfloat16, b, shape["heads"], shape["heads"], shape["tokens"], shape["tokens"],
                  shape["head_dim"], packed=packed, kv_splits=splits,
                  bwd_mode=_bwd_plan(shape, device_arch(), num_sms()).mode)

    case.__name__ = case.__qualname__ = _case_name(shape)
    case.__module__ = MODULE
    return case


if __name__ != "__main__":  # the cases register once, under this module's own name
    for _shape in SHAPES:
        compile_cases(_make_case(_shape))


def _kv_splits(shape: dict, arch: int, sms: int) -> int:
    """The split-KV forward's splits at the shape's own batch (as the launcher picks them)."""
    from vitkern.ops.attention.configs import _attn_fwd_plan, _attn_pieces

    d, t = shape["head_dim"], shape["tokens"]
    da, db = _attn_pieces(d)
    return _attn_fwd_plan(arch, "16bit", da + db, d != da + db, shape["batch"] * shape["heads"], t, t, sms)[1]


def _bwd_plan(shape: dict, arch: int, sms: int):
    """The backward's plan at the shape's own batch (fused, atomic or the dQ kernel, as the
    launcher picks it; not deterministic)."""
    from vitkern.ops.attention.configs import _attn_bwd_plan, _attn_pieces

    d, t = shape["head_dim"], shape["tokens"]
    da, db = _attn_pieces(d)
    return _attn_bwd_plan(arch, "16bit", da + db, d != da + db, shape["batch"], shape["heads"], shape["heads"],
                          t, t, sms, False, causal=bool(shape.get("causal", False)))


def _grid(kernel: str, meta: dict, shape: dict, arch: int) -> int:
    """Programs of a launch at the shape's own batch (the launchers' grids)."""
    b, h, t = shape["batch"], shape["heads"], shape["tokens"]
    if kernel.endswith("bwd_fused_kernel"):
        return _bwd_plan(shape, arch, NUM_SMS[arch]).programs
    block = meta["BLOCK_N"] if kernel.endswith("dkdv_kernel") else meta["BLOCK_M"]
    programs = math.ceil(t / block) * b * h
    if kernel.endswith("fwd_split_kernel"):
        programs *= _kv_splits(shape, arch, NUM_SMS[arch])
    return programs


def _meta(constexprs: str) -> dict:
    return {k: int(v) for k, v in re.findall(r"\b(BLOCK_M|BLOCK_N|BLOCK_DA|BLOCK_DB)=(\d+)", constexprs)}


def _leg_rows(triton_path: Optional[str], archs: Sequence[int], workers: Optional[int]) -> tuple[str, list[dict]]:
    from vitkern.testing.compile_check.runner import run_compile_check

    sys_path = [triton_path] if triton_path else []
    report = run_compile_check([MODULE], archs=archs, workers=workers, sys_path=sys_path)
    version = re.search(r"\(triton (\S+) from", report.output)
    return (version.group(1) if version else "?"), report.rows


def build_report(triton_paths: Sequence[Optional[str]] = (None,), archs: Sequence[int] = (90, 80),
                 workers: Optional[int] = None) -> dict:
    """The report as a dict (what the command line writes as JSON)."""
    from vitkern.ops.attention.configs import blocks_per_sm

    legs = [_leg_rows(p, archs, workers) for p in triton_paths]
    shapes = []
    problems = []
    for shape in SHAPES:
        case = f"{MODULE}:{_case_name(shape)}"
        kernels: dict[tuple, dict] = {}
        for version, rows in legs:
            for r in rows:
                if r.get("problems"):
                    problems.append(f"triton {version}: {r.get('kernel')} sm_{r.get('arch')}: {r['problems']}")
                if case not in (r.get("cases") or ()):
                    continue
                key = (r["arch"], r["kernel"], r["config"])
                meta = _meta(r.get("constexprs", ""))
                entry = kernels.setdefault(key, {
                    "kernel": r["kernel"], "arch": r["arch"], "config": r["config"],
                    "tile": [meta.get("BLOCK_M"), meta.get("BLOCK_N")] if "BLOCK_N" in meta else [meta.get("BLOCK_M")],
                    "head_dim_pieces": [meta.get("BLOCK_DA"), meta.get("BLOCK_DB")] if "BLOCK_DA" in meta else None,
                    "warps": r["num_warps"], "stages": r["num_stages"],
                    "grid": _grid(r["kernel"], meta, shape, r["arch"]), "sms": NUM_SMS[r["arch"]], "triton": {},
                })
                blocks = blocks_per_sm(r["arch"], r["n_regs"], r["num_warps"], r["shared"]) if r.get("n_regs") else None
                entry["triton"][version] = {
                    "regs": r.get("n_regs"), "spill_stores": r.get("spill_stores"), "spill_loads": r.get("spill_loads"),
                    "shared_bytes": r.get("shared"), "blocks_per_sm": blocks,
                    "waves": None if not blocks else round(entry["grid"] / (entry["sms"] * blocks), 2),
                    "wgmma": r.get("wgmma"), "tma": r.get("tma"), "mma_instr": r.get("mma_instr"),
                }
        shapes.append(dict(shape, dtype="bfloat16", packed=shape.get("packed", True),
                           kernels=sorted(kernels.values(), key=lambda e: (-e["arch"], e["kernel"]))))
    return {
        "about": "static compile of the attention kernels each benchmark shape launches (no GPU): "
                 "registers and spills from ptxas -v, dynamic shared memory from the compiled metadata, "
                 "resident blocks per SM from registers (per-warp units of 256, 64K a SM), shared memory "
                 "(plus 1 KB reserved a block) and threads; waves = grid / (SMs x blocks per SM)",
        "command": "python -m vitkern.testing.compile_check.attention_report --triton .triton36 "
                   "--json benchmarks/compile_report_attention.json",
        "triton_versions": [v for v, _ in legs],
        "problems": problems,
        "shapes": shapes,
    }


def format_report(report: dict) -> str:
    """A plain-text table of the report (one line per shape, kernel, arch and Triton version)."""
    lines = [f"{'shape':22s} {'kernel':30s} {'arch':5s} {'config':28s} {'triton':7s} {'regs':>4s} {'spill':>5s} "
             f"{'smem KB':>7s} {'blk/SM':>6s} {'grid':>7s} {'waves':>6s} mma   tma"]
    for shape in report["shapes"]:
        for k in shape["kernels"]:
            for version, t in k["triton"].items():
                mma = "wgmma" if t["wgmma"] else (t["mma_instr"] or "-").split(".")[0]
                lines.append(
                    f"{shape['name']:22s} {k['kernel'][:30]:30s} sm_{k['arch']:<2d} {k['config'][:28]:28s} "
                    f"{version:7s} "
                    f"{t['regs'] or 0:4d} {(t['spill_stores'] or 0) + (t['spill_loads'] or 0):5d} "
                    f"{(t['shared_bytes'] or 0) / 1024:7.1f} {t['blocks_per_sm'] or 0:6d} {k['grid']:7d} "
                    f"{t['waves'] if t['waves'] is not None else '-':>6} {mma:5s} {'yes' if t['tma'] else 'no'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="append", default=[],
                        help="a directory with another Triton installed (pip --target), a leg of its own")
    parser.add_argument("--archs", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--workers", type=int, default=0, help="compile processes (default: CPU cores)")
    parser.add_argument("--json", help="write the report to this file")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    paths = [None] + [str(Path(p).resolve()) for p in args.triton]
    report = build_report(paths, archs, args.workers or None)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    for p in report["problems"]:
        print("problem:", p, file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    # run as a script: the cases must register under the importable module name
    import importlib

    sys.exit(importlib.import_module(MODULE).main())
