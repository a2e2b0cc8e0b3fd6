"""A pre-norm under autocast: LayerNorm of the float32 residual stream, its output in the compute
dtype for the GEMM that follows.

Reference: ``F.layer_norm(x).to(dtype)``, what eager PyTorch runs (autocast's LayerNorm returns
float32 and the next GEMM casts it: two passes forward, and in the backward the cast of the 16-bit
input gradient back to float32); vitkern: ``layer_norm(x, out_dtype=dtype)``, one pass each way,
the same values. Memory bound: :func:`benchmarks.flops.layer_norm_cost` with a float32 x and a
``dtype`` y (x, weight, bias read, y written; the backward's dy in ``dtype``). Under an fp32 run
the two are the plain LayerNorm.
"""

import torch
import torch.nn.functional as F

from benchmarks.flops import layer_norm_cost
from benchmarks.setups import Case, Setup, randn
from benchmarks.setups.layer_norm import CPU_SHAPES, EPS, GPU_SHAPES, norm_params


def build(shape, dtype, device):
    b, t, d = shape["batch"], shape["tokens"], shape["dim"]
    x = randn((b, t, d), torch.float32, device, requires_grad=True)
    w, bias = norm_params(d, torch.float32, device)

    def torch_fn(x, w, bias):
        return F.layer_norm(x, (d,), w, bias, EPS).to(dtype)

    def vitkern_fn(vk):
        return lambda x, w, bias: vk.layer_norm(x, w, bias, eps=EPS, out_dtype=dtype)

    return Case(
        args=(x, w, bias),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=layer_norm_cost(b * t, d, torch.float32, out_dtype=dtype),
        grad_inputs=(x, w, bias),
        torch_label="F.layer_norm(x).to(dtype)",
    )


SETUP = Setup(
    name="pre_norm",
    description="LayerNorm of a float32 stream into the compute dtype (a pre-norm under autocast)",
    build=build,
    gpu_shapes=GPU_SHAPES,
    cpu_shapes=CPU_SHAPES[:1],
    order=15,
    formula="layer_norm_cost(out_dtype=dtype): x fp32, w, b read; y in the run's dtype written",
)
