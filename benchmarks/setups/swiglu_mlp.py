"""The SwiGLU MLP: fc2(silu(gate) * value) [+ residual], the gate and value from fc1.

Reference: timm's ``SwiGLU`` module (``fc1_g``, ``fc1_x``, SiLU, multiply, ``fc2``; the residual add
as a separate pass), or with ``packed`` timm's ``SwiGLUPacked`` (one fc1 GEMM, ``chunk``: DINOv2
giant). vitkern runs the same weights through ``vitkern.swiglu_mlp``: the SwiGLU GEMM (gate and
value accumulators a tile, ``silu(g) * v`` stored from its epilogue), fc2 with the residual in
its epilogue; backward, the dH GEMM writes the gate's gradient from its epilogue. Counted by
:func:`benchmarks.flops.swiglu_mlp_cost`.
"""

from benchmarks.flops import swiglu_mlp_cost
from benchmarks.setups import Case, Setup, randn


def build(shape, dtype, device):
    from timm.layers import SwiGLU, SwiGLUPacked

    b, t, d, hid = shape["batch"], shape["tokens"], shape["dim"], shape["hidden"]
    residual = bool(shape.get("residual", False))
    packed = bool(shape.get("packed", False))
    mlp = (SwiGLUPacked(d, 2 * hid) if packed else SwiGLU(d, hid)).to(device=device, dtype=dtype)
    x = randn((b, t, d), dtype, device, requires_grad=True)
    r = randn((b, t, d), dtype, device, requires_grad=True) if residual else None
    if packed:
        fc1 = dict(fc1_weight=mlp.fc1.weight, fc1_bias=mlp.fc1.bias)
    else:
        fc1 = dict(fc1_weight=mlp.fc1_g.weight, fc1_bias=mlp.fc1_g.bias, value_weight=mlp.fc1_x.weight,
                   value_bias=mlp.fc1_x.bias)

    def torch_fn(x, *rest):
        y = mlp(x)
        return rest[0] + y if rest else y

    def vitkern_fn(vk):
        def fn(x, *rest):
            return vk.swiglu_mlp(x, fc2_weight=mlp.fc2.weight, fc2_bias=mlp.fc2.bias,
                                 residual=rest[0] if rest else None, **fc1)

        return fn

    args = (x,) + ((r,) if residual else ())
    label = "timm SwiGLUPacked" if packed else "timm SwiGLU"
    return Case(
        args=args,
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=swiglu_mlp_cost(b * t, d, hid, d, dtype, residual=residual),
        grad_inputs=args + tuple(mlp.parameters()),
        torch_label=label + (" + residual" if residual else ""),
    )


SETUP = Setup(
    name="swiglu_mlp",
    description="fc2(silu(gate) * value) [+ residual]",
    build=build,
    gpu_shapes=(
        dict(name="EVA-02-B/14", batch=64, tokens=257, dim=768, hidden=2048, residual=True),
        dict(name="ViT-g/14 (DINOv2, packed)", batch=32, tokens=257, dim=1536, hidden=4096, residual=True,
             packed=True),
    ),
    cpu_shapes=(
        dict(name="EVA-02-Ti/14", batch=2, tokens=197, dim=192, hidden=512, residual=True),
        dict(name="tiny packed", batch=1, tokens=197, dim=72, hidden=100, residual=True, packed=True),
    ),
    order=55,
    formula="swiglu_mlp_cost: 2*M*2H*D + 2*M*D*H fwd FLOPs (bwd 2x); x, weights, residual read, y written",
)
