"""The providers: what runs for each (case, provider, mode), and how its result is compared.

- ``vitkern`` (the public function, backend "auto"), ``vitkern-triton`` (``use_backend("triton")``),
  ``vitkern-cuda`` (``use_backend("cuda")``: the CUDA extension's ops; skipped for ops it does not
  implement, and with the ``BackendUnavailableError`` reason when the extension is missing),
  ``vitkern-torch`` (``use_backend("torch")``: PyTorch's own fast path through vitkern's ops),
  ``vitkern-reference`` (``use_backend("reference")``). The "vitkern" rows record what "auto"
  chose for each op and shape class its first call met (``auto_choices``, :func:`auto_choices`);
- ``torch`` (the plain PyTorch function or the timm module: timm's ``Mlp``, ``PatchEmbed``,
  ``VisionTransformer``; the row's note names it) and ``torch.compile`` (of that same reference;
  GPU only unless ``compile_on_cpu``);
- the references a setup adds through ``Case.references``: ``torchvision`` (models), and for the
  attention setups ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math`` (SDPA held to
  one backend by ``sdpa_kernel``), ``flash-attn`` and ``xformers`` (when installed).

A provider that cannot serve a call raises :class:`benchmarks.setups.Unavailable` (or vitkern's
``BackendUnavailableError``): the runner makes it a "skipped" row with the reason.

Modes: ``fwd`` (forward under ``torch.no_grad()``), ``fwd+bwd`` (forward, then
``torch.autograd.grad`` of every output against every input that requires a gradient) and, for the
model setups, ``train`` (one training step as ``Case.train_step`` defines it).

Correctness: each provider's outputs (fwd), gradients (fwd+bwd) or step results (train: the loss
and a gradient) are compared with the ``torch`` provider's (:func:`reference_result`), computed in
the same run and dtype: ``max_abs_err``, and ``err_ok`` against a dtype tolerance scaled by the
reference's magnitude (:func:`check_result`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from benchmarks.cases import ALL_PROVIDERS, EXTRA_PROVIDERS
from benchmarks.flops import ALL_MODES, TRAIN_MODE
from benchmarks.results import join_notes
from benchmarks.setups import Case, Unavailable

_VITKERN_BACKENDS = {
    "vitkern": "auto", "vitkern-triton": "triton", "vitkern-cuda": "cuda", "vitkern-torch": "torch",
    "vitkern-reference": "reference",
}
# err_ok: max_abs_err <= tol * max(1, max |reference|)
_TOLERANCE = {"bf16": 4e-2, "fp16": 1e-2, "fp32": 2e-3}


class ProviderSkipped(Unavailable):
    """A provider that does not apply here (e.g. torch.compile on the CPU); the message says why.

    The runner treats its base class :class:`benchmarks.setups.Unavailable`, raised while preparing
    or by the first call (an SDPA backend that refuses a shape), the same way: a "skipped" row."""


_VITKERN: dict = {}


def load_vitkern() -> tuple[Optional[ModuleType], Optional[str]]:
    """``(vitkern, None)``, or ``(None, reason)`` when it cannot be imported (cached)."""
    if "module" not in _VITKERN:
        try:
            import vitkern

            _VITKERN["module"], _VITKERN["error"] = vitkern, None
        except Exception as exc:  # a broken install must not stop the torch baselines
            _VITKERN["module"], _VITKERN["error"] = None, f"{type(exc).__name__}: {exc}"
    return _VITKERN["module"], _VITKERN["error"]


def is_backend_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is vitkern's ``BackendUnavailableError`` (by name too: the import may have failed)."""
    vk = _VITKERN.get("module")
    cls = getattr(vk, "BackendUnavailableError", None)
    if cls is not None and isinstance(exc, cls):
        return True
    return type(exc).__name__ == "BackendUnavailableError"


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@dataclass
class Prepared:
    """One provider's zero-argument call for one case and mode, and the context it runs in.

    ``call_with(args)`` runs the same on other copies of the case's inputs (rotating buffers: see
    :func:`input_pool`); ``args`` are the case's own."""

    call: Callable[[], Any]
    context: Callable[[], ContextManager]
    note: Optional[str] = None
    call_with: Optional[Callable[[tuple], Any]] = None
    args: tuple = ()


def _grad_call(fn, args, leaves, grad_outputs):
    def call():
        pairs = [(o, g) for o, g in zip(_tensors(fn(*args)), grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)

    return call


def _grad_call_with(fn, args0, leaves, grad_outputs):
    """``call_with(args)``: forward and ``autograd.grad`` for a copy of ``args0``; a leaf that is one
    of ``args0`` is replaced by the copy's tensor at that position (other leaves, such as module
    parameters, are shared)."""
    position = {id(a): i for i, a in enumerate(args0) if isinstance(a, torch.Tensor)}
    slots = [position.get(id(leaf)) for leaf in leaves]
    grad_outputs = list(grad_outputs)

    def call_with(args):
        these = [leaf if i is None else args[i] for leaf, i in zip(leaves, slots)]
        pairs = [(o, g) for o, g in zip(_tensors(fn(*args)), grad_outputs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], these, [g for _, g in pairs], allow_unused=True)

    return call_with


def reference_result(case: Case, mode: str):
    """The torch provider's result for ``mode`` (outputs for "fwd", input gradients for "fwd+bwd",
    the step's result for "train") and the output gradients that every provider's backward uses:
    ``(result, grad_outputs)``."""
    if mode == TRAIN_MODE:
        if case.train_step is None:
            raise ValueError("this case has no training step (Case.train_step)")
        out = case.train_step("torch", _unchanged)(*case.args)
        return [t.detach() if t is not None else None for t in _flat(out)], []
    with torch.no_grad():
        outs = _tensors(case.torch_fn(*case.args))
    gen = torch.Generator(device=outs[0].device).manual_seed(1234) if outs else None
    grad_outputs = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outs]
    if mode == "fwd":
        return [o.detach() for o in outs], grad_outputs
    grads = _grad_call(case.torch_fn, case.args, case.grad_inputs, grad_outputs)()
    return [g.detach() if g is not None else None for g in grads], grad_outputs


def prepare(
    case: Case,
    provider: str,
    mode: str,
    device: torch.device,
    grad_outputs: Sequence[torch.Tensor] = (),
    *,
    compile_on_cpu: bool = False,
    op: Optional[str] = None,
    whole_model: bool = False,
) -> Prepared:
    """The callable that runs ``provider`` on ``case`` in ``mode``.

    ``op`` (the setup's name) lets the note of the "vitkern" provider say when "auto" can only
    reach the reference on a GPU because no kernel backend is registered for the op, and lets
    "vitkern-cuda" skip the ops the CUDA extension does not implement; ``whole_model`` (a model setup,
    whose network uses several ops) turns that skip off.

    Raises :class:`ProviderSkipped` when the provider does not apply; other exceptions (a failed
    vitkern import) propagate.
    """
    if provider not in ALL_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {ALL_PROVIDERS}")
    if mode not in ALL_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {ALL_MODES}")
    if mode == TRAIN_MODE and case.train_step is None:
        raise ProviderSkipped("this case has no training step")
    note = None
    backend_ctx: Callable[[], ContextManager] = contextlib.nullcontext
    model, wrap = provider, _unchanged  # (train mode) whose training step, and how its forward is wrapped
    if provider == "vitkern-cuda":
        if device.type != "cuda":
            raise ProviderSkipped("the CUDA extension runs on CUDA tensors only (this is a CPU run)")
        vk, _ = load_vitkern()
        cuda_ops = tuple(getattr(getattr(vk, "_backend", None), "CUDA_EXTENSION_OPS", ()) or ())
        if vk is not None and op is not None and not whole_model and op not in cuda_ops:
            raise ProviderSkipped(
                f"the CUDA extension has no {op} kernel (it implements {', '.join(sorted(cuda_ops)) or 'none'}); "
                "use_backend('cuda') would run 'auto' here"
            )
    if provider == "torch":
        fn = case.torch_fn
        note = case.torch_label
    elif provider == "torch.compile":
        if device.type != "cuda" and not compile_on_cpu:
            raise ProviderSkipped(
                "torch.compile runs on GPU only by default (a CPU compile costs ~20 s; --compile-on-cpu)"
            )
        import torch._dynamo as dynamo  # (not "import torch._dynamo": that would make torch a local name here)

        dynamo.reset()  # a fresh compile per case: no recompile limit, no automatic dynamic shapes
        model, wrap = "torch", lambda f: torch.compile(f, dynamic=False)
        fn = wrap(case.torch_fn) if mode != TRAIN_MODE else None
        note = f"torch.compile({case.torch_label})"
    elif provider in EXTRA_PROVIDERS:
        ref = case.references.get(provider)
        if ref is None or ref.fn is None:
            raise ProviderSkipped(ref.label if ref is not None else f"no {provider} reference for this case")
        fn, note = ref.fn, ref.label
    else:
        vk, err = load_vitkern()
        if vk is None:
            raise RuntimeError(f"import vitkern failed: {err}")
        fn = case.vitkern_fn(vk)
        model = "vitkern"
        backend = _VITKERN_BACKENDS[provider]
        backend_ctx = lambda: vk.use_backend(backend)  # noqa: E731 (use_backend switches on construction)
        if device.type == "cpu" and provider != "vitkern-reference":
            from vitkern._backend import triton_interpreting

            if triton_interpreting():
                note = "Triton interpreter (TRITON_INTERPRET=1): checks correctness, the time means nothing"
            elif provider == "vitkern":
                note = "auto -> reference on the CPU"
        elif provider == "vitkern" and op is not None:
            try:
                registered = tuple(vk._backend.registered_backends(op))
            except Exception:
                registered = ()
            if registered and not any(b in registered for b in ("triton", "cuda", "torch")):
                note = "auto -> reference: no kernel backend registered for this op"

    args = tuple(case.args)
    if mode == TRAIN_MODE:
        step = case.train_step(model, wrap)
        call_with = lambda a: step(*a)  # noqa: E731
        context = backend_ctx
    elif mode == "fwd":
        call_with = lambda a: fn(*a)  # noqa: E731

        def context():
            stack = contextlib.ExitStack()
            stack.enter_context(torch.no_grad())
            stack.enter_context(backend_ctx())
            return stack

    else:
        call_with = _grad_call_with(fn, args, list(case.grad_inputs), list(grad_outputs))
        context = backend_ctx
    return Prepared(call=lambda: call_with(args), context=context, note=note, call_with=call_with, args=args)


@contextlib.contextmanager
def auto_choices(provider: str):
    """Around a provider's first call: yields a list that, for the "vitkern" (auto) provider, is
    filled on exit with what "auto" chose for each op and shape class the call met (the row's
    ``auto_choices``); None for every other provider."""
    vk, _ = load_vitkern() if provider == "vitkern" else (None, None)
    tuning = getattr(vk, "_tuning", None)
    if tuning is None:
        yield None
        return
    choices: list[dict] = []
    with tuning.recording() as record:
        yield choices
    for c in record.values():
        choices.append({
            "op": c.op, "shape_class": c.key, "backend": c.backend, "source": c.source,
            "times_ms": {b: (t if math.isfinite(t) else None) for b, t in c.times_ms.items()},
        })


def _unchanged(fn):
    return fn


def _flat(out) -> list:
    """Tensors (and None placeholders, e.g. unused gradients) of a nested output, in order."""
    if out is None or isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _max_abs_err(result, reference) -> tuple[Optional[float], float]:
    """(max |result - reference| over all tensors, max |reference|); None when they do not match up."""
    got, want = _flat(result), _flat(reference)
    if len(got) != len(want):
        return None, 0.0
    err, scale = 0.0, 0.0
    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        if g is None or w is None:
            return None, 0.0
        if tuple(g.shape) != tuple(w.shape):
            return None, 0.0
        diff = (g.detach().float() - w.float()).abs()
        d = float(diff.max()) if diff.numel() else 0.0
        err = math.inf if not math.isfinite(d) else max(err, d)  # (max() would drop a NaN)
        scale = max(scale, float(w.float().abs().max()) if w.numel() else 0.0)
    return err, scale


def check_result(row: dict, result, reference, dtype_name: str) -> None:
    """Fill ``row``'s ``max_abs_err`` and ``err_ok`` (or a note saying why they cannot be compared)."""
    err, scale = _max_abs_err(result, reference)
    if err is None:
        row["err_ok"] = False
        row["note"] = join_notes(row["note"], "outputs do not match the reference's count/shapes")
    elif not math.isfinite(err):
        row["err_ok"] = False
        row["note"] = join_notes(row["note"], "non-finite values (NaN/inf) where the reference is finite")
    else:
        row["max_abs_err"] = err
        row["err_ok"] = bool(err <= _TOLERANCE[dtype_name] * max(1.0, scale))
