"""Flash attention on (B, H, T, d) tensors, non-causal as in a ViT (causal as a shape option).

Reference: ``F.scaled_dot_product_attention`` (PyTorch picks its fastest backend: flash / cuDNN /
memory-efficient on CUDA), and beside it SDPA with one backend at a time (``sdpa-flash``,
``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``) and flash-attn / xformers when installed (see
``_attention_refs``). The GPU shapes end with a sequence-length sweep at ViT-B's heads (224, 384, 448
and 512 px: T = 197, 577, 785, 1025) for the speedup-vs-sequence-length plot. Counted by
:func:`benchmarks.flops.attention_cost`: 4*B*H*T*T*d FLOPs forward (halved when causal), 2.5x that
backward; bytes q, k, v read and o written.
"""

import torch.nn.functional as F

from benchmarks.flops import attention_cost
from benchmarks.setups import Case, Setup, randn
from benchmarks.setups._attention_refs import bhtd_library_references, sdpa_references

# (B, H, T, d) of ViT attention; attention_qkvpacked runs the first GPU two and the first CPU one.
GPU_SHAPES = (
    dict(name="ViT-B/16", batch=128, heads=12, tokens=197, head_dim=64),
    dict(name="ViT-L/14", batch=64, heads=16, tokens=257, head_dim=64),
    dict(name="ViT-H/14", batch=32, heads=16, tokens=257, head_dim=80),
    dict(name="ViT-B/16@448", batch=16, heads=12, tokens=785, head_dim=64),
    dict(name="ViT-B/16@384", batch=32, heads=12, tokens=577, head_dim=64),
    dict(name="ViT-B/16@512", batch=16, heads=12, tokens=1025, head_dim=64),
)
CPU_SHAPES = (
    dict(name="ViT-Ti/16", batch=1, heads=3, tokens=197, head_dim=64),
    dict(name="ViT-H/14-ish", batch=1, heads=2, tokens=257, head_dim=80),
)


def build(shape, dtype, device):
    b, h, t, d = shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"]
    causal = bool(shape.get("causal", False))
    q, k, v = (randn((b, h, t, d), dtype, device, requires_grad=True) for _ in range(3))

    def torch_fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def vitkern_fn(vk):
        return lambda q, k, v: vk.attention(q, k, v, causal=causal)

    return Case(
        args=(q, k, v),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=attention_cost(b, h, t, t, d, dtype, causal=causal),
        grad_inputs=(q, k, v),
        torch_label="F.scaled_dot_product_attention",
        references={**sdpa_references(torch_fn, device), **bhtd_library_references(device, dtype, causal=causal)},
    )


SETUP = Setup(
    name="attention",
    description="softmax(q k^T / sqrt(d)) v, q/k/v (B, H, T, d)",
    build=build,
    gpu_shapes=GPU_SHAPES,
    cpu_shapes=CPU_SHAPES,
    order=30,
    formula="attention_cost: 4*B*H*T*T*d fwd FLOPs (bwd 2.5x); q, k, v read, o written",
)
