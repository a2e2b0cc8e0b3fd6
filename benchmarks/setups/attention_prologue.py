"""Attention with the QK-norm + 2-D RoPE prologue of EVA-02 / DINOv3-style blocks.

The input is the packed (B, T, 3, H, d) qkv projection. Reference: timm's ``EvaAttention`` core
(permute + unbind, LayerNorm on q and k over the head dim, the rotation of the tokens after the
prefix (``apply_rot_embed_cat``: x * cos + rot(x) * sin) concatenated back with the prefix tokens,
SDPA, transpose + reshape), written out with timm's ops so ``torch.compile`` can fuse them. vitkern:
one ``attention_qkvpacked(qkv, q_norm=, k_norm=, rope=, num_prefix_tokens=)`` call (q's prologue
inside the attention kernels, k's in one pass before them; the inverses in the backward kernels).
"""

import torch
import torch.nn.functional as F

from benchmarks.flops import Cost, attention_cost
from benchmarks.setups import Case, Setup, randn

GPU_SHAPES = (
    dict(name="EVA-02-L/14", batch=64, heads=16, tokens=257, head_dim=64, prefix=1, layout="interleaved"),
    dict(name="DINOv3-B/16", batch=128, heads=12, tokens=201, head_dim=64, prefix=5, layout="half"),
)
CPU_SHAPES = (dict(name="EVA-02-Ti-ish", batch=1, heads=3, tokens=65, head_dim=64, prefix=1, layout="interleaved"),)


def _rot(x, half: bool):
    """timm's rot / rope_rotate_half."""
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def build(shape, dtype, device):
    import vitkern

    b, h, t, d, npt = shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"], shape["prefix"]
    half = shape["layout"] == "half"
    qkv = randn((b, t, 3 * h * d), dtype, device, requires_grad=True)
    qw, qb, kw, kb = (randn((d,), dtype, device) * 0.1 + (1.0 if i % 2 == 0 else 0.0) for i in range(4))
    angles = torch.rand(t - npt, d // 2, device=device) * 6.28
    lay = (lambda a: torch.cat([a, a], -1)) if half else (lambda a: a.repeat_interleave(2, -1))
    sin, cos = lay(angles.sin()), lay(angles.cos())
    q_norm, k_norm = vitkern.QKNorm("layer", qw, qb, 1e-6), vitkern.QKNorm("layer", kw, kb, 1e-6)
    tables = vitkern.RopeTables(sin, cos, shape["layout"])

    def torch_fn(qkv):
        q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.layer_norm(q, (d,), qw, qb, 1e-6), F.layer_norm(k, (d,), kw, kb, 1e-6)
        q = torch.cat([q[:, :, :npt], q[:, :, npt:] * cos + _rot(q[:, :, npt:], half) * sin], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], k[:, :, npt:] * cos + _rot(k[:, :, npt:], half) * sin], dim=2).type_as(v)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(b, t, h * d)

    def vitkern_fn(vk):
        return lambda qkv: vk.attention_qkvpacked(qkv.view(b, t, 3, h, d), q_norm=q_norm, k_norm=k_norm,
                                                  rope=tables, num_prefix_tokens=npt).reshape(b, t, h * d)

    attn = attention_cost(b, h, t, t, d, dtype)
    # the prologue at its minimum: q and k read and written once more, forward and backward
    s = torch.empty((), dtype=dtype).element_size()
    extra = 4 * b * h * t * d * s
    cost = Cost(flops=attn.flops,
                bytes={"fwd": attn.bytes["fwd"] + extra, "fwd+bwd": attn.bytes["fwd+bwd"] + 3 * extra})
    return Case(
        args=(qkv,),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=cost,
        grad_inputs=(qkv,),
        torch_label="timm EvaAttention core (permute, LayerNorm q / k, RoPE + cat, SDPA, reshape)",
    )


SETUP = Setup(
    name="attention_prologue",
    description="QK-norm + 2-D RoPE + attention from a packed qkv (EVA-02 / DINOv3 blocks)",
    build=build,
    gpu_shapes=GPU_SHAPES,
    cpu_shapes=CPU_SHAPES,
    order=36,
    formula="attention_cost + the prologue's q / k read and write (4*B*H*T*d elements fwd, 8 bwd)",
)
