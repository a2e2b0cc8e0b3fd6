"""Static GPU compile check: every registered kernel config compiles for sm_80 and sm_90, no GPU.

For each module, the registered :func:`compile_cases` run under :func:`capture` for each
arch family; every captured launch (expanded over
the kernel's autotuning configs for that arch) becomes Triton's own
``ASTSource(fn, signature, constexprs, attrs)``: the signature and specialisation come from the
captured arguments through the binder that ``JITFunction.run`` uses
(``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args``), so the
check compiles what the launcher launches: pointer dtypes, int widths, 16-byte pointer alignment,
ints divisible by 16 and ints equal to 1 (which become constexprs), exactly as at run time.
As a cross-check, each launch is also handed to ``JITFunction.run`` itself (with a stand-in driver
reporting the target arch, stopped just before it compiles): a specialisation that differs from
the JIT's is a problem; the row's ``jit_check`` says "same", or "unavailable: ..." where this
Triton's internals do not allow the cross-check.
``triton.compile(src, target=GPUTarget("cuda", arch, 32))`` then builds PTX and cubin with the
ptxas that ships with Triton; no GPU or CUDA driver is needed.

Each distinct (kernel, specialisation, options, arch) compiles once, in a pool of worker
processes, with Triton's cache kept between runs (``TRITON_CACHE_DIR``, else the repository's
git-ignored ``.triton-cache/``). Per compiled kernel the check records registers, spill bytes
(from ``ptxas -v``: "N bytes spill stores"; cuobjdump's LOCAL field stays 0 when ptxas spills),
dynamic shared memory (``compiled.metadata.shared``) and the MMA instruction in the PTX, and
flags: compile errors, any spill, shared memory over the arch limit (227 KB sm_90, 163 KB sm_80),
and a missing wgmma (sm_90) / mma.sync (sm_80) where the kernel's ``expects_wgmma`` rule says
its dots must run on tensor cores.

The compile runs in a subprocess without ``TRITON_INTERPRET``: under the interpreter
``@triton.jit`` returns ``InterpretedFunction`` objects, which ``triton.compile`` rejects
("'InterpretedFunction' object has no attribute 'cache_key'"; a JITFunction rebuilt from one
fails on its callees: "Unsupported function referenced: <...InterpretedFunction ...>"), and
``dot_operand`` must compile its GPU branch.

Command line (gpu_check runs this)::

    python -m vitkern.testing.compile_check [--full] [--archs 80,90] [--json out.json] [MODULE ...]

prints one row per compiled kernel and exits 1 when a row has a problem. A MODULE that is a
package (``vitkern.ops.attention``) stands for every module in it. From Python,
:func:`run_compile_check` returns the rows (dicts) and works from any process, the test process
with ``TRITON_INTERPRET=1`` included.

Files: ``cases.py`` (the ``@compile_cases`` registry and the capture of launches), ``plan.py``
(captured launches to distinct compile jobs, specialised as the JIT would), ``compiler.py``
(compiling the jobs in a process pool; ptxas statistics), ``report.py`` (evaluating and
formatting rows), ``runner.py`` (the subprocess entry point and the command line).
"""

from vitkern.testing.compile_check.cases import (
    CapturedLaunch,
    CasesEntry,
    capture,
    compile_cases,
    registered_cases,
    run_cases,
)
from vitkern.testing.compile_check.report import (
    SHARED_LIMITS,
    CheckReport,
    blocks_per_sm,
    evaluate,
    format_rows,
    parse_ptxas_log,
)
from vitkern.testing.compile_check.runner import default_workers, expand_modules, main, ops_modules, run_compile_check

__all__ = [
    "SHARED_LIMITS",
    "blocks_per_sm",
    "CapturedLaunch",
    "CasesEntry",
    "CheckReport",
    "capture",
    "compile_cases",
    "default_workers",
    "evaluate",
    "expand_modules",
    "format_rows",
    "main",
    "ops_modules",
    "parse_ptxas_log",
    "registered_cases",
    "run_cases",
    "run_compile_check",
]
