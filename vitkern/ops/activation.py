"""The activations the fused epilogues compute, as one enum shared by every layer.

The integer values are the ids the Triton epilogues (``ACTIVATION`` / ``ACT_GRAD`` constexprs,
:mod:`vitkern.ops.gemm`) and the CUDA extension (``csrc/dense_epilogue.h``: ``ActCode``) take.
"gelu" is the erf GELU (``torch.nn.GELU()``, timm's and torchvision's default), "gelu_tanh" the
tanh approximation (``jax.nn.gelu``'s default, Hugging Face "gelu_new" / "gelu_pytorch_tanh"),
"quick_gelu" OpenAI CLIP's ``x * sigmoid(1.702 x)`` (timm's ``QuickGELU``, Hugging Face
"quick_gelu"); see docs/design.md, "Numerics".

Two parsers: :meth:`Activation.parse` for the ops' ``activation=`` argument (None or a public
name, nothing else), :meth:`Activation.resolve` for the modules' specs (names with the Hugging Face
aliases, ``nn.GELU`` classes / instances / partials, timm's GELU classes, ``F.gelu``).
"""

from __future__ import annotations

import enum
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Activation", "QuickGELU", "QUICK_GELU_ALPHA"]

# Lower-cased names (Hugging Face's included) -> the public name.
_ALIASES: dict[str, Optional[str]] = {
    "none": None,
    "identity": None,
    "linear": None,
    "gelu": "gelu",
    "gelu_erf": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",  # Hugging Face names of the tanh approximation
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",  # OpenAI CLIP: x * sigmoid(1.702 x)
    "quickgelu": "quick_gelu",
}

# The sigmoid's slope in QuickGELU, x * sigmoid(QUICK_GELU_ALPHA * x) (OpenAI CLIP's constant).
QUICK_GELU_ALPHA = 1.702


class Activation(enum.IntEnum):
    """An epilogue activation; the value is the id the kernels and the extension take."""

    NONE = 0
    GELU = 1  # erf
    GELU_TANH = 2
    QUICK_GELU = 3  # x * sigmoid(1.702 x)

    @property
    def public_name(self) -> Optional[str]:
        """The name the public ``activation=`` arguments take: None, "gelu", "gelu_tanh" or
        "quick_gelu"."""
        return _PUBLIC_NAMES[self]

    @property
    def approximate(self) -> Optional[str]:
        """``F.gelu``'s ``approximate`` argument ("none" / "tanh"); None for the identity and
        QuickGELU (not an ``F.gelu``)."""
        return _APPROXIMATE[self]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The activation in PyTorch, in ``x``'s dtype."""
        if self is Activation.NONE:
            return x
        if self is Activation.QUICK_GELU:
            return x * torch.sigmoid(QUICK_GELU_ALPHA * x)
        return F.gelu(x, approximate=self.approximate)

    @classmethod
    def parse(cls, spec) -> "Activation":
        """The activation of a public ``activation=`` argument: None, "gelu", "gelu_tanh" or
        "quick_gelu"."""
        if spec is not None and not isinstance(spec, str):
            raise TypeError(f"activation must be None or a string, got {type(spec).__name__}")
        for act in cls:
            if act.public_name == spec:
                return act
        names = ", ".join(repr(a.public_name) for a in cls)
        raise ValueError(f"activation must be one of ({names}), got {spec!r}")

    @classmethod
    def resolve(cls, spec) -> "Activation":
        """The activation of a module's spec (see :func:`vitkern.nn.resolve_activation`).

        Accepts None, a name ("gelu", "gelu_tanh", and the Hugging Face names "gelu_new",
        "gelu_pytorch_tanh"), ``nn.GELU`` (class or instance, ``approximate="tanh"`` honoured),
        ``functools.partial(nn.GELU, approximate="tanh")``, ``nn.Identity``, timm's ``GELU`` /
        ``GELUTanh`` classes and ``F.gelu``, and QuickGELU: "quick_gelu", timm's ``QuickGELU``
        module and ``quick_gelu`` function, Hugging Face's ``QuickGELUActivation``, vitkern's
        :class:`QuickGELU`. Anything else raises ``ValueError``: the fused epilogues compute only
        these activations.
        """
        if spec is None:
            return cls.NONE
        if isinstance(spec, str):
            key = spec.strip().lower()
            if key in _ALIASES:
                return cls.parse(_ALIASES[key])
            raise ValueError(f"activation must be one of 'gelu', 'gelu_tanh', 'quick_gelu' (or None), got {spec!r}")
        if isinstance(spec, nn.GELU):
            return cls.GELU_TANH if spec.approximate == "tanh" else cls.GELU
        if isinstance(spec, nn.Identity):
            return cls.NONE
        if isinstance(spec, nn.Module):
            name = type(spec).__name__
            if name == "GELUTanh":
                return cls.GELU_TANH
            if name == "GELU":
                return cls.GELU
            if name in ("QuickGELU", "QuickGELUActivation"):
                return cls.QUICK_GELU
            raise ValueError(f"activation module {name} is not supported; use nn.GELU (erf or approximate='tanh') "
                             "or a QuickGELU")
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            return cls.resolve(spec())
        if isinstance(spec, functools.partial):
            return cls.resolve(spec())
        if spec is F.gelu:
            return cls.GELU
        if callable(spec) and getattr(spec, "__name__", "") in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):
            return cls.GELU_TANH
        if callable(spec) and getattr(spec, "__name__", "") == "quick_gelu":
            return cls.QUICK_GELU
        raise ValueError(f"unsupported activation {spec!r}; use 'gelu', 'gelu_tanh', 'quick_gelu', nn.GELU or None")


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)`` as a module (timm's ``QuickGELU``): the
    unfused stand-in of the epilogues' "quick_gelu"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Activation.QUICK_GELU.apply(x)


_PUBLIC_NAMES = {Activation.NONE: None, Activation.GELU: "gelu", Activation.GELU_TANH: "gelu_tanh",
                 Activation.QUICK_GELU: "quick_gelu"}
_APPROXIMATE = {Activation.NONE: None, Activation.GELU: "none", Activation.GELU_TANH: "tanh",
                Activation.QUICK_GELU: None}
