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

from benchmarks.setups import Setup
from benchmarks.setups.layer_norm import CPU_SHAPES, GPU_SHAPES, layer_norm_case


def build(shape, dtype, device):
    return layer_norm_case(shape, torch.float32, device, out_dtype=dtype)


SETUP = Setup(
    name="pre_norm",
    description="LayerNorm of a float32 stream into the compute dtype (a pre-norm under autocast)",
    build=build,
    gpu_shapes=GPU_SHAPES,
    cpu_shapes=CPU_SHAPES[:1],
    order=15,
    formula="layer_norm_cost(out_dtype=dtype): x fp32, w, b read; y in the run's dtype written",
)
