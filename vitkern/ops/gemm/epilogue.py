"""The GEMM core's epilogues: which steps on the fp32 accumulator a GEMM runs (this file, no Triton
import: callers build an :class:`Epilogue` anywhere), and the steps themselves (``epilogue_steps.py``).

A caller describes its epilogue once, as an :class:`Epilogue` (the tensors each step reads or
writes; a step runs when its tensor is given), and :func:`vitkern.ops.gemm.launch.gemm` turns it
into the kernel's constexpr switches (:meth:`Epilogue.constexprs`). The steps, in the order the
kernel composes them (``vitkern.ops.gemm.kernels._gemm_kernel``), each a ``@triton.jit`` helper in
``epilogue_steps.py`` that compiles to nothing when its switch is off:

    acc += bias[n]                              add_bias          bias
    pre[m, n] = acc                             store_aux         pre: the pre-activation for backward
    dotpart[s, pid_n, m] = sum_n acc * W[m, n]  row_dot           row_dot = W: the LayerScale grad
    acc = act(acc)                              activation        activation
    acc *= col_scale[n]                         scale_cols        col_scale: LayerScale gamma
    acc *= row_scale[m]                         scale_rows        row_scale: drop path
    acc *= act'(aux[m, n])                      mul_activation_grad  act_grad, aux = pre
    acc += residual[m, n]                       add_residual      residual (or its TMA load)
    (dg, dv) = swiglu'(aux) * acc               swiglu_grad_store glu_grad, aux = the packed (g, v)

then one cast, to C's dtype, on the store. With ``glu_grad`` the accumulator is dH of a SwiGLU
gate ``h = silu(g) * v`` and the store writes the packed ``(M, 2N)`` gradient of fc1's output
(``dg`` at columns ``n``, ``dv`` at ``N + n``) from the packed pre-activation ``aux`` (M, 2N).
The SwiGLU forward itself (two weight row blocks a tile) is its own kernel,
``vitkern.ops.gemm.kernels._swiglu_gemm_kernel`` (:func:`vitkern.ops.gemm.launch.swiglu_gemm`).
``activation`` / ``activation_grad`` also serve the elementwise activation-backward kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vitkern.ops.activation import Activation

__all__ = ["Epilogue"]


@dataclasses.dataclass(frozen=True, eq=False)
class Epilogue:
    """The epilogue of one GEMM (see the module docstring for the steps and their order).

    ``pre``, ``row_dot``, ``aux`` and ``residual`` are ``(M, N)`` views with any strides; ``bias``
    and ``col_scale`` are ``(N,)``, ``row_scale`` ``(M,)``. Validated once, here.
    """

    bias: Optional[torch.Tensor] = None
    pre: Optional[torch.Tensor] = None
    row_dot: Optional[torch.Tensor] = None
    activation: Activation = Activation.NONE
    col_scale: Optional[torch.Tensor] = None
    row_scale: Optional[torch.Tensor] = None
    act_grad: Activation = Activation.NONE
    aux: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    glu_grad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", Activation(self.activation))
        object.__setattr__(self, "act_grad", Activation(self.act_grad))
        if self.glu_grad:
            if self.aux is None or self.act_grad != Activation.NONE or self.residual is not None:
                raise ValueError("Epilogue: glu_grad needs aux (the packed gate / value pre-activation) and takes "
                                 "no act_grad or residual")
        elif (self.act_grad != Activation.NONE) != (self.aux is not None):
            raise ValueError("Epilogue: act_grad and aux go together (aux is the activation's input)")

    @property
    def split_safe(self) -> bool:
        """Linear in the accumulator (the steps that may run on split-K partial sums)."""
        return (self.bias is None and self.activation == Activation.NONE and self.residual is None
                and self.pre is None and self.act_grad == Activation.NONE and not self.glu_grad)

    @property
    def kind(self) -> str:
        """The epilogue kind the config table keys on (``vitkern.ops.gemm.configs.EPILOGUE_KINDS``):
        "residual", "act", "act_grad", "glu_grad" (the SwiGLU gradient), "bias" (bias only),
        "branch" (a bias with LayerScale / drop-path scales: the proj / fc2 of a block whose
        residual add runs later), "scale" (row / column scales or row dots otherwise: the dW GEMMs)
        or "none"."""
        if self.residual is not None:
            return "residual"
        if self.activation != Activation.NONE or self.pre is not None:
            return "act"
        if self.glu_grad:
            return "glu_grad"
        if self.act_grad != Activation.NONE:
            return "act_grad"
        scales = self.col_scale is not None or self.row_scale is not None
        if self.bias is not None and self.row_dot is None:
            return "branch" if scales else "bias"
        if self.bias is not None:
            return "scale"
        return "scale" if scales or self.row_dot is not None else "none"

    def constexprs(self) -> dict[str, object]:
        """The kernel's epilogue switches."""
        return dict(
            HAS_BIAS=self.bias is not None, ACTIVATION=int(self.activation),
            HAS_COL_SCALE=self.col_scale is not None, HAS_ROW_SCALE=self.row_scale is not None,
            HAS_RESIDUAL=self.residual is not None, STORE_PRE=self.pre is not None,
            ACT_GRAD=int(self.act_grad), ROW_DOT=self.row_dot is not None, GLU_GRAD=self.glu_grad,
        )

    @property
    def out_cols(self) -> int:
        """Output columns per accumulator column: 2 with ``glu_grad`` (dg and dv), else 1."""
        return 2 if self.glu_grad else 1
