"""LayerNorm over the embedding dim, as in every ViT block (timm eps 1e-6).

Reference: ``F.layer_norm`` (what ``nn.LayerNorm`` calls). Memory bound: judged by GB/s against
:func:`benchmarks.flops.layer_norm_cost` (x read, weight/bias read, y written).
"""

import torch.nn.functional as F

from benchmarks.flops import layer_norm_cost
from benchmarks.setups import Case, Setup, randn

EPS = 1e-6
# ViT token shapes (B, T, D); add_layer_norm runs the first GPU two and the first CPU one.
GPU_SHAPES = (
    dict(name="ViT-B/16", batch=256, tokens=197, dim=768),
    dict(name="ViT-L/16", batch=256, tokens=197, dim=1024),
    dict(name="ViT-H/14", batch=200, tokens=257, dim=1280),
)
CPU_SHAPES = (
    dict(name="ViT-Ti/16", batch=2, tokens=197, dim=192),
    dict(name="ViT-S/16", batch=2, tokens=197, dim=384),
)


def norm_params(d, dtype, device):
    """LayerNorm's weight (about 1) and bias (about 0), both trained."""
    w = randn((d,), dtype, device, scale=0.1, shift=1.0, requires_grad=True)
    bias = randn((d,), dtype, device, scale=0.1, requires_grad=True)
    return w, bias


def layer_norm_case(shape, dtype, device, out_dtype=None) -> Case:
    """LayerNorm of ``dtype`` rows; with ``out_dtype`` its output written in that dtype (vitkern's
    ``out_dtype``, against torch's ``F.layer_norm(x).to(out_dtype)``)."""
    b, t, d = shape["batch"], shape["tokens"], shape["dim"]
    x = randn((b, t, d), dtype, device, requires_grad=True)
    w, bias = norm_params(d, dtype, device)

    def torch_fn(x, w, bias):
        y = F.layer_norm(x, (d,), w, bias, EPS)
        return y if out_dtype is None else y.to(out_dtype)

    def vitkern_fn(vk):
        return lambda x, w, bias: vk.layer_norm(x, w, bias, eps=EPS, out_dtype=out_dtype)

    return Case(
        args=(x, w, bias),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=layer_norm_cost(b * t, d, dtype, out_dtype=out_dtype),
        grad_inputs=(x, w, bias),
        torch_label="F.layer_norm" if out_dtype is None else "F.layer_norm(x).to(dtype)",
    )


def build(shape, dtype, device):
    return layer_norm_case(shape, dtype, device)


SETUP = Setup(
    name="layer_norm",
    description="LayerNorm(x) with weight and bias",
    build=build,
    gpu_shapes=GPU_SHAPES,
    cpu_shapes=CPU_SHAPES,
    order=10,
    formula=(
        "layer_norm_cost: bytes only (x + w + b read, y written; bwd: dy, x, w, mean/rstd read, dx, dw, db written)"
    ),
)
