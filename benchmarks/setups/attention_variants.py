"""vitkern's attention under each launch choice a GPU measurement has to settle, side by side in
one run: the forward through TMA descriptors or pointer loads, with and without its key splits,
and the backward's three ways of forming dQ (the fused kernel, fp32 atomics, the dQ kernel).

Each variant is a provider of its own ("vitkern-pointer-loads", "vitkern-no-split",
"vitkern-bwd-fused", "vitkern-bwd-atomic", "vitkern-bwd-dq-kernel") beside "vitkern-triton" (the
launchers' own plan) and "torch" (``F.scaled_dot_product_attention``, its fastest backend). A
variant calls the launchers (:mod:`vitkern.ops.attention.launch`) with the one choice forced and
everything else as the plan has it; where the choice cannot differ from the plan (no
descriptors on this arch, no split at this grid, no fused tile for this head dim) its row is
"skipped" and says why. What each row decides is in docs/perf-notes.md (#16: "TMA loads in the
forward", "Split-KV", "What is left"): the plan's thresholds change only on these numbers.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.flops import attention_cost
from benchmarks.setups import Case, Reference, Setup, randn
from benchmarks.setups.attention import GPU_SHAPES as ATTENTION_SHAPES

FWD_VARIANTS = ("vitkern-pointer-loads", "vitkern-no-split")
BWD_VARIANTS = ("vitkern-bwd-fused", "vitkern-bwd-atomic", "vitkern-bwd-dq-kernel")

# the attention setup's shapes where they are the same, plus batch 1 (the split), SigLIP's masked
# head dim 72 (TMA's largest predicted effect) and a long sequence at head dim 128
_ATTENTION = {s["name"]: s for s in ATTENTION_SHAPES}
_LONG = dict(name="T=4096 D=128", batch=2, heads=16, tokens=4096, head_dim=128)
FWD_SHAPES = (
    _ATTENTION["ViT-B/16"],
    dict(_ATTENTION["ViT-B/16"], name="ViT-B/16 batch 1", batch=1),
    dict(name="SigLIP-so400m/14@384", batch=32, heads=16, tokens=729, head_dim=72),
    _LONG,
)
BWD_SHAPES = tuple(_ATTENTION[n] for n in ("ViT-B/16", "ViT-L/14", "ViT-B/16@384", "ViT-H/14")) + (_LONG,)
CPU_SHAPES = (
    dict(name="tiny", batch=1, heads=2, tokens=70, head_dim=64),
    dict(name="tiny D=72", batch=1, heads=2, tokens=40, head_dim=72),
)


class _ForcedLaunch(torch.autograd.Function):
    """Attention on (B, H, T, D) through the launchers with ``knobs`` (``tma``, ``kv_splits``,
    ``mode``: None leaves a choice to the plan)."""

    @staticmethod
    def forward(ctx, q, k, v, knobs):
        from vitkern.ops.attention import launch

        scale = q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        launch._attention_fwd(q, k, v, None, False, scale, out, lse, kv_splits=knobs.get("kv_splits"),
                              tma=knobs.get("tma"))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.knobs, ctx.scale = knobs, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from vitkern.ops.attention import launch

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        launch._attention_bwd(dout.contiguous(), q, k, v, out, lse, None, None, False, ctx.scale, False, dq, dk, dv,
                              mode=ctx.knobs.get("mode"))
        return dq, dk, dv, None


def _forced(**knobs) -> Callable:
    return lambda q, k, v: _ForcedLaunch.apply(q, k, v, knobs)


def _plan(q: torch.Tensor, k: torch.Tensor) -> dict:
    """What the launchers' own plan does at these tensors: TMA, key splits, backward mode, and
    whether the head dim leaves a masked tail."""
    from vitkern.ops._config import device_arch, num_sms
    from vitkern.ops.attention import configs, launch

    b, h, t, d = q.shape
    dev = q.device if q.is_cuda else None
    arch, precision = device_arch(dev), configs._attn_precision(q.dtype)
    da, db = configs._attn_pieces(d, split=q.dtype != torch.float32)
    width, masked = da + db, d != da + db
    sms = num_sms(dev)
    _, splits, _ = configs._attn_fwd_plan(arch, precision, width, masked, b * h, t, t, sms)
    bwd = configs._attn_bwd_plan(arch, precision, width, masked, b, h, k.shape[1], t, t, sms, False,
                                 q.element_size(), causal=False)
    fused_tile = (not masked) and configs._ATTN_FUSED_CONFIGS.get((arch, precision), {}).get(width) is not None
    return dict(arch=arch, tma=launch._attn_use_tma(None, arch, precision, q, k, k, q, pieces=(da, db)),
                splits=splits, mode=bwd.mode, masked=masked, fused_tile=fused_tile, width=width)


def _variant(name: str, plan: dict) -> Reference:
    """The provider ``name``'s call, or why it would be the plan's own."""
    if name == "vitkern-pointer-loads":
        if not plan["tma"]:
            return Reference(None, f"the plan reads through pointers here (sm_{plan['arch']})")
        return Reference(_forced(tma=False), "the forward through pointer loads (tma=False)")
    if name == "vitkern-no-split":
        if plan["splits"] == 1:
            return Reference(None, "the plan does not split the keys at this grid")
        return Reference(_forced(kv_splits=1), f"the plain forward (the plan splits {plan['splits']} ways)")
    mode = {"vitkern-bwd-fused": "fused", "vitkern-bwd-atomic": "atomic", "vitkern-bwd-dq-kernel": "dq_kernel"}[name]
    if mode == "fused" and plan["masked"]:
        return Reference(None, "the fused backward takes head dims without a masked tail")
    if mode == "fused" and not plan["fused_tile"]:
        return Reference(None, f"no fused backward tile at head width {plan['width']} (sm_{plan['arch']})")
    if mode == "atomic" and plan["masked"]:
        return Reference(None, "atomic dQ takes head dims without a masked tail")
    chosen = " (the plan's choice)" if mode == plan["mode"] else ""
    return Reference(_forced(mode=mode), f"backward mode {mode!r}{chosen}")


def _build(variants: tuple) -> Callable:
    def build(shape, dtype, device):
        b, h, t, d = shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"]
        q, k, v = (randn((b, h, t, d), dtype, device, requires_grad=True) for _ in range(3))
        plan = _plan(q, k)
        return Case(
            args=(q, k, v),
            torch_fn=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            vitkern_fn=lambda vk: lambda q, k, v: vk.attention(q, k, v),
            cost=attention_cost(b, h, t, t, d, dtype),
            grad_inputs=(q, k, v),
            torch_label="F.scaled_dot_product_attention",
            references={name: _variant(name, plan) for name in variants},
        )
    return build


def _setup(name: str, description: str, variants: tuple, modes: tuple, gpu_shapes, order: int,
           formula: Optional[str] = None) -> Setup:
    return Setup(
        name=name,
        description=description,
        build=_build(variants),
        gpu_shapes=gpu_shapes,
        cpu_shapes=CPU_SHAPES,
        modes=modes,
        order=order,
        formula=formula or "attention_cost: 4*B*H*T*T*d fwd FLOPs (bwd 2.5x); q, k, v read, o written",
        providers=("vitkern-triton", "torch") + variants,
    )


SETUPS = (
    _setup("attention_fwd_variants", "the attention forward: TMA descriptors or pointer loads, key splits or none",
           FWD_VARIANTS, ("fwd",), FWD_SHAPES, order=90),
    _setup("attention_bwd_variants", "the attention backward's dQ: fused kernel, fp32 atomics or the dQ kernel",
           BWD_VARIANTS, ("fwd+bwd",), BWD_SHAPES, order=91),
)
