"""Residual add + LayerNorm, returning both the normalised output and the sum.

Reference: ``s = x + residual; F.layer_norm(s)``. Memory bound:
:func:`benchmarks.flops.add_layer_norm_cost` (x, residual, weight, bias read; y and s written).
"""

import torch.nn.functional as F

from benchmarks.flops import add_layer_norm_cost
from benchmarks.setups import Case, Setup, randn
from benchmarks.setups.layer_norm import CPU_SHAPES, EPS, GPU_SHAPES, norm_params


def build(shape, dtype, device):
    b, t, d = shape["batch"], shape["tokens"], shape["dim"]
    x = randn((b, t, d), dtype, device, requires_grad=True)
    r = randn((b, t, d), dtype, device, requires_grad=True)
    w, bias = norm_params(d, dtype, device)

    def torch_fn(x, r, w, bias):
        s = x + r
        return F.layer_norm(s, (d,), w, bias, EPS), s

    def vitkern_fn(vk):
        return lambda x, r, w, bias: vk.add_layer_norm(x, r, w, bias, eps=EPS)

    return Case(
        args=(x, r, w, bias),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=add_layer_norm_cost(b * t, d, dtype),
        grad_inputs=(x, r, w, bias),
        torch_label="x + r, F.layer_norm",
    )


SETUP = Setup(
    name="add_layer_norm",
    description="(LayerNorm(x + residual), x + residual)",
    build=build,
    gpu_shapes=GPU_SHAPES[:2],
    cpu_shapes=CPU_SHAPES[:1],
    order=20,
    formula="add_layer_norm_cost: bytes only (x, r, w, b read; y, s written)",
)
