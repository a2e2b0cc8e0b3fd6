"""Patch embedding with the class token and position embedding, as a ViT's stem.

Reference: timm's ``PatchEmbed`` (a strided Conv2d, flatten, transpose) then timm ViT's
``_pos_embed`` (concatenate the class token, add the position embedding). Counted by
:func:`benchmarks.flops.patch_embed_cost`: the patch GEMM, 2*(B*N)*D*(C*P*P) FLOPs; the images do
not require a gradient, so backward is the weight gradient only.
"""

import torch

from benchmarks.flops import patch_embed_cost
from benchmarks.setups import Case, Setup, randn


def build(shape, dtype, device):
    from timm.layers import PatchEmbed

    b, img, p, c, d = shape["batch"], shape["img_size"], shape["patch"], shape["in_chans"], shape["dim"]
    k = shape.get("prefix", 1)
    pe = PatchEmbed(img_size=img, patch_size=p, in_chans=c, embed_dim=d).to(device=device, dtype=dtype)
    n = pe.num_patches
    images = randn((b, c, img, img), dtype, device)
    cls = randn((1, k, d), dtype, device, scale=0.02, requires_grad=True)
    pos = randn((1, k + n, d), dtype, device, scale=0.02, requires_grad=True)

    def torch_fn(images, cls, pos):
        x = pe(images)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + pos

    def vitkern_fn(vk):
        return lambda images, cls, pos: vk.patch_embed(images, pe.proj.weight, pe.proj.bias, pos_embed=pos, prefix_tokens=cls)

    return Case(
        args=(images, cls, pos),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=patch_embed_cost(b, c, img, img, p, d, dtype, pos_embed=True, prefix_tokens=k),
        grad_inputs=(cls, pos, pe.proj.weight, pe.proj.bias),
        torch_label="timm PatchEmbed + cls cat + pos add",
    )


SETUP = Setup(
    name="patch_embed",
    description="images -> [cls; patches @ W^T + b] + pos_embed",
    build=build,
    gpu_shapes=(
        dict(name="ViT-B/16", batch=128, img_size=224, patch=16, in_chans=3, dim=768),
        dict(name="ViT-L/14", batch=64, img_size=224, patch=14, in_chans=3, dim=1024),
    ),
    cpu_shapes=(dict(name="ViT-Ti/16", batch=2, img_size=224, patch=16, in_chans=3, dim=192),),
    order=60,
    formula="patch_embed_cost: 2*(B*N)*D*(C*P*P) fwd FLOPs (bwd: weight grad, 1x); images, W, b, pos, cls read, out written",
)
