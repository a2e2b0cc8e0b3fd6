"""The four GEMMs of a ViT block with their fused epilogues.

qkv (D -> 3D, bias), proj (D -> D, bias + residual), fc1 (D -> 4D, bias + GELU), fc2 (4D -> D,
bias + residual), and proj / fc2 with a float32 residual (``residual_dtype``: timm keeps the
residual stream fp32 under autocast, so the epilogue reads and writes 4-byte rows).
Reference: ``F.linear`` then ``F.gelu`` / ``+ residual`` as separate passes
(what timm runs). Counted by :func:`benchmarks.flops.linear_cost`: 2*M*N*K FLOPs, M = B*T.
"""

import torch
import torch.nn.functional as F

from benchmarks.flops import linear_cost
from benchmarks.setups import Case, Setup, randn


def build(shape, dtype, device):
    b, t = shape["batch"], shape["tokens"]
    k, n = shape["in_features"], shape["out_features"]
    activation = shape.get("activation") or None
    residual = bool(shape.get("residual", False))
    residual_dtype = getattr(torch, shape["residual_dtype"]) if shape.get("residual_dtype") else dtype
    x = randn((b, t, k), dtype, device, requires_grad=True)
    w = randn((n, k), dtype, device, scale=k ** -0.5, requires_grad=True)
    bias = randn((n,), dtype, device, scale=0.1, requires_grad=True)
    r = randn((b, t, n), residual_dtype, device, requires_grad=True) if residual else None
    approximate = "tanh" if activation == "gelu_tanh" else "none"

    def torch_fn(x, w, bias, *rest):
        y = F.linear(x, w, bias)
        if activation is not None:
            y = F.gelu(y, approximate=approximate)
        if rest:
            y = rest[0] + y
        return y

    def vitkern_fn(vk):
        def fn(x, w, bias, *rest):
            return vk.linear(x, w, bias, activation=activation, residual=rest[0] if rest else None)

        return fn

    args = (x, w, bias) + ((r,) if residual else ())
    return Case(
        args=args,
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=linear_cost(b * t, k, n, dtype, residual=residual, residual_dtype=residual_dtype if residual else None,
                         activation=activation),
        grad_inputs=args,
        torch_label="F.linear" + (" + F.gelu" if activation else "") + (
            (" + fp32 residual" if residual_dtype == torch.float32 and dtype != torch.float32 else " + residual")
            if residual else ""),
    )


def _vit(name, batch, dim, tokens=197):
    """A ViT block's four GEMMs, fc1 first (the --quick shape)."""
    return (
        dict(name=f"{name} fc1", batch=batch, tokens=tokens, in_features=dim, out_features=4 * dim, activation="gelu"),
        dict(name=f"{name} qkv", batch=batch, tokens=tokens, in_features=dim, out_features=3 * dim),
        dict(name=f"{name} proj", batch=batch, tokens=tokens, in_features=dim, out_features=dim, residual=True),
        dict(name=f"{name} fc2", batch=batch, tokens=tokens, in_features=4 * dim, out_features=dim, residual=True),
    )


def _fp32_residual(name, batch, dim, tokens=197):
    """proj and fc2 with the float32 residual stream of timm under autocast."""
    return (
        dict(name=f"{name} proj fp32-res", batch=batch, tokens=tokens, in_features=dim, out_features=dim,
             residual=True, residual_dtype="float32"),
        dict(name=f"{name} fc2 fp32-res", batch=batch, tokens=tokens, in_features=4 * dim, out_features=dim,
             residual=True, residual_dtype="float32"),
    )


SETUP = Setup(
    name="linear",
    description="act(x W^T + b) [+ residual]",
    build=build,
    gpu_shapes=_vit("ViT-B/16", 128, 768) + _fp32_residual("ViT-B/16", 128, 768) + _vit("ViT-L/16", 64, 1024)[:1],
    cpu_shapes=(
        dict(name="ViT-Ti/16 fc1", batch=2, tokens=197, in_features=192, out_features=768, activation="gelu"),
        dict(name="ViT-Ti/16 proj", batch=2, tokens=197, in_features=192, out_features=192, residual=True),
        dict(name="ViT-Ti/16 proj fp32-res", batch=2, tokens=197, in_features=192, out_features=192, residual=True,
             residual_dtype="float32"),
    ),
    order=40,
    formula="linear_cost: 2*M*N*K fwd FLOPs (bwd 2x); x, W, b, residual read, y written",
)
