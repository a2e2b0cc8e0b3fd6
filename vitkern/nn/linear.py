"""``Linear`` (``torch.nn.Linear`` with an optional fused activation and residual epilogue) and
``Mlp`` (``timm.layers.Mlp``: fc1 -> GELU -> fc2 in one ``mlp`` op) and ``SwiGLUPacked`` (timm's
``GluMlp`` with SiLU: one ``swiglu_mlp`` op)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from vitkern.ops.activation import Activation, QuickGELU
from vitkern.ops.linear import linear
from vitkern.ops.mlp import mlp
from vitkern.ops.swiglu import swiglu, swiglu_mlp
from vitkern.nn.layer_norm import apply_pre_norm

__all__ = ["Linear", "Mlp", "SwiGLUPacked", "resolve_activation", "swiglu_forward", "ACTIVATIONS"]

# Activation names the GEMM epilogues compute. "gelu" is the erf GELU (torch.nn.GELU's default),
# "gelu_tanh" the tanh approximation, "quick_gelu" OpenAI CLIP's x * sigmoid(1.702 x).
ACTIVATIONS = tuple(a.public_name for a in Activation)


def resolve_activation(act) -> Optional[str]:
    """Map an activation spec to the op's ``activation`` argument (None, "gelu", "gelu_tanh" or
    "quick_gelu").

    Accepts None, a name ("gelu", "gelu_tanh", and the Hugging Face names "gelu_new",
    "gelu_pytorch_tanh"), ``nn.GELU`` (class or instance, ``approximate="tanh"`` honoured),
    ``functools.partial(nn.GELU, approximate="tanh")``, ``nn.Identity``, timm's ``GELU`` /
    ``GELUTanh`` classes and ``F.gelu``, and QuickGELU ("quick_gelu", timm's ``QuickGELU``, Hugging
    Face's ``QuickGELUActivation``). Anything else raises ``ValueError``: the fused epilogues
    compute only these activations (:meth:`vitkern.ops.activation.Activation.resolve`).
    """
    return Activation.resolve(act).public_name


def _act_module(name: Optional[str]) -> nn.Module:
    act = Activation.parse(name)
    if act is Activation.NONE:
        return nn.Identity()
    return QuickGELU() if act is Activation.QUICK_GELU else nn.GELU(approximate=act.approximate)


def _to_2tuple(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected a value or a pair, got {v!r}")
        return tuple(v)
    return (v, v)


def add_scaled_residual(
    out: torch.Tensor,
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """``residual + row_scale[:, None] * residual_scale * out`` in plain PyTorch (without a
    residual: the scaled ``out``): the unfused epilogue, used only where element-wise dropout must
    sit between the GEMM and the residual."""
    if residual_scale is not None:
        out = out * residual_scale
    if row_scale is not None:
        out = (out.reshape(-1, out.shape[-1]) * row_scale.reshape(-1, 1).to(out.dtype)).reshape(out.shape)
    return out if residual is None else residual + out.to(residual.dtype)


class Linear(nn.Linear):
    """``torch.nn.Linear`` with an optional fused activation and residual epilogue.

    Same constructor, parameters, initialisation and state_dict keys as :class:`torch.nn.Linear`
    (a subclass of it), plus ``activation`` (None, "gelu" or "gelu_tanh", or ``nn.GELU``) applied
    in the GEMM epilogue: ``y = act(x W^T + b)``. ``forward(x, residual=..., residual_scale=...,
    row_scale=...)`` returns ``residual + row_scale[:, None] * residual_scale * act(x W^T + b)``
    (LayerScale and drop path in the same epilogue).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        activation=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = resolve_activation(activation)

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        residual_scale: Optional[torch.Tensor] = None,
        row_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return linear(
            x,
            self.weight,
            self.bias,
            activation=self.activation,
            residual=residual,
            residual_scale=residual_scale,
            row_scale=row_scale,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation}"


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> act -> drop -> norm -> fc2 -> drop) over the fused ``mlp`` op.

    Same constructor keywords, defaults (``act_layer=nn.GELU``) and state_dict keys (``fc1``,
    ``fc2``, and ``norm`` when ``norm_layer`` is given) as ``timm.layers.Mlp``. ``act_layer`` may
    be "gelu", "gelu_tanh", ``nn.GELU``, ``partial(nn.GELU, approximate="tanh")`` or an instance
    (see :func:`resolve_activation`).

    ``forward(x, residual=..., residual_scale=..., row_scale=...)`` returns
    ``residual + row_scale[:, None] * residual_scale * Mlp(x)`` with the residual add in fc2's
    epilogue. Without a hidden norm and without active dropout the whole MLP is one ``mlp`` call;
    a hidden ``norm_layer`` or element-wise dropout in training (``drop > 0``) runs fc1 and fc2 as
    two fused ``linear`` calls with the norm / dropout between them (and, for the output dropout,
    an unfused residual add).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer=nn.GELU,
        norm_layer=None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias = _to_2tuple(bias)
        drop_probs = _to_2tuple(drop)
        self.activation = resolve_activation(act_layer)

        self.fc1 = Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.act = _act_module(self.activation)
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = Linear(hidden_features, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop_probs[1])

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        residual_scale: Optional[torch.Tensor] = None,
        row_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        drop1 = self.training and self.drop1.p > 0
        drop2 = self.training and self.drop2.p > 0
        if not drop1 and not drop2 and isinstance(self.norm, nn.Identity):
            return mlp(
                x,
                self.fc1.weight,
                self.fc1.bias,
                self.fc2.weight,
                self.fc2.bias,
                activation=self.activation,
                residual=residual,
                residual_scale=residual_scale,
                row_scale=row_scale,
            )
        h = linear(x, self.fc1.weight, self.fc1.bias, activation=self.activation)
        if drop1:
            h = self.drop1(h)
        h = apply_pre_norm(self.norm, h)
        if not drop2:
            return linear(
                h,
                self.fc2.weight,
                self.fc2.bias,
                residual=residual,
                residual_scale=residual_scale,
                row_scale=row_scale,
            )
        out = self.drop2(linear(h, self.fc2.weight, self.fc2.bias))
        return add_scaled_residual(out, residual, residual_scale, row_scale)


class SwiGLUPacked(nn.Module):
    """timm's ``SwiGLUPacked`` (``GluMlp`` with SiLU, gate first): ``fc1`` computes the gate and
    the value halves, ``fc2(norm(silu(gate) * value))`` (DINOv2 giant's MLP). Keys ``fc1``
    (``hidden_features`` outputs, the gate first), ``norm`` (when ``norm_layer`` is given, over
    ``hidden_features // 2``, as timm's ``GluMlp``) and ``fc2`` (``hidden_features // 2`` inputs).

    Without a norm and without active dropout the whole MLP is one ``swiglu_mlp`` call: fc1's
    SwiGLU GEMM writes ``silu(gate) * value`` from its epilogue (the ``(T, hidden_features)`` fc1
    output is not materialised), fc2 carries the residual / LayerScale / drop-path epilogue, and
    the backward's dH GEMM writes the gate's gradient from its epilogue. With a norm or dropout,
    the gate is one ``swiglu`` call (the same fused fc1 GEMM) and fc2 a fused ``linear``, the
    norm / dropout between them (and for the output dropout an unfused residual add)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 bias: Union[bool, Tuple[bool, bool]] = True, drop: Union[float, Tuple[float, float]] = 0.0,
                 device=None, dtype=None, *, norm_layer=None) -> None:
        super().__init__()
        if hidden_features % 2:
            raise ValueError(f"SwiGLUPacked: hidden_features must be even (gate and value halves), got "
                             f"{hidden_features}")
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        bias = _to_2tuple(bias)
        drop_probs = _to_2tuple(drop)
        self.activation = None  # the gate is not an epilogue activation
        self.fc1 = Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features // 2, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = Linear(hidden_features // 2, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop_probs[1])

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                residual_scale: Optional[torch.Tensor] = None,
                row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return swiglu_forward(self, x, self.fc1.weight, self.fc1.bias, None, None, residual, residual_scale,
                              row_scale)


def swiglu_forward(m: nn.Module, x, fc1_weight, fc1_bias, value_weight, value_bias, residual, residual_scale,
                   row_scale) -> torch.Tensor:
    """The SwiGLU MLP forward of a module with timm's ``drop1`` / ``norm`` / ``fc2`` / ``drop2``
    (vitkern's :class:`SwiGLUPacked`, ``vitkern.models.eva.SwiGLU``, and timm's ``GluMlp`` /
    ``SwiGLU`` when patched): one ``swiglu_mlp`` call without a norm or active dropout, else the
    fused ``swiglu`` gate, the norm / dropout, and fc2 as a fused ``linear``."""
    drop1 = m.training and m.drop1.p > 0
    drop2 = m.training and m.drop2.p > 0
    if not drop1 and not drop2 and isinstance(m.norm, nn.Identity):
        return swiglu_mlp(x, fc1_weight, fc1_bias, m.fc2.weight, m.fc2.bias, value_weight=value_weight,
                          value_bias=value_bias, residual=residual, residual_scale=residual_scale,
                          row_scale=row_scale)
    h = swiglu(x, fc1_weight, fc1_bias, value_weight=value_weight, value_bias=value_bias)
    if drop1:
        h = m.drop1(h)
    h = apply_pre_norm(m.norm, h)
    if drop2:
        out = m.drop2(linear(h, m.fc2.weight, m.fc2.bias))
        return add_scaled_residual(out, residual, residual_scale, row_scale)
    return linear(h, m.fc2.weight, m.fc2.bias, residual=residual, residual_scale=residual_scale, row_scale=row_scale)
