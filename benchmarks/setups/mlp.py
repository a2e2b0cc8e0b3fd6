"""The ViT MLP: fc2(GELU(fc1(x))) [+ residual].

Reference: timm's ``Mlp`` module (Linear, GELU, Linear; the residual add as a separate pass). vitkern
runs the same weights through ``vitkern.mlp``. Counted by :func:`benchmarks.flops.mlp_cost`: two
GEMMs; the hidden activation is not in the minimum bytes (a fused kernel may keep it on chip).
"""

import torch

from benchmarks.flops import mlp_cost
from benchmarks.setups import Case, Setup, randn


def build(shape, dtype, device):
    from timm.layers import Mlp

    b, t, d, hid = shape["batch"], shape["tokens"], shape["dim"], shape["hidden"]
    residual = bool(shape.get("residual", False))
    mlp = Mlp(d, hid, act_layer=torch.nn.GELU).to(device=device, dtype=dtype)
    x = randn((b, t, d), dtype, device, requires_grad=True)
    r = randn((b, t, d), dtype, device, requires_grad=True) if residual else None

    def torch_fn(x, *rest):
        y = mlp(x)
        return rest[0] + y if rest else y

    def vitkern_fn(vk):
        def fn(x, *rest):
            return vk.mlp(
                x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                activation="gelu", residual=rest[0] if rest else None,
            )

        return fn

    args = (x,) + ((r,) if residual else ())
    return Case(
        args=args,
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=mlp_cost(b * t, d, hid, d, dtype, residual=residual),
        grad_inputs=args + tuple(mlp.parameters()),
        torch_label="timm Mlp" + (" + residual" if residual else ""),
    )


SETUP = Setup(
    name="mlp",
    description="fc2(GELU(fc1(x))) [+ residual]",
    build=build,
    gpu_shapes=(
        dict(name="ViT-B/16", batch=128, tokens=197, dim=768, hidden=3072, residual=True),
        dict(name="ViT-L/16", batch=64, tokens=197, dim=1024, hidden=4096, residual=True),
    ),
    cpu_shapes=(dict(name="ViT-Ti/16", batch=2, tokens=197, dim=192, hidden=768, residual=True),),
    order=50,
    formula="mlp_cost: 2*M*H*D + 2*M*D*H fwd FLOPs (bwd 2x); x, weights, residual read, y written",
)
