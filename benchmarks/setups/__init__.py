"""Benchmark setups: one small module per op, discovered by :func:`discover`.

A setup module defines ``SETUP`` (or ``SETUPS``, a sequence) of type :class:`Setup`: the op's name,
its shapes (a GPU sweep of real ViT shapes and tiny CPU shapes), and ``build(shape, dtype, device)``
returning a :class:`Case`: the inputs, the plain-PyTorch reference, the vitkern call and the op's
FLOP/byte :class:`~benchmarks.flops.Cost`. The runner turns one case into every provider
("vitkern", "vitkern-triton", "vitkern-cuda", "vitkern-reference", "torch", "torch.compile", and
the case's own ``references``) and mode ("fwd", "fwd+bwd"). Adding an op to the suite means adding
one such module here; nothing else changes. Modules whose name starts with an underscore hold
shared helpers (``_attention_refs``: the SDPA-backend, flash-attn and xformers references).

Rules for ``build``:

- ``torch_fn(*args)`` and ``vitkern_fn(vitkern)(*args)`` take the same positional ``args``; anything
  else (weights of a timm module, eps, flags) is captured in the closures, so the weights are
  shared and the two compute the same thing. ``torch_fn`` must be traceable by ``torch.compile``.
- Every tensor in ``grad_inputs`` is a leaf with ``requires_grad=True``; the runner times forward
  under ``torch.no_grad()`` and ``fwd+bwd`` as forward plus ``torch.autograd.grad`` of all outputs
  with respect to ``grad_inputs`` (so nothing accumulates between repetitions).
- Inputs are random with a fixed seed (the runner seeds before ``build``), scaled like a ViT's
  activations so that bf16 is meaningful.

Model-level setups (a whole network rather than one op) use two more things:

- ``Case.references``: other reference implementations beside ``torch_fn``, each run as a provider
  of its own name (e.g. "torchvision"; the attention setups use it too, for "sdpa-*",
  "flash-attn" and "xformers"); a :class:`Reference` without ``fn`` becomes a "skipped" row whose
  note says why (the library has no such config, or is not installed). A reference's ``fn`` may
  raise :class:`Unavailable` on its first call (a backend that refuses the shape): a "skipped" row
  too. Setups without such references get no rows for them.
- ``Setup.kind = "model"`` marks a whole-network setup (the CLI's ``--models`` selects those).
- the "train" mode (``Setup.modes`` lists it): ``Case.train_step(model, wrap)`` returns a callable
  of ``args`` that runs one training step (forward, loss, backward, optimizer step) of ``model``
  ("torch" for ``torch_fn``'s model, "vitkern", or a reference's name), with its forward passed
  through ``wrap`` (``torch.compile`` for the torch.compile provider, otherwise unchanged). It
  returns what the providers' results are compared on (the loss, a gradient). ``Setup.modes_for``
  says which modes a shape runs, e.g. training only at a model's training batch.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from benchmarks.flops import MODES, Cost

__all__ = ["Case", "Reference", "Setup", "Unavailable", "discover", "randn", "shape_label"]

ShapeParams = Mapping[str, Any]


class Unavailable(Exception):
    """A provider that cannot serve this case here (a missing library, a backend that refuses the
    shape or dtype). Raised while preparing or by the first call; the runner turns it into a
    "skipped" row whose note is the message."""


@dataclass
class Reference:
    """Another reference implementation of a case, run as the provider of that name."""

    fn: Optional[Callable[..., Any]]  # a callable of the case's args, like torch_fn; None: not available
    label: str  # the row's note: what runs, or why nothing does


@dataclass
class Case:
    """One op at one shape, dtype and device, ready to be run by every provider."""

    args: tuple
    torch_fn: Callable[..., Any]
    vitkern_fn: Callable[[ModuleType], Callable[..., Any]]
    cost: Cost
    grad_inputs: tuple = ()
    torch_label: str = "torch"
    items: Optional[int] = None  # images per call, for items/s (model-level setups)
    references: Mapping[str, Reference] = field(default_factory=dict)  # model-level setups
    train_step: Optional[Callable[[str, Callable[[Callable], Callable]], Callable[..., Any]]] = None  # "train" mode


@dataclass(frozen=True)
class Setup:
    """An op's benchmark: its shapes and how to build a :class:`Case` at one of them."""

    name: str
    description: str
    build: Callable[[ShapeParams, torch.dtype, torch.device], Case]
    gpu_shapes: Sequence[ShapeParams]
    cpu_shapes: Sequence[ShapeParams]
    modes: Sequence[str] = MODES
    order: int = 100  # position in the default run and the report
    formula: str = ""  # one line: which benchmarks.flops function counts it, and how
    modes_for: Optional[Callable[[ShapeParams], Sequence[str]]] = None  # a shape's modes (default: all)
    kind: str = "op"  # "op", or "model" for a whole network (selected by the CLI's --models)
    providers: Optional[Sequence[str]] = None  # the providers it runs (default: every one the run asks for)

    def shape_modes(self, shape: ShapeParams) -> list[str]:
        """The modes ``shape`` runs in: ``modes``, narrowed by ``modes_for`` when given."""
        if self.modes_for is None:
            return list(self.modes)
        allowed = set(self.modes_for(shape))
        return [m for m in self.modes if m in allowed]

    def shapes(
        self,
        device_type: str,
        *,
        quick: bool = False,
        batch: Union[int, Sequence[int], None] = None,
        names: Optional[Sequence[str]] = None,
    ) -> list[dict]:
        """The shapes to run: the GPU sweep (its first entry only with ``quick``) or the CPU shapes.

        ``batch`` (an int, or a sequence for a sweep) replaces every shape's batch: each shape runs
        once per value. ``names`` keeps only the shapes whose ``name`` is listed (the CLI's
        ``--models ViT-B/16``), before ``quick`` picks the first.
        """
        shapes = list(self.gpu_shapes if device_type == "cuda" else self.cpu_shapes)
        if names is not None:
            shapes = [s for s in shapes if s.get("name") in names]
        if quick:
            shapes = shapes[:1]
        batches = [None] if batch is None else [batch] if isinstance(batch, int) else list(batch)
        out = []
        for s in shapes:
            for b in batches:
                s2 = dict(s)
                if b is not None and "batch" in s2:
                    s2["batch"] = int(b)
                if s2 not in out:  # shapes that differed only in their batch
                    out.append(s2)
        return out


def randn(
    shape, dtype: torch.dtype, device, *, scale: float = 1.0, shift: float = 0.0, requires_grad: bool = False
) -> torch.Tensor:
    """A random leaf tensor ``shift + scale * N(0, 1)`` created in fp32 and cast once."""
    t = torch.randn(shape, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    if shift != 0.0:
        t.add_(shift)
    return t.to(dtype).requires_grad_(requires_grad)


_LABEL_KEYS = {
    "batch": "B", "tokens": "T", "dim": "D", "heads": "H", "head_dim": "d", "hidden": "hid",
    "in_features": "K", "out_features": "N", "img_size": "img", "patch": "P", "in_chans": "C",
    "prefix": "pre", "activation": "act",
}


def shape_label(shape: ShapeParams) -> str:
    """A compact label: ``"ViT-B/16 B=128 T=197 D=768"``."""
    parts = []
    name = shape.get("name")
    if name:
        parts.append(str(name))
    for key, value in shape.items():
        if key == "name":
            continue
        if isinstance(value, bool):
            if value:
                parts.append(key)
            continue
        if value is None:
            continue
        parts.append(f"{_LABEL_KEYS.get(key, key)}={value}")
    return " ".join(parts)


def discover(names: Optional[Sequence[str]] = None) -> dict[str, Setup]:
    """Every setup in this package, in report order (``Setup.order``, then name).

    Modules whose name starts with an underscore are skipped. ``names`` filters (unknown names
    raise ``KeyError`` listing the known ones).
    """
    found: dict[str, Setup] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        items = list(getattr(module, "SETUPS", ()))
        if hasattr(module, "SETUP"):
            items.append(module.SETUP)
        for setup in items:
            if not isinstance(setup, Setup):
                raise TypeError(
                    f"{module.__name__}: SETUP(S) must hold benchmarks.setups.Setup objects, "
                    f"got {type(setup).__name__}"
                )
            if setup.name in found:
                raise ValueError(f"duplicate benchmark setup name {setup.name!r} (in {module.__name__})")
            found[setup.name] = setup
    ordered = dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))
    if names is None:
        return ordered
    unknown = [n for n in names if n not in ordered]
    if unknown:
        raise KeyError(f"unknown op(s) {unknown}; known: {list(ordered)}")
    return {n: ordered[n] for n in names}
