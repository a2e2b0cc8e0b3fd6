"""Regenerate the README's "Latest GPU results" section from a committed results folder.

``python -m benchmarks.readme benchmarks/results/<date>-<gpu>`` replaces everything between the
markers ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md with: the GPU, date, dtype
and commit of that run, the headline table (:func:`benchmarks.render.render_headline`), and one
plot from the folder (``speedup_vs_batch.png``, else ``speedup_headline.png``; run
``python -m benchmarks.plot`` first if the folder has none). Options: ``--readme PATH`` (default:
the repository's README.md), ``--check`` (exit 1 if the README is not up to date, change nothing),
``--print`` (print the section, change nothing).

Only GPU results go there: a CPU run (its times are the reference path at tiny shapes) is refused,
and so is a folder outside the README's directory (the links would not resolve once committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.render import readme_section

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
PLOT_CHOICE = ("speedup_vs_batch.png", "speedup_headline.png")

NO_RESULTS = (
    "No GPU results have been committed yet. To produce them on a CUDA machine, run\n"
    "`scripts/gpu_check.sh OUT_DIR` (or `python -m benchmarks`), commit `OUT_DIR/bench/` as\n"
    "`benchmarks/results/<date>-<gpu>/`, and run `python -m benchmarks.readme benchmarks/results/<date>-<gpu>`\n"
    "to fill in this section."
)


class ReadmeError(ValueError):
    """The results folder or the README cannot be used (the message says why)."""


def _posix_rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def render_section(doc: dict, results_dir: Path, readme_path: Path) -> str:
    """The text between the markers for the run in ``results_dir`` (whose results.json is ``doc``):
    refused for a CPU run or a folder outside the README's directory, else
    :func:`benchmarks.render.readme_section` with the folder's first plot of :data:`PLOT_CHOICE`."""
    if doc["environment"].get("device_type") != "cuda":
        raise ReadmeError(f"{results_dir} holds a CPU run: only GPU results belong in the README")
    base = readme_path.resolve().parent
    rel = _posix_rel(results_dir.resolve(), base)
    if rel.startswith(".."):
        raise ReadmeError(
            f"{results_dir} is outside {base}: commit the folder under benchmarks/results/ first, "
            "then point at it there"
        )
    plot = next((name for name in PLOT_CHOICE if (results_dir / name).is_file()), None)
    return readme_section(doc, rel, plot)


def replace_section(text: str, section: str) -> str:
    """``text`` with everything between the markers replaced by ``section``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise ReadmeError(f"the README must hold the markers {START} and {END} once each, in that order")
    return text[: start + len(START)] + "\n" + section.strip("\n") + "\n" + text[end:]


def load_results(results_dir: Path) -> dict:
    path = results_dir / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReadmeError(f"cannot read {path}: {exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.readme", description="Regenerate the README's GPU results section."
    )
    p.add_argument("results_dir", help="a committed results folder, e.g. benchmarks/results/2025-01-31-nvidia-h100")
    p.add_argument("--readme", default=str(README), help="the README to update (default: %(default)s)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; change nothing")
    group.add_argument("--print", action="store_true", help="print the section; change nothing")
    args = p.parse_args(argv)
    results_dir, readme = Path(args.results_dir), Path(args.readme)
    try:
        section = render_section(load_results(results_dir), results_dir, readme)
        if args.print:
            print(section)
            return 0
        text = readme.read_text()
        updated = replace_section(text, section)
    except (ReadmeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{readme} is out of date: run python -m benchmarks.readme {args.results_dir}", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        readme.write_text(updated)
        print(f"updated {readme}")
    else:
        print(f"{readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
