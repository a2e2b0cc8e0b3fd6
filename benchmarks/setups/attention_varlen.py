"""Packed variable-length attention: a mixed-resolution batch as one sequence of tokens.

The input is the packed qkv projection of every image's tokens, ``(total, 3*H*d)`` viewed as
``(total, 3, H, d)``, with int32 ``cu_seqlens``; the output is ``(total, H*d)``. vitkern runs
``attention_qkvpacked_varlen`` (no padding, no host sync). References: ``torch`` is the
per-image loop of SDPA a user would write; ``sdpa-padded`` pads the batch to its longest
sequence and runs SDPA with a dense ``(B, 1, T, T)`` mask, as timm's NaFlexVit does (the pad and
unpad gathers included); ``torch-varlen`` is ``torch.nn.attention.varlen.varlen_attn`` where the
installed torch has it (CUDA, fp16 / bf16); ``flex-document`` is compiled FlexAttention with a
document block mask (CUDA); ``flash-attn`` is ``flash_attn_varlen_qkvpacked_func`` where
flash-attn is installed. The GPU shapes: 128 images of 128-512 px at aspect
ratios 1:3 to 3:1 (patch 16, a class token), and 128 images of 224 px (197 tokens each, the shape
of ``attention_qkvpacked``'s ViT-B/16 row: the packed kernel against the dense one). Counted by
:func:`benchmarks.flops.attention_varlen_cost`: each image's own attention, no padding.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from benchmarks.flops import attention_varlen_cost
from benchmarks.setups import Case, Reference, Setup, randn
from benchmarks.setups._attention_refs import _library_reason

GPU_SHAPES = (
    dict(name="mixed 128-512px x128", images=128, min_px=128, max_px=512, patch=16, heads=12, head_dim=64, seed=0),
    dict(name="ViT-B/16 224px x128", images=128, min_px=224, max_px=224, patch=16, heads=12, head_dim=64, seed=0),
    # one image, as a vision encoder serving one request packs it: the split-KV forward's case
    dict(name="ViT-B/16 224px x1", images=1, min_px=224, max_px=224, patch=16, heads=12, head_dim=64, seed=0),
)
CPU_SHAPES = (
    dict(name="mixed 32-160px x4", images=4, min_px=32, max_px=160, patch=16, heads=2, head_dim=64, seed=0),
    dict(name="160px x1", images=1, min_px=160, max_px=160, patch=16, heads=2, head_dim=64, seed=0),
)


def image_lengths(shape) -> list[int]:
    """Token counts of the shape's images: sides drawn in ``[min_px, max_px]`` with aspect ratios
    1:3 to 3:1 (a fixed seed), ``(h / patch) * (w / patch)`` patches plus a class token."""
    rng = random.Random(shape["seed"])
    p, lo, hi = shape["patch"], shape["min_px"], shape["max_px"]
    lengths = []
    for _ in range(shape["images"]):
        side = rng.uniform(lo, hi)
        aspect = 3.0 ** rng.uniform(-1.0, 1.0) if hi > lo else 1.0
        h = min(hi, max(lo, side * aspect ** 0.5))
        w = min(hi, max(lo, side / aspect ** 0.5))
        lengths.append(max(1, int(h) // p) * max(1, int(w) // p) + 1)
    return lengths


def _torch_varlen_reference(device, dtype, cu, lengths, h, d) -> Reference:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return Reference(None, f"this torch has no torch.nn.attention.varlen ({exc})")
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return Reference(None, "torch's varlen_attn runs CUDA fp16 / bf16 only")
    total = sum(lengths)

    def fn(qkv):
        q, k, v = qkv.view(total, 3, h, d).unbind(1)
        return varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths)).reshape(total, h * d)

    return Reference(fn, "torch.nn.attention.varlen.varlen_attn")


def _flex_document_reference(device, cu, lengths, h, d) -> Reference:
    """FlexAttention (compiled, as it is meant to run) over the packed sequence with a document
    mask: a query attends to the keys of its own image. The block mask is built once, outside
    the timed call."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return Reference(None, f"this torch has no torch.nn.attention.flex_attention ({exc})")
    if device.type != "cuda":
        return Reference(None, "FlexAttention is compiled for CUDA here (a CPU compile of it takes minutes)")
    total = sum(lengths)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device))

    def same_image(b, head, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    block_mask = create_block_mask(same_image, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def fn(qkv):
        q, k, v = qkv.view(total, 3, h, d).permute(1, 2, 0, 3)[:, None].unbind(0)
        return flex(q, k, v, block_mask=block_mask)[0].transpose(0, 1).reshape(total, h * d)

    return Reference(fn, "torch.compile(flex_attention) with a document block mask")


def _flash_attn_varlen_reference(device, dtype, cu, longest, total, h, d) -> Reference:
    mod, why = _library_reason("flash-attn", "flash_attn", device, dtype, half_only=True)
    if mod is None:
        return Reference(None, why)

    def fn(qkv):
        out = mod.flash_attn_varlen_qkvpacked_func(qkv.view(total, 3, h, d), cu, longest)
        return out.reshape(total, h * d)

    return Reference(fn, f"flash_attn.flash_attn_varlen_qkvpacked_func ({getattr(mod, '__version__', '?')})")


def build(shape, dtype, device):
    h, d = shape["heads"], shape["head_dim"]
    lengths = image_lengths(shape)
    total, longest, b = sum(lengths), max(lengths), len(lengths)
    starts = [sum(lengths[:i]) for i in range(b)]
    cu = torch.tensor(starts + [total], dtype=torch.int32, device=device)
    qkv = randn((total, 3 * h * d), dtype, device, requires_grad=True)
    # the padded layout: token j of image i at row i * longest + j
    rows = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths)]).to(device)
    valid = torch.zeros(b * longest, dtype=torch.bool, device=device)
    valid[rows] = True
    dense_mask = torch.zeros(b, 1, longest, longest, dtype=dtype, device=device)
    dense_mask.masked_fill_(~valid.view(b, 1, 1, longest), float("-inf"))

    def torch_fn(qkv):
        outs = []
        for start, n in zip(starts, lengths):
            q, k, v = qkv[start:start + n].view(n, 3, h, d).permute(1, 2, 0, 3).unbind(0)
            outs.append(F.scaled_dot_product_attention(q[None], k[None], v[None])[0].transpose(0, 1))
        return torch.cat(outs).reshape(total, h * d)

    def padded_fn(qkv):
        padded = qkv.new_zeros(b * longest, 3 * h * d).index_copy(0, rows, qkv)
        q, k, v = padded.view(b, longest, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
        return out.transpose(1, 2).reshape(b * longest, h * d).index_select(0, rows)

    def vitkern_fn(vk):
        return lambda qkv: vk.attention_qkvpacked_varlen(qkv.view(total, 3, h, d), cu,
                                                         max_seqlen=longest).reshape(total, h * d)

    return Case(
        args=(qkv,),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=attention_varlen_cost(lengths, h, d, dtype),
        grad_inputs=(qkv,),
        torch_label=f"per-image SDPA loop ({b} images, {total} tokens, longest {longest})",
        references={
            "sdpa-padded": Reference(padded_fn, f"SDPA on the batch padded to {longest} tokens, (B, 1, T, T) mask"),
            "torch-varlen": _torch_varlen_reference(device, dtype, cu, lengths, h, d),
            "flex-document": _flex_document_reference(device, cu, lengths, h, d),
            "flash-attn": _flash_attn_varlen_reference(device, dtype, cu, longest, total, h, d),
        },
    )


SETUP = Setup(
    name="attention_varlen",
    description="packed variable-length attention from (total, 3, H, d) qkv and cu_seqlens to (total, H*d)",
    build=build,
    gpu_shapes=GPU_SHAPES,
    cpu_shapes=CPU_SHAPES,
    order=36,
    formula="attention_varlen_cost: each sequence's 4*H*L*L*d fwd FLOPs (bwd 2.5x); qkv read, o written",
)
