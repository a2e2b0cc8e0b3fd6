"""Attention straight out of the qkv GEMM's output, as a ViT block runs it.

The input is the (B, T, 3*H*d) qkv projection viewed as (B, T, 3, H, d); the output is (B, T, H*d),
ready for the proj GEMM. Reference: timm's ``Attention.forward`` (permute + unbind, SDPA, then
transpose + reshape, which copies), also with SDPA held to one backend (``sdpa-*``), and
flash-attn's ``flash_attn_qkvpacked_func`` / xformers when installed. vitkern reads q/k/v strided
and writes (B, T, H, d) directly.
"""

import torch.nn.functional as F

from benchmarks.flops import attention_cost
from benchmarks.setups import Case, Setup, randn
from benchmarks.setups._attention_refs import packed_library_references, sdpa_references
from benchmarks.setups.attention import CPU_SHAPES, GPU_SHAPES


def build(shape, dtype, device):
    b, h, t, d = shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"]
    qkv = randn((b, t, 3 * h * d), dtype, device, requires_grad=True)

    def torch_fn(qkv):
        q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(b, t, h * d)

    def vitkern_fn(vk):
        return lambda qkv: vk.attention_qkvpacked(qkv.view(b, t, 3, h, d)).reshape(b, t, h * d)

    return Case(
        args=(qkv,),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=attention_cost(b, h, t, t, d, dtype),
        grad_inputs=(qkv,),
        torch_label="timm Attention core (permute, SDPA, reshape)",
        references={**sdpa_references(torch_fn, device), **packed_library_references(device, dtype, b, t, h, d)},
    )


SETUP = Setup(
    name="attention_qkvpacked",
    description="attention from a packed (B, T, 3, H, d) qkv to (B, T, H*d)",
    build=build,
    gpu_shapes=GPU_SHAPES[:2],
    cpu_shapes=CPU_SHAPES[:1],
    order=35,
    formula="attention_cost: 4*B*H*T*T*d fwd FLOPs (bwd 2.5x); qkv read, o written",
)
