"""All rendering of results, from the JSON alone (no torch): the console table, ``summary.md``,
the headline table and the README section.

- :func:`print_table` / :func:`render_text`: one table per (op, shape) on the console (rich when
  installed, else plain text), long notes as numbered footnotes; the reference columns are the
  primary references only, the others show in "vs best" when they are the fastest.
- :func:`render_markdown`: ``summary.md``, the headline first, then the environment, the ceilings,
  the plots and one table per (op, shape) with every reference.
- :func:`render_headline`: the compact headline table (:func:`benchmarks.cases.headline_table`)
  that ``summary.md``, the README section and the console share.
- :func:`readme_section`: the README's "Latest GPU results" text (:mod:`benchmarks.readme` checks
  the run and writes it between the markers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from benchmarks.cases import ALL_PROVIDERS, REFERENCE_PROVIDERS, headline_table
from benchmarks.flops import ALL_MODES

CPU_BANNER = (
    "No CUDA device: kernel timings need a GPU. This is the CPU reference path: vitkern runs its "
    "PyTorch reference here (backend auto -> reference), the Triton provider is skipped, and the "
    "times below are CPU wall clock at tiny shapes, which say nothing about kernel speed. Each "
    "provider's output is checked against the torch module (max abs err)."
)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _fmt_rate(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.01 else f"{value:.4f}"


class _Notes:
    """Footnotes: long notes (skip reasons, errors) become ``[n]`` in a table cell."""

    def __init__(self):
        self.texts: dict[str, int] = {}

    def ref(self, text: Optional[str]) -> str:
        if not text:
            return ""
        if text not in self.texts:
            self.texts[text] = len(self.texts) + 1
        return f"[{self.texts[text]}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {text}" for text, n in self.texts.items()]


# The references that get a column of their own in the console table (the full Markdown tables show
# every reference); the others are in the "vs best" column when they are the fastest.
_PRIMARY_REFERENCES = ("torch", "torch.compile", "torchvision")


def _layout(rows: list[dict], full: bool = True) -> tuple[list[str], bool, bool]:
    refs = [
        p for p in REFERENCE_PROVIDERS
        if (full or p in _PRIMARY_REFERENCES) and any(r["provider"] == p and r["status"] == "ok" for r in rows)
    ]
    on_gpu = any(r["device"] == "cuda" for r in rows)
    show_items = any(r["items_per_s"] is not None for r in rows)
    return refs, on_gpu, show_items


def _groups(rows: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """Rows grouped by (op, shape, dtype) in run order, each group sorted by mode then provider."""
    rank = {p: i for i, p in enumerate(ALL_PROVIDERS)}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["op"], r["label"], r["dtype"]), []).append(r)
    out = []
    for (op, label, dtype), members in groups.items():
        members = sorted(
            members,
            key=lambda r: (ALL_MODES.index(r["mode"]) if r["mode"] in ALL_MODES else 9, rank.get(r["provider"], 99)),
        )
        out.append((op, label, dtype, members))
    return out


def _header(refs, on_gpu, show_items, *, full: bool) -> list[str]:
    header = ["mode", "provider", "median ms", "p20-p80 ms" if full else "spread", "TFLOP/s", "GB/s"]
    if on_gpu:
        header += ["% ceil", "peak mem"]
    if show_items:
        header += ["img/s"]
    header += [f"vs {p}" if full else f"vs {p.replace('torch.compile', 'compile')}" for p in refs]
    header += ["vs best"]
    if full and on_gpu:
        header += ["timing"]
    return header + ["max abs err", "note"]


def _timing_method(r: dict) -> str:
    if r["status"] != "ok":
        return ""
    if r["device"] != "cuda":
        return "wall clock"
    if r["cuda_graph"]:
        return "CUDA graph"
    parts = []
    if r["input_copies"] and r["input_copies"] > 1:
        parts.append(f"{r['input_copies']} input copies")
    if r["l2_flush"]:
        parts.append("L2 flush")
    return ", ".join(parts) or "warm L2"


def _cells(r: dict, refs, on_gpu, show_items, notes: _Notes, *, full: bool) -> list[str]:
    ok = r["status"] == "ok"
    if ok:
        spread = (
            f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
            if full
            else f"±{50 * (r['p80_ms'] - r['p20_ms']) / r['median_ms']:.0f}%" if r["median_ms"] else "-"
        )
    else:
        spread = ""
    cells = [
        r["mode"], r["provider"], f"{r['median_ms']:.4g}" if ok else r["status"], spread,
        _fmt_rate(r["tflops"]), _fmt_rate(r["gbps"]),
    ]
    if on_gpu:
        pct = _fmt(r["pct_of_ceiling"], ".1f")
        cells += [pct + (f" {r['bound'][:3]}" if r["bound"] else ""), _fmt_bytes(r["peak_mem_bytes"])]
    if show_items:
        cells += [_fmt(r["items_per_s"], ".0f")]
    cells += [f"{r['speedup_vs'][p]:.2f}x" if p in r["speedup_vs"] else "-" for p in refs]
    best = r.get("best_reference")
    cells += [f"{r['speedup_vs_best']:.2f}x {best.replace('torch.compile', 'compile')}" if best else "-"]
    if full and on_gpu:
        cells += [_timing_method(r)]
    err = _fmt(r["max_abs_err"], ".1e")
    if r["err_ok"] is False:
        err += " FAIL"
    note = r["note"] or ""
    cells += [err, note if len(note) <= (60 if full else 32) else notes.ref(note)]
    return cells


def render_text(rows: list[dict]) -> str:
    """The console table as plain text (used when rich is not installed)."""
    _, on_gpu, _ = _layout(rows)
    notes = _Notes()
    lines = []
    for op, label, dtype, members in _groups(rows):
        refs, _, show_items = _layout(members, full=False)  # the reference and img/s columns this table needs
        header = _header(refs, on_gpu, show_items, full=False)
        body = [_cells(r, refs, on_gpu, show_items, notes, full=False) for r in members]
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
        lines += ["", f"{op}  {label}  {dtype}", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    if notes.texts:
        lines += ["", "notes:"] + notes.lines()
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    """One table per (op, shape), then the numbered notes. Plain text when rich is missing."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_text(rows))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file has no width to fit
    _, on_gpu, _ = _layout(rows)
    notes = _Notes()
    for op, label, dtype, members in _groups(rows):
        refs, _, show_items = _layout(members, full=False)  # the reference and img/s columns this table needs
        header = _header(refs, on_gpu, show_items, full=False)
        table = Table(
            title=f"[bold]{op}[/]  {label}  {dtype}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            padding=(0, 1),
            collapse_padding=True,
        )
        body = [_cells(r, refs, on_gpu, show_items, notes, full=False) for r in members]
        for i, h in enumerate(header):
            if h == "note":  # the one column that gives way when the terminal is narrow
                table.add_column(h, justify="left", no_wrap=True, overflow="ellipsis", min_width=4)
            else:
                width = max(len(h), *(len(c[i]) for c in body))
                table.add_column(
                    h, justify="left" if h in ("mode", "provider") else "right", no_wrap=True, min_width=width
                )
        mode = None
        for r, cells in zip(members, body):
            if mode is not None and r["mode"] != mode:
                table.add_section()
            mode = r["mode"]
            style = None
            if r["status"] == "error" or r["err_ok"] is False:
                style = "red"
            elif r["status"] == "skipped":
                style = "dim"
            elif r["provider"] == "vitkern":
                style = "bold"
            table.add_row(*cells, style=style)
        console.print(table)
    if notes.texts:
        console.print("notes:", style="bold")
        for line in notes.lines():
            console.print(line, highlight=False, markup=False)


def _run_line(doc: dict) -> str:
    cfg = doc["config"]
    if cfg.get("cuda_graphs"):
        timing = "CUDA graph replay"
    elif cfg["device"] == "cuda":
        timing = f"L2 flush {'on' if cfg['flush_l2'] else 'off'}, rotating input copies {cfg.get('rotate', 'auto')}"
    else:
        timing = "CPU wall clock"
    batch = cfg.get("batch")
    batch = "" if batch is None else f", batch {batch if isinstance(batch, int) else ','.join(map(str, batch))}"
    return (
        f"Run: dtype {cfg['dtype']}, modes {', '.join(cfg['modes'])}, "
        f"{'quick' if cfg['quick'] else 'full'} shapes{batch}, "
        f"{timing}, wall time {doc['wall_s']:.1f} s" + ("" if doc["complete"] else " (incomplete)") + "."
    )


def render_markdown(doc: dict, plots: Sequence[str] = ()) -> str:
    """summary.md: the headline table, environment, ceilings, the plots (file names in the same
    folder), then one table per (op, shape)."""
    env, ceil = doc["environment"], doc["ceilings"]
    lines = [f"# vitkern benchmarks: {env['device_name']}", ""]
    if env["device_type"] != "cuda":
        lines += [f"> {CPU_BANNER}", ""]
    lines += [
        "## Headline",
        "",
        "vitkern (backend auto) against the fastest reference measured in the same run, for each op's first "
        "shape and the first model's batch sweep; the tables further down have every shape and provider.",
        "",
        render_headline(doc).rstrip("\n"),
        "",
        _run_line(doc),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Environment", "", "| key | value |", "| --- | --- |"]
    for key in (
        "device_name", "compute_capability", "l2_cache_bytes", "driver_version", "cuda_version", "torch", "triton",
        "timm", "torchvision", "flash_attn", "xformers", "python", "vitkern", "cuda_extension_available", "git_commit",
        "git_dirty", "date", "platform", "cpu", "torch_num_threads",
    ):
        lines.append(f"| {key} | {env.get(key)} |")
    if env.get("vitkern_import_error"):
        lines.append(f"| vitkern_import_error | {env['vitkern_import_error']} |")
    lines += [""]
    if ceil:
        lines += [
            "## Ceilings (measured at the start of this run)",
            "",
            f"- GEMM {ceil['gemm_dtype']} {'x'.join(map(str, ceil['gemm_shape']))}: {ceil['gemm_tflops']:.1f} TFLOP/s",
            f"- device-to-device copy of {ceil['copy_bytes'] / 2**30:.0f} GiB: "
            f"{ceil['copy_gbps']:.0f} GB/s (read + write)",
            "",
            "`% ceil` = the roofline floor max(FLOPs / GEMM ceiling, bytes / copy ceiling) as a percentage of the "
            "median time (`com`: compute bound, `mem`: memory bound).",
            "",
        ]
    lines += [
        "`vs X` = X's median / this median (above 1: faster than X), measured in the same run; `vs best` is against "
        "the fastest reference of that case (named). `max abs err` is against the torch provider in the same dtype. "
        "FLOPs and minimum bytes: `benchmarks/flops.py`."
        + (
            " `timing`: CUDA events per repetition, with the L2 flushed before each, or rotating copies of the "
            "inputs that exceed the L2 (memory-bound cases), or CUDA graph replays (`--cuda-graphs`)."
            if env["device_type"] == "cuda"
            else ""
        ),
        "",
    ]
    rows = doc["rows"]
    _, on_gpu, _ = _layout(rows)
    notes = _Notes()
    current_op = None
    for op, label, dtype, members in _groups(rows):
        refs, _, show_items = _layout(members)  # the reference and img/s columns this table needs
        header = _header(refs, on_gpu, show_items, full=True)
        if op != current_op:
            lines += [f"## {op}", ""]
            current_op = op
        lines += [f"**{label}** ({dtype})", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in members:
            cells = _cells(r, refs, on_gpu, show_items, notes, full=True)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += render_auto_choices(rows)
    if notes.texts:
        lines += ["## Notes", ""] + [f"- {line}" for line in notes.lines()] + [""]
    return "\n".join(lines)


def render_auto_choices(rows: list[dict]) -> list[str]:
    """The "auto choices" section of summary.md: for each op and shape class that a "vitkern" row's
    first call met, each candidate backend's time and the one "auto" ran (once per shape class)."""
    seen: dict[str, dict] = {}
    for r in rows:
        for c in r.get("auto_choices") or ():
            seen.setdefault(c["shape_class"], c)
    if not seen:
        return []
    backends = sorted({b for c in seen.values() for b in c["times_ms"]})
    header = ["op", "shape class", *[f"{b} ms" for b in backends], "auto ran", "how"]
    lines = [
        "## What auto chose",
        "",
        "Each op and shape class the vitkern (auto) rows met: the candidate backends' times as auto measured "
        "them on their first call (forward, plus backward where the call needs a gradient), and the one it ran "
        "(`measured` here, read from the tuning `cache`, the `static` table, or the `only` candidate).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for key, c in seen.items():
        shape = key.split(" ", 1)[1] if " " in key else key
        times = [_ms(c["times_ms"][b]) if c["times_ms"].get(b) is not None else
                 ("failed" if b in c["times_ms"] else "-") for b in backends]
        cells = [c["op"], f"`{shape}`", *times, f"**{c['backend']}**", c["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def render_headline(doc: dict) -> str:
    """The headline as a Markdown table (README-ready)."""
    table = headline_table(doc)
    if not table:
        return "_No results._\n"
    on_gpu = doc.get("environment", {}).get("device_type") == "cuda"
    header = ["op / model", "shape", "mode", "vitkern ms", "best reference", "reference ms", "speedup"]
    if on_gpu:
        header.append("% of ceiling")
    show_items = any(t["items_per_s"] is not None for t in table)
    if show_items:
        header.append("vitkern img/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for t in table:
        vk_ms = _ms(t["vitkern_ms"]) if t["status"] == "ok" else t["status"]
        if t["vitkern_provider"] not in (None, "vitkern") and t["status"] == "ok":
            vk_ms += f" ({t['vitkern_provider']})"
        cells = [
            t["op"],
            t["shape"],
            t["mode"],
            vk_ms,
            t["best_reference"] or "-",
            _ms(t["reference_ms"]),
            f"**{t['speedup']:.2f}x**" if t["speedup"] is not None else "-",
        ]
        if on_gpu:
            cells.append(f"{t['pct_of_ceiling']:.0f}%" if t["pct_of_ceiling"] is not None else "-")
        if show_items:
            cells.append(f"{t['items_per_s']:.0f}" if t["items_per_s"] is not None else "-")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_title(doc: dict) -> str:
    """"NVIDIA H100 80GB HBM3, 2025-01-31, bf16" and so on: the device, the date and the dtype."""
    env, cfg = doc.get("environment", {}), doc.get("config", {})
    date = (env.get("date") or "")[:10]
    parts = [env.get("device_name") or "unknown device", date, cfg.get("dtype")]
    return ", ".join(p for p in parts if p)


def readme_section(doc: dict, rel: str, plot: Optional[str]) -> str:
    """The README section for the run whose results.json is ``doc``, in the folder ``rel`` (a POSIX
    path relative to the README), showing the plot ``plot`` of that folder (a file name) if any."""
    env, cfg = doc["environment"], doc["config"]
    commit = (env.get("git_commit") or "")[:10]
    facts = [f"**{run_title(doc)}**"]
    if env.get("driver_version"):
        facts.append(f"driver {env['driver_version']}")
    facts.append(f"torch {env.get('torch')}")
    if env.get("triton"):
        facts.append(f"triton {env['triton']}")
    if commit:
        facts.append(f"commit `{commit}`" + (" (with local changes)" if env.get("git_dirty") else ""))
    if not doc.get("complete", True):
        facts.append("incomplete run")
    lines = [
        " · ".join(facts),
        "",
        f"From [`{rel}/results.json`]({rel}/results.json) "
        f"(every shape and provider: [`summary.md`]({rel}/summary.md)). "
        "Speedup = the fastest reference's median time (timm / PyTorch eager, torch.compile, torchvision, SDPA "
        "backends, flash-attn, xformers, whichever ran) over vitkern's, measured in the same run"
        + (", CUDA graph replays" if cfg.get("cuda_graphs") else "")
        + "; % of ceiling against the GEMM and copy ceilings measured at the start of that run.",
        "",
        render_headline(doc).rstrip("\n"),
        "",
    ]
    if plot:
        lines += [f"![{Path(plot).stem.replace('_', ' ')}]({rel}/{plot})", ""]
    lines.append(f"Regenerate this section with `python -m benchmarks.readme {rel}`.")
    return "\n".join(lines)
