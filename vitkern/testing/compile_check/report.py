"""Row evaluation and formatting of the compile check (pure functions: usable from any process)."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

#: Dynamic shared memory per block, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
#: Shared memory per SM, bytes, and what the runtime reserves per block (A100 / H100).
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
_SHARED_RESERVED = 1024


def blocks_per_sm(n_regs: Optional[int], num_warps: Optional[int], shared: Optional[int], arch: int) -> Optional[int]:
    """Resident blocks per SM of a compiled kernel (the occupancy calculator's rule for sm_80 /
    sm_90): 64K registers per SM allocated per warp in units of 256 (registers per thread rounded
    up to 8), at most 64 warps and 32 blocks, and shared memory per SM with 1 KB reserved per block.
    None without ptxas statistics."""
    if n_regs is None or not num_warps:
        return None
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_warps = 64 // num_warps
    smem_sm = SHARED_PER_SM.get(arch, SHARED_PER_SM[80])
    by_smem = smem_sm // ((shared or 0) + _SHARED_RESERVED)
    return max(0, min(by_regs, by_warps, by_smem, 32))


def evaluate(row: dict) -> list[str]:
    """The problems of one result row (empty when the compiled kernel passes)."""
    if row.get("problems_plan"):
        return list(row["problems_plan"])
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    if row.get("plan_only"):
        return []
    problems = []
    if row.get("n_regs") is None:
        problems.append("no ptxas statistics")
    stores, loads = row.get("spill_stores") or 0, row.get("spill_loads") or 0
    if stores or loads:
        problems.append(f"spills: {stores} bytes spill stores, {loads} bytes spill loads")
    limit = SHARED_LIMITS.get(row["arch"])
    if limit is not None and (row.get("shared") or 0) > limit:
        problems.append(f"shared memory {row['shared']} B over the sm_{row['arch']} limit {limit} B")
    if row.get("expects_wgmma"):
        if row["arch"] >= 90 and not row.get("wgmma"):
            problems.append(f"no wgmma in the sm_{row['arch']} PTX (found {row.get('mma_instr') or 'no MMA'})")
        if row["arch"] < 90 and not row.get("mma"):
            problems.append(f"no mma.sync in the sm_{row['arch']} PTX")
    return problems


def format_rows(rows: Sequence[dict]) -> str:
    """A plain-text table of result rows (what gpu_check prints)."""
    header = ("kernel", "arch", "config", "constexprs", "signature", "regs", "spill", "smem KB", "bl/SM", "mma",
              "jit", "s", "status")
    lines = [header]
    for r in rows:
        problems = r.get("problems") or []
        mma = "wgmma" if r.get("wgmma") else "mma" if r.get("mma") else "-"
        spill = "" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
        smem = "" if r.get("shared") is None else f"{r['shared'] / 1024:.1f}"
        lines.append((
            r.get("kernel", "?"),
            f"sm_{r['arch']}" if isinstance(r.get("arch"), int) else str(r.get("arch", "")),
            r.get("config", ""),
            _truncate(r.get("constexprs", ""), 60),
            _compact_signature(r.get("signature", "")),
            "" if r.get("n_regs") is None else str(r["n_regs"]),
            spill,
            smem,
            "" if r.get("blocks_per_sm") is None else str(r["blocks_per_sm"]),
            mma,
            _jit_mark(r.get("jit_check", "")),
            "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
            "ok" if not problems else "FAIL: " + "; ".join(problems),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1]))
    return "\n".join(out)


def _jit_mark(jit_check: str) -> str:
    if jit_check in ("same", ""):
        return "=" if jit_check else ""
    return "n/a" if jit_check.startswith("unavailable") else "!"


def _compact_signature(sig: str) -> str:
    """"X:*bf16/16 N:i32" -> "*bf16/16,i32": the types and 16-divisibility, without names."""
    return ",".join(part.split(":", 1)[1] for part in sig.split() if ":" in part)


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_FUNC_RE = re.compile(r"Function properties for (\S+)")


def parse_ptxas_log(log: str, entry: Optional[str] = None) -> Optional[dict]:
    """Registers and spill bytes from ``ptxas -v`` output.

    Spill bytes are summed over every function in the log (non-inlined callees spill too);
    registers are the entry function's (the first "Used N registers" after its name).
    """
    if "ptxas info" not in log:
        return None
    stores = loads = stack = 0
    found = False
    for m in _SPILL_RE.finditer(log):
        found = True
        stack = max(stack, int(m.group(1)))
        stores += int(m.group(2))
        loads += int(m.group(3))
    regs = None
    start = 0
    if entry is not None:
        m = re.search(r"Compiling entry function '" + re.escape(entry) + "'", log)
        start = m.end() if m else 0
    m = _REGS_RE.search(log, start)
    if m:
        regs = int(m.group(1))
    if regs is None and not found:
        return None
    return {"n_regs": regs, "spill_stores": stores, "spill_loads": loads, "stack_frame": stack}


@dataclasses.dataclass
class CheckReport:
    """Rows of one check run, as returned by :func:`run_compile_check`."""

    rows: list[dict]
    wall_s: float
    workers: int
    command: list[str]
    output: str = ""

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r.get("problems")]

    def of_package(self, package: str) -> "CheckReport":
        """The rows a run over ``package`` alone gives: the kernels its compile cases launch (a
        kernel of another package, as patch_embed's GEMMs, included) and its plan problems. A job
        two packages launch alike is one row with both cases, so a whole-tree run answers for
        each package without compiling twice."""
        def inside(module: str) -> bool:
            return module == package or module.startswith(package + ".")

        def ours(row: dict) -> bool:
            cases = row.get("cases") or ()
            return any(inside(c.split(":")[0]) for c in cases) if cases else inside(row["module"])

        rows = [r for r in self.rows if ours(r)]
        return dataclasses.replace(self, rows=rows)

    def format(self) -> str:
        return format_rows(self.rows)
