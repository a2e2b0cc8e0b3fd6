"""Patch embedding with the class token and position embedding, as a ViT's stem.

Reference: timm's ``PatchEmbed`` (a strided Conv2d, flatten, transpose) then timm ViT's
``_pos_embed`` (concatenate the class token, add the position embedding), eager and under
torch.compile. Counted by :func:`benchmarks.flops.patch_embed_cost`: the patch GEMM,
2*(B*N)*D*(C*P*P) FLOPs; the images do not require a gradient, so backward is the weight gradient
only (plus the bias, class token and pos_embed gradients). Reported per call and as images/s.

GPU sweep (issue: ViT-B/16 and ViT-L/14 at 224 and 384 px, batch 1..512; target on an H100 in
bf16: at least 1.3x timm eager and at least torch.compile). 384 is not a multiple of 14: ViT-L/14
runs at 378 px (27 x 27 patches, what timm's strided conv keeps of a 384 px image). The runner
goes breadth first and stops starting cases at its time budget, so the shapes are ordered by
interest: the training batches first, then batch 1 (launch-bound), then 384 px, then the rest of
the batch sweep.
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
        return lambda images, cls, pos: vk.patch_embed(
            images, pe.proj.weight, pe.proj.bias, pos_embed=pos, prefix_tokens=cls
        )

    return Case(
        args=(images, cls, pos),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=patch_embed_cost(b, c, img, img, p, d, dtype, pos_embed=True, prefix_tokens=k),
        grad_inputs=(cls, pos, pe.proj.weight, pe.proj.bias),
        torch_label="timm PatchEmbed + cls cat + pos add",
        items=b,
    )


def _shape(model, batch, img):
    patch, dim = {"ViT-B/16": (16, 768), "ViT-L/14": (14, 1024)}[model]
    img -= img % patch  # 384 -> 378 for P = 14
    name = model if img == 224 else f"{model}@{img}"
    return dict(name=name, batch=batch, img_size=img, patch=patch, in_chans=3, dim=dim)


SETUP = Setup(
    name="patch_embed",
    description="images -> [cls; patches @ W^T + b] + pos_embed",
    build=build,
    gpu_shapes=(
        _shape("ViT-B/16", 128, 224),
        _shape("ViT-L/14", 64, 224),
        _shape("ViT-B/16", 1, 224),
        _shape("ViT-L/14", 1, 224),
        _shape("ViT-B/16", 32, 384),
        _shape("ViT-L/14", 16, 384),
        _shape("ViT-B/16", 512, 224),
        _shape("ViT-L/14", 256, 224),
        _shape("ViT-B/16", 8, 224),
        _shape("ViT-B/16", 32, 224),
        _shape("ViT-B/16", 1, 384),
        _shape("ViT-L/14", 1, 384),
        _shape("ViT-B/16", 128, 384),
        _shape("ViT-L/14", 64, 384),
        _shape("ViT-B/16", 512, 384),
    ),
    cpu_shapes=(dict(name="ViT-Ti/16", batch=2, img_size=224, patch=16, in_chans=3, dim=192),),
    order=60,
    formula=(
        "patch_embed_cost: 2*(B*N)*D*(C*P*P) fwd FLOPs (bwd: weight grad, 1x); "
        "images, W, b, pos, cls read, out written"
    ),
)
