"""Installing a fast method on a module instance, and taking it off again.

A patch never replaces a module or a parameter: it sets an instance attribute (``forward``, or a
model method such as torchvision's ``_process_input``) that shadows the class's method, and records
what it shadowed, so :func:`uninstall` restores the module exactly. Parameters, buffers,
``state_dict()`` keys and values, hooks and optimizer state are untouched; ``model.to(...)``, DDP and
FSDP2 wrapping after patching see the same parameters the patched methods read at call time.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Iterable, Optional

from torch import nn

__all__ = ["PatchReport", "install", "is_patched", "uninstall", "uninstall_all"]

# Instance attributes a patch adds (plain attributes: never parameters, buffers or state_dict keys).
_RECORD = "_vitkern_patch"  # {method name: the instance attribute it shadowed, or None}
_EXTRA = "_vitkern_patch_extra"  # names of the plain attributes the patch added


@dataclasses.dataclass
class PatchEntry:
    name: str  # the module's qualified name in the model ("" for the model itself)
    kind: str  # the module's class, e.g. "timm Attention"
    patched: bool
    detail: str  # what runs now, or why it was left alone


class PatchReport:
    """What :func:`vitkern.patch_model` did: each module it patched (and what now runs) and each
    one it recognised but left alone (and why). ``str()`` renders a short table."""

    def __init__(self, entries: Iterable[PatchEntry] = ()):
        self.entries: list[PatchEntry] = list(entries)

    @property
    def patched(self) -> list[PatchEntry]:
        return [e for e in self.entries if e.patched]

    @property
    def skipped(self) -> list[PatchEntry]:
        return [e for e in self.entries if not e.patched]

    def add(self, name: str, kind: str, patched: bool, detail: str) -> None:
        self.entries.append(PatchEntry(name, kind, patched, detail))

    def summary(self) -> dict[str, tuple[int, int]]:
        """Per module kind: (patched, left alone)."""
        out: dict[str, tuple[int, int]] = {}
        for e in self.entries:
            p, s = out.get(e.kind, (0, 0))
            out[e.kind] = (p + e.patched, s + (not e.patched))
        return out

    def __len__(self) -> int:
        return len(self.patched)

    def __str__(self) -> str:
        rows = [("module kind", "patched", "left alone", "what runs / why")]
        for kind, (p, s) in self.summary().items():
            details = sorted({e.detail for e in self.entries if e.kind == kind})
            rows.append((kind, str(p), str(s), "; ".join(details)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 15)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchReport({len(self.patched)} patched, {len(self.skipped)} left alone)"


def is_patched(module: nn.Module, method: str = "forward") -> bool:
    return method in module.__dict__.get(_RECORD, {})


def install(module: nn.Module, method: str, fn: Callable, extra: Optional[dict] = None) -> None:
    """Bind ``fn`` as ``module.<method>`` on this instance (and set the plain attributes
    ``extra``), remembering what the instance had before."""
    record = module.__dict__.setdefault(_RECORD, {})
    if method in record:
        raise RuntimeError(f"{type(module).__name__}.{method} is already patched")
    record[method] = module.__dict__.get(method)
    added = module.__dict__.setdefault(_EXTRA, [])
    for key, value in (extra or {}).items():
        if key in module.__dict__ or hasattr(type(module), key) or key in module._modules or key in module._parameters:
            raise RuntimeError(f"{type(module).__name__} already has an attribute {key!r}")
        module.__dict__[key] = value
        added.append(key)
    module.__dict__[method] = types.MethodType(fn, module)


def uninstall(module: nn.Module) -> bool:
    """Restore every method a patch shadowed on this instance; False when it had none."""
    record = module.__dict__.pop(_RECORD, None)
    if not record:
        return False
    for method, previous in record.items():
        if previous is None:
            module.__dict__.pop(method, None)
        else:
            module.__dict__[method] = previous
    for key in module.__dict__.pop(_EXTRA, []):
        module.__dict__.pop(key, None)
    return True


def uninstall_all(model: nn.Module) -> int:
    """Undo every patch in ``model``; returns how many modules were restored."""
    return sum(uninstall(m) for m in model.modules())
