"""PNG plots of a benchmark run, from its results.json alone (matplotlib, Agg backend).

``python -m benchmarks.plot RESULTS.json [--out DIR]`` (re)writes them next to the JSON, or in DIR;
``python -m benchmarks`` writes them at the end of every run. The plots:

- ``speedup_headline.png``: vitkern's speedup over the fastest reference for each headline case
  (:func:`benchmarks.cases.headline_cases`), one bar each;
- ``speedup_vs_batch.png``: the speedup against the batch size, one line per op / model, shape and
  mode that ran at two or more batch sizes (the ViT batch sweep; any op with ``--batch 1,8,64``);
- ``speedup_vs_seqlen.png``: the speedup against the sequence length T, one line per op, heads, head
  dim and mode that ran at two or more lengths (the attention sweep).

The speedup is the fastest reference's median over vitkern's (the ``vitkern`` provider, backend
auto), both measured in the same run; above 1 is faster. A plot with nothing to show is not written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.cases import cases, headline_table, speedup_vs_best
from benchmarks.render import run_title

PLOTS = ("speedup_headline.png", "speedup_vs_batch.png", "speedup_vs_seqlen.png")
# Which shape parameter each sweep plot puts on its x axis, and the others it ignores when it
# decides which cases form one line (the attention length sweep changes batch and name with T).
SWEEPS = {
    "speedup_vs_batch.png": ("batch", ()),
    "speedup_vs_seqlen.png": ("tokens", ("batch", "name")),
}
_AXIS_LABEL = {"batch": "batch size", "tokens": "sequence length T (tokens)"}
_KEY_NAMES = {
    "heads": "H", "head_dim": "d", "dim": "D", "hidden": "hid",
    "in_features": "K", "out_features": "N", "img_size": "img",
}


def _series_label(op: str, fixed: tuple, mode: str) -> str:
    shape = dict(fixed)
    parts = [op]
    if shape.get("name"):
        parts.append(str(shape.pop("name")))
    else:
        shape.pop("name", None)
    shape.pop("train", None)
    parts += [
        f"{_KEY_NAMES.get(k, k)}={v}" for k, v in shape.items() if v not in (None, False) and not isinstance(v, bool)
    ]
    if shape.get("causal"):
        parts.append("causal")
    return " ".join(parts) + f" ({mode})"


def speedup_series(rows: Sequence[dict], x_param: str, ignore: Sequence[str] = ()) -> dict[str, list[tuple]]:
    """``{line label: [(x, speedup), ...]}`` sorted by x, for the cases that have ``x_param`` in
    their shape and a speedup; only lines with two or more distinct x."""
    drop = {x_param, "train", *ignore}
    lines: dict[tuple, dict] = {}
    for (op, _label, dtype, mode), members in cases(rows).items():
        shape = members[0]["shape"]
        x = shape.get(x_param)
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        _, _, speedup = speedup_vs_best(members)
        if speedup is None:
            continue
        fixed = tuple((k, v) for k, v in shape.items() if k not in drop)
        key = (op, dtype, mode, fixed)
        lines.setdefault(key, {})[x] = speedup  # (a repeated x keeps the last)
    out = {}
    for (op, _dtype, mode, fixed), points in lines.items():
        if len(points) >= 2:
            out[_series_label(op, fixed, mode)] = sorted(points.items())
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sweep_plot(plt, series: dict, x_param: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    xs_all = sorted({x for pts in series.values() for x, _ in pts})
    if x_param == "batch" and xs_all[-1] > 8 * max(1, xs_all[0]):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xticks(xs_all)
    ax.set_xlabel(_AXIS_LABEL.get(x_param, x_param))
    ax.set_ylabel("speedup over the fastest reference (x)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _headline_plot(plt, table: list[dict], title: str, path: Path) -> None:
    table = [t for t in table if t["speedup"] is not None]
    labels = [f"{t['op']} {t['shape']} ({t['mode']})" for t in table]
    values = [t["speedup"] for t in table]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(table)), dpi=120)
    ys = range(len(table))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(list(ys), values, color=colors)
    for y, v, t in zip(ys, values, table):
        ax.text(v, y, f" {v:.2f}x vs {t['best_reference']}", va="center", fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=1, linestyle="--")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values + [1.0]) * 1.35)
    ax.set_xlabel("speedup over the fastest reference (x)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(doc: dict, out_dir, *, log=None) -> list[Path]:
    """Write the plots that have data into ``out_dir``; return their paths (none without matplotlib)."""
    out_dir = Path(out_dir)
    try:
        plt = _pyplot()
    except ImportError as exc:
        if log:
            log(f"plots skipped: matplotlib is not installed ({exc})")
        return []
    title = run_title(doc)
    if doc.get("environment", {}).get("device_type") != "cuda":
        title += " (CPU reference path: not kernel timings)"
    written = []
    table = headline_table(doc)
    if any(t["speedup"] is not None for t in table):
        path = out_dir / "speedup_headline.png"
        _headline_plot(plt, table, f"vitkern vs the fastest reference\n{title}", path)
        written.append(path)
    for name, (x_param, ignore) in SWEEPS.items():
        series = speedup_series(doc["rows"], x_param, ignore)
        if series:
            path = out_dir / name
            _sweep_plot(plt, series, x_param, f"vitkern speedup vs {_AXIS_LABEL[x_param]}\n{title}", path)
            written.append(path)
        elif log:
            log(f"{name}: no case ran at two or more values of {x_param}; not written")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plot", description="(Re)write the PNG plots of a benchmark run."
    )
    p.add_argument("results", help="a results.json written by python -m benchmarks (or the folder holding it)")
    p.add_argument("--out", help="output folder (default: the results file's folder)")
    args = p.parse_args(argv)
    path = Path(args.results)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    written = write_plots(doc, out, log=lambda m: print(m, file=sys.stderr))
    for w in written:
        print(w)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
