"""Hugging Face vision encoders (ViT, DeiT, DINOv2 with or without registers, CLIP and SigLIP
vision towers): their attention and MLP modules on vitkern's ops.

Recognised by structure, so the check holds across transformers versions that share it:

- attention: a module of ``transformers`` with ``q_proj`` / ``k_proj`` / ``v_proj`` and ``o_proj``
  (or ``out_proj``) ``nn.Linear`` projections, ``head_dim`` and a forward that returns
  ``(output, attention weights)``. The patched forward runs the three projections, vitkern's
  flash attention on their strided ``(B, H, T, d)`` views and the output projection, and returns
  ``(output, None)``. A call with an attention mask, ``output_attentions`` or active attention
  dropout runs the module's own forward.
- MLP: ``fc1`` / ``activation_fn`` / ``fc2`` with a GELU activation (erf or tanh) or CLIP's
  QuickGELU: one fused ``mlp`` call. The SwiGLU MLPs are left alone.

The layers' residual adds stay in Hugging Face's layer forward (their structure changes between
versions too often to replace it safely); LayerNorms are patched with every other plain
``nn.LayerNorm``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitkern.ops.attention import attention as _attention
from vitkern.ops.linear import linear
from vitkern.ops.mlp import mlp as _mlp
from vitkern.patching.core import PatchReport, install, is_patched

__all__ = ["patch_hf_modules"]

# transformers' activation modules by class name -> the fused epilogue's activation
_HF_ACTIVATIONS = {"GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                   "NewGELUActivation": "gelu_tanh", "QuickGELUActivation": "quick_gelu"}


def _hf_activation(act) -> Optional[str]:
    name = type(act).__name__
    if name == "GELUActivation" and getattr(act, "act", None) is not torch.nn.functional.gelu:
        return None  # use_gelu_python: the same function, but keep what the user asked for
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return _HF_ACTIVATIONS.get(name)


def _out_proj(m) -> Optional[nn.Linear]:
    out = getattr(m, "o_proj", None) or getattr(m, "out_proj", None)
    return out if isinstance(out, nn.Linear) else None


def _attention_dropout(m) -> float:
    p = 0.0
    for name in ("attention_dropout", "dropout"):
        value = getattr(m, name, None)
        if isinstance(value, nn.Dropout):
            value = value.p
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            p = max(p, float(value))
    return p


def _attention_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    masked = any(a is not None for a in args) or any(
        v is not None and v is not False for k, v in kwargs.items() if k != "position_embeddings")
    dropout = self.training and _attention_dropout(self) > 0
    if masked or dropout or hidden_states.dim() != 3 or "position_embeddings" in kwargs:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    b, t, _ = hidden_states.shape
    shape = (b, t, -1, self.head_dim)
    q, k, v = (linear(hidden_states, p.weight, p.bias).view(shape).transpose(1, 2)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    scale = getattr(self, "scaling", getattr(self, "scale", None))
    o = _attention(q, k, v, causal=bool(getattr(self, "is_causal", False)), scale=scale)
    out = _out_proj(self)
    return linear(o.transpose(1, 2).reshape(b, t, -1), out.weight, out.bias), None


def _attention_reason(m) -> Optional[str]:
    projections = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections) or _out_proj(m) is None:
        return "no q_proj / k_proj / v_proj / o_proj linear projections (an older transformers layout)"
    if not isinstance(getattr(m, "head_dim", None), int):
        return "no head_dim"
    if getattr(m, "is_causal", False):
        return "a causal attention (a text tower)"
    return None


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _mlp(hidden_states, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                activation=self._vitkern_activation)


def patch_hf_modules(model: nn.Module, report: PatchReport, *, attention: bool, mlp: bool, patch_embed: bool,
                     residual_fusion: bool) -> None:
    """Patch the Hugging Face modules of ``model`` (in place), recording each in ``report``."""
    del patch_embed, residual_fusion  # the embeddings and the layers keep Hugging Face's forwards
    for name, m in model.named_modules():
        kind = type(m)
        if not kind.__module__.startswith("transformers.") or is_patched(m):
            continue
        label = f"transformers {kind.__name__}"
        if kind.__name__.endswith("Attention") and hasattr(m, "q_proj") and attention:
            reason = _attention_reason(m)
            if reason is None:
                install(m, "forward", _attention_forward)
                report.add(name, label, True, "q / k / v GEMMs, flash attention, output GEMM")
            else:
                report.add(name, label, False, reason)
        elif kind.__name__.endswith("MLP") and hasattr(m, "fc1") and mlp:
            activation = _hf_activation(getattr(m, "activation_fn", None))
            if activation is None:
                act = type(getattr(m, "activation_fn", None)).__name__
                report.add(name, label, False, f"activation {act}: the fused epilogues compute GELU (erf / tanh) "
                                                   "or QuickGELU")
            elif not (isinstance(m.fc1, nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear)):
                report.add(name, label, False, "fc1 / fc2 are not nn.Linear")
            else:
                install(m, "forward", _mlp_forward, extra={"_vitkern_activation": activation})
                report.add(name, label, True, f"fused mlp (fc1 + {activation} + fc2)")
