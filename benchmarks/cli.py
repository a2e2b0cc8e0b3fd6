"""``python -m benchmarks``: the command line of the benchmark suite (``--help`` lists every flag).

It selects the setups (``--ops``, ``--models``), builds the :class:`benchmarks.runner.RunConfig`,
records the environment and (GPU) the ceilings, runs, and writes ``results.json`` (rewritten after
each case, so a run cut short keeps its rows), the PNG plots (:mod:`benchmarks.plot`) and
``summary.md`` to the output folder, then prints the table and a one-line tally.

- CPU: one torch thread by default (``--threads``), fp32, tiny shapes; vitkern's "auto" runs the
  PyTorch reference there, so the CPU run checks correctness and that the suite works, nothing more.
- exit status: 0; 1 when any row is an error or outside tolerance (except the third-party attention
  references, sdpa-* / flash-attn / xformers, whose failures are reported but are not vitkern's),
  or when results.json does not follow the schema; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks.cases import ALL_PROVIDERS, ATTENTION_PROVIDERS, EXTRA_PROVIDERS, PROVIDERS, REFERENCE_PROVIDERS
from benchmarks.environment import REPO_ROOT, environment, measure_ceilings
from benchmarks.flops import ALL_MODES
from benchmarks.render import CPU_BANNER, print_table, render_headline, render_markdown
from benchmarks.results import DTYPES, SCHEMA_VERSION, SchemaError, short_error, validate_results, write_json
from benchmarks.runner import RunConfig, log, run
from benchmarks.setups import Setup, discover, shape_label


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_dir(device: torch.device, device_name: str) -> Path:
    """``benchmarks/results/<date>-<device>/`` on a GPU. CPU runs (not meant to be committed) go to
    the git-ignored ``benchmarks/results/_scratch/<date>-cpu/``. An existing run gets a suffix."""
    date = _dt.date.today().isoformat()
    base = REPO_ROOT / "benchmarks" / "results"
    if device.type == "cuda":
        path = base / f"{date}-{_slug(device_name)}"
    else:
        path = base / "_scratch" / f"{date}-cpu"
    candidate, n = path, 2
    while (candidate / "results.json").exists():
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


def _split(value: Optional[str]) -> Optional[list]:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark vitkern's ops against PyTorch / timm / torch.compile in one run.",
    )
    p.add_argument("--ops", help="comma-separated ops or model setups (default: all; see --list)")
    p.add_argument(
        "--models",
        help="comma-separated model setups (vit) or model names (ViT-B/16, ViT-L/16, ...): run those; with --ops, "
        "both (default: all; on the CPU the model runs its tiny config whatever the name)",
    )
    p.add_argument("--providers", help=f"comma-separated providers (default: all of {', '.join(ALL_PROVIDERS)})")
    p.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help="comma-separated modes; each setup runs those it has (train: model setups only; default: %(default)s)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="element type (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument(
        "--batch", help="replace every shape's batch size: one value, or a comma-separated sweep (1,8,64,256)"
    )
    p.add_argument("--quick", action="store_true", help="one shape per op and shorter timing loops")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda when present")
    p.add_argument("--out", help="output folder (default: benchmarks/results/<date>-<device>/)")
    p.add_argument("--list", action="store_true", help="list the ops, their shapes and formulas, and exit")
    p.add_argument("--no-flush-l2", action="store_true", help="do not flush the L2 cache between repetitions")
    p.add_argument(
        "--rotate",
        choices=("auto", "always", "never"),
        default="auto",
        help="rotate through copies of the inputs that together exceed the L2 cache, one copy per repetition "
        "(auto: on a GPU, for memory-bound cases; default: %(default)s)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA graph replays of each provider's call (captured once) instead of eager calls: no launch "
        "overhead, which dominates small batches; a call that cannot be captured is timed eagerly with a note",
    )
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.add_argument("--warmup-ms", type=float, help="warmup time per measurement (default: 25 GPU, 20 CPU)")
    p.add_argument(
        "--rep-ms", type=float, help="timed repetitions fill about this long (default: 100 GPU, 150 CPU; quick: half)"
    )
    p.add_argument(
        "--compile-on-cpu", action="store_true", help="also run torch.compile on the CPU (~20 s per compile)"
    )
    p.add_argument("--no-ceilings", action="store_true", help="skip the GPU GEMM / copy ceiling measurement")
    p.add_argument(
        "--budget-s", type=float, help="stop starting new cases after this many seconds (they become skipped rows)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the torch provider's outputs")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default on the CPU: 1, since tiny shapes gain nothing from more and other load on the "
        "machine makes multi-threaded timings erratic; on a GPU: torch's default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _list(setups: dict[str, Setup]) -> None:
    for name, s in setups.items():
        print(f"{name}{' (model)' if s.kind == 'model' else ''}: {s.description}")
        print(f"  modes: {', '.join(s.modes)}; formula: {s.formula}")
        for kind, shapes in (("gpu", s.gpu_shapes), ("cpu", s.cpu_shapes)):
            for i, shape in enumerate(shapes):
                print(f"  {kind}{' (quick)' if i == 0 else ''}: {shape_label(shape)}")
    print(
        f"providers: {', '.join(PROVIDERS)}, and where a setup has one: {', '.join(EXTRA_PROVIDERS)} "
        f"(references for speedups: {', '.join(REFERENCE_PROVIDERS)})"
    )


def select_setups(ops: Optional[list], models: Optional[list]) -> tuple[dict[str, Setup], Optional[list]]:
    """The setups that ``--ops`` and ``--models`` name (all when neither is given), and the model
    names that narrow the model setups' shapes (None: every model). ``--models`` takes a model setup
    ("vit") or a model's name ("ViT-B/16", any shape name of a model setup); unknown names raise
    ``KeyError`` listing the known ones."""
    if ops is None and models is None:
        return discover(), None
    everything = discover()
    chosen = dict(discover(ops)) if ops is not None else {}
    names: list = []
    if models is not None:
        model_setups = {n: s for n, s in everything.items() if s.kind == "model"}
        known_names = {
            str(shape.get("name")): n
            for n, s in model_setups.items()
            for shape in list(s.gpu_shapes) + list(s.cpu_shapes)
            if shape.get("name")
        }
        unknown = [m for m in models if m not in model_setups and m not in known_names and m != "all"]
        if unknown:
            raise KeyError(f"unknown model(s) {unknown}; known: {list(model_setups) + sorted(known_names)}")
        for m in models:
            if m == "all":
                chosen.update(model_setups)
            elif m in model_setups:
                chosen[m] = model_setups[m]
            else:
                chosen[known_names[m]] = model_setups[known_names[m]]
                names.append(m)
    ordered = {n: s for n, s in everything.items() if n in chosen}
    return ordered, (names or None)


def _parse_batch(value: Optional[str]):
    if value is None:
        return None
    values = [int(v) for v in _split(value)]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--batch needs positive integers, got {value!r}")
    return values[0] if len(values) == 1 else values


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    wall_start = time.perf_counter()
    try:
        setups, model_names = select_setups(_split(args.ops), _split(args.models))
        batch = _parse_batch(args.batch)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        _list(setups)
        return 0
    providers = _split(args.providers) or list(ALL_PROVIDERS)
    bad = [p for p in providers if p not in ALL_PROVIDERS]
    modes = _split(args.modes) or list(ALL_MODES)
    bad_modes = [m for m in modes if m not in ALL_MODES]
    if bad or bad_modes:
        print(
            f"error: unknown providers {bad} / modes {bad_modes}; providers: {ALL_PROVIDERS}, modes: {ALL_MODES}",
            file=sys.stderr,
        )
        return 2

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (25.0 if on_gpu else 20.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (100.0 if on_gpu else 150.0) * (0.5 if args.quick else 1.0)
    config = RunConfig(
        ops=list(setups),
        model_ops=[n for n, s in setups.items() if s.kind == "model"],
        providers=providers,
        modes=modes,
        dtype=dtype_name,
        device=device.type,
        quick=args.quick,
        batch=batch,
        models=model_names if on_gpu else None,
        flush_l2=on_gpu and not args.no_flush_l2,
        rotate=args.rotate,
        cuda_graphs=on_gpu and args.cuda_graphs,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        compile_on_cpu=args.compile_on_cpu,
        budget_s=args.budget_s,
        check=not args.no_check,
    )

    if args.threads is not None or not on_gpu:
        torch.set_num_threads(max(1, args.threads or 1))
    if not on_gpu:
        print(CPU_BANNER, flush=True)
        if model_names:
            print(f"(--models {','.join(model_names)}: on the CPU the model setups run their tiny config)", flush=True)
        if args.cuda_graphs:
            print("(--cuda-graphs: no effect on the CPU)", flush=True)
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print(
                "TRITON_INTERPRET=1: the vitkern and vitkern-triton providers run Triton's interpreter where a kernel "
                "exists (a correctness check; 2 timed calls whose times mean nothing).",
                flush=True,
            )
    env = environment(device)
    if env["vitkern_import_error"]:
        print(
            f"warning: import vitkern failed ({env['vitkern_import_error']}); vitkern providers will be error rows",
            file=sys.stderr,
        )
    out_dir = Path(args.out) if args.out else default_out_dir(device, env["device_name"])
    out_dir.mkdir(parents=True, exist_ok=True)
    ceilings = None
    if on_gpu and not args.no_ceilings:
        if not args.quiet:
            log("measuring ceilings: GEMM and device-to-device copy ...")
        try:
            ceilings = measure_ceilings(device, DTYPES[dtype_name])
        except Exception as exc:
            log(f"warning: the ceiling measurement failed ({short_error(exc)}); pct_of_ceiling will be null")
        else:
            print(
                f"ceilings: GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s ({dtype_name}), "
                f"copy {ceilings['copy_gbps']:.0f} GB/s",
                flush=True,
            )

    doc = {
        "schema_version": SCHEMA_VERSION,
        "environment": env,
        "config": asdict(config),
        "ceilings": ceilings,
        "rows": [],
        "wall_s": 0.0,
        "complete": False,
    }
    results_path = out_dir / "results.json"

    def progress(rows):
        doc["rows"] = rows
        doc["wall_s"] = round(time.perf_counter() - wall_start, 2)
        write_json(results_path, doc)

    rows = run(setups, config, ceilings=ceilings, on_progress=progress, verbose=not args.quiet)
    doc["rows"] = rows
    doc["wall_s"] = round(time.perf_counter() - wall_start, 2)
    doc["complete"] = not any(r["status"] == "skipped" and (r["note"] or "").startswith("time budget") for r in rows)
    write_json(results_path, doc)
    plots: list = []
    if not args.no_plots:
        try:
            from benchmarks.plot import write_plots

            plots = write_plots(json.loads(results_path.read_text()), out_dir, log=None if args.quiet else log)
        except Exception as exc:  # a plotting problem must not lose the run
            log(f"warning: writing the plots failed ({short_error(exc)})")
    (out_dir / "summary.md").write_text(render_markdown(doc, [p.name for p in plots]))
    schema_problem = None
    try:
        validate_results(json.loads(results_path.read_text()))
    except SchemaError as exc:
        schema_problem = str(exc)
        print(f"error: results.json does not follow the schema: {exc}", file=sys.stderr)

    print_table(rows)
    if on_gpu:
        print("\nHeadline (vitkern vs the fastest reference; summary.md has it as Markdown):", flush=True)
        print(render_headline(doc), flush=True)
    errors = [r for r in rows if r["status"] == "error"]
    mismatches = [r for r in rows if r["err_ok"] is False]
    ok = sum(r["status"] == "ok" for r in rows)
    print(
        f"{ok} ok, {sum(r['status'] == 'skipped' for r in rows)} skipped, {len(errors)} errors, "
        f"{len(mismatches)} outside tolerance; {doc['wall_s']:.1f} s. Wrote {results_path}, {out_dir / 'summary.md'}"
        + (f" and {len(plots)} plot(s)" if plots else ""),
        flush=True,
    )
    third_party = [r for r in errors + mismatches if r["provider"] in ATTENTION_PROVIDERS]
    if third_party:
        print(
            f"({len(third_party)} of those are third-party attention references (SDPA backends, flash-attn, xformers): "
            "reported, but they do not fail the run)",
            flush=True,
        )
    if not on_gpu:
        print(
            "Kernel timings need a GPU: run `python -m benchmarks` (or scripts/gpu_check.sh) on a CUDA machine.",
            flush=True,
        )
    failing = [r for r in errors + mismatches if r["provider"] not in ATTENTION_PROVIDERS]
    return 1 if failing or schema_problem else 0
