"""FLOP and minimum-HBM-byte counts for every benchmarked op, and for a whole ViT forward.

Conventions (every formula below follows them; the tests check them against hand counts):

- **FLOPs** count the multiply-adds of the matrix products only, at 2 FLOPs per multiply-add
  (MAC): a GEMM ``(M, K) @ (K, N)`` is ``2*M*N*K``. Bias, activation, softmax, normalisation and
  residual arithmetic is O(elements) and left out; ops that are nothing but such arithmetic
  (LayerNorm) report ``None`` and are judged by bytes alone.
- **Attention** forward is two matmuls per head, ``Q K^T`` and ``P V``: ``4*B*H*Tq*Tk*D`` FLOPs,
  halved for a causal mask (the FlashAttention papers' convention; exact for Tq = Tk up to the
  diagonal). Attention backward is 2.5x the forward (five matmuls against two: ``dV = P^T dO``,
  ``dP = dO V^T``, ``dQ = dS K``, ``dK = dS^T Q`` plus the recomputation of ``S = Q K^T``).
- **GEMM backward** is 2x the forward: the data gradient ``dX = dY W`` and the weight gradient
  ``dW = dY^T X``, each as large as the forward product (only the weight gradient when the input
  does not require a gradient, as for the images of a patch embedding).
- **Minimum HBM bytes** of one pass: read every input once and write every output once, at the
  tensor's element size. Intermediates a fused kernel keeps on chip (the attention scores, an
  MLP's hidden activation) are not counted, so the byte count is a floor that an unfused
  implementation cannot reach. A backward pass reads the output gradient(s) and the forward's
  inputs once and writes one gradient per input that requires one, plus the small per-row
  statistics a kernel saves (LayerNorm mean/rstd, attention log-sum-exp: fp32). ``fwd+bwd`` is the
  sum of the two passes.

The roofline floor of a kernel is ``max(flops / peak_flops, bytes / peak_bandwidth)``; the runner
reports the measured time against it as ``pct_of_ceiling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

__all__ = [
    "MODES",
    "TRAIN_MODE",
    "ALL_MODES",
    "Cost",
    "dtype_size",
    "gemm_flops",
    "linear_cost",
    "mlp_cost",
    "swiglu_mlp_cost",
    "attention_flops",
    "attention_cost",
    "layer_norm_cost",
    "add_layer_norm_cost",
    "patch_embed_cost",
    "ViTConfig",
    "VIT_CONFIGS",
    "vit_config",
    "vit_mac_breakdown",
    "vit_macs",
    "vit_flops",
    "vit_params",
    "vit_cost",
]

MODES = ("fwd", "fwd+bwd")
# A model-level setup's training step: forward, loss, backward and an optimizer step.
TRAIN_MODE = "train"
ALL_MODES = MODES + (TRAIN_MODE,)

_DTYPE_SIZES = {
    "fp64": 8, "float64": 8, "torch.float64": 8,
    "fp32": 4, "float32": 4, "torch.float32": 4,
    "tf32": 4,
    "fp16": 2, "float16": 2, "torch.float16": 2, "half": 2,
    "bf16": 2, "bfloat16": 2, "torch.bfloat16": 2,
    "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1,
}


def dtype_size(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (a torch.dtype or a name such as "bf16")."""
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    try:
        return _DTYPE_SIZES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_SIZES)}") from None


def _sizes(dtype: Any, residual_dtype: Any = None) -> tuple[int, int]:
    """Bytes per element of the operands and of the residual stream (the operands' dtype unless given)."""
    s = dtype_size(dtype)
    return s, dtype_size(residual_dtype) if residual_dtype is not None else s


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimum HBM bytes of one op call, per mode ("fwd" and "fwd+bwd")."""

    flops: Mapping[str, Optional[int]]
    bytes: Mapping[str, int]

    def flops_for(self, mode: str) -> Optional[int]:
        return self.flops[mode]

    def bytes_for(self, mode: str) -> int:
        return self.bytes[mode]


def _cost(fwd_flops: Optional[int], bwd_flops: Optional[int], fwd_bytes: int, bwd_bytes: int) -> Cost:
    total = None if fwd_flops is None else fwd_flops + (bwd_flops or 0)
    return Cost(
        flops={"fwd": fwd_flops, "fwd+bwd": total},
        bytes={"fwd": int(fwd_bytes), "fwd+bwd": int(fwd_bytes + bwd_bytes)},
    )


# ------------------------------------------------------------------------------------------------
# GEMM-shaped ops
# ------------------------------------------------------------------------------------------------


def gemm_flops(m: int, n: int, k: int) -> int:
    """FLOPs of ``(m, k) @ (k, n)``: 2*m*n*k."""
    return 2 * m * n * k


def linear_cost(
    m: int,
    k: int,
    n: int,
    dtype: Any,
    *,
    bias: bool = True,
    residual: bool = False,
    residual_dtype: Any = None,
    activation: Optional[str] = None,
) -> Cost:
    """``y = act(x @ W^T + b) [+ residual]``, x (m, k), W (n, k).

    fwd bytes: x, W, b, residual read; y written. bwd: reads dy, x, W (and the pre-activation,
    m*n, when there is an activation: its derivative needs it), writes dx, dW, db (dresidual is dy
    itself and needs no write).
    """
    s, rs = _sizes(dtype, residual_dtype)
    out_s = rs if residual else s
    fwd_flops = gemm_flops(m, n, k)
    fwd_bytes = (m * k + n * k + (n if bias else 0)) * s + (m * n * rs if residual else 0) + m * n * out_s
    bwd_bytes = (
        m * n * out_s  # dy
        + (m * k + n * k) * s  # x, W
        + (m * n * s if activation else 0)  # saved pre-activation
        + (m * k + n * k + (n if bias else 0)) * s  # dx, dW, db
    )
    return _cost(fwd_flops, 2 * fwd_flops, fwd_bytes, bwd_bytes)


def mlp_cost(
    m: int,
    k: int,
    hidden: int,
    n: int,
    dtype: Any,
    *,
    residual: bool = False,
    residual_dtype: Any = None,
) -> Cost:
    """``fc2(act(fc1(x)))`` [+ residual], x (m, k), fc1 (hidden, k), fc2 (n, hidden), with biases.

    FLOPs: two GEMMs, ``2*m*hidden*k + 2*m*n*hidden``. Minimum bytes do not include the hidden
    activation (m*hidden), which a fused MLP may keep on chip in the forward; the backward reads
    dy and the forward inputs and writes dx and the four parameter gradients (it must recompute
    or have saved the hidden activation: that traffic is the implementation's choice and is not
    counted).
    """
    s, rs = _sizes(dtype, residual_dtype)
    out_s = rs if residual else s
    fwd_flops = gemm_flops(m, hidden, k) + gemm_flops(m, n, hidden)
    params = (hidden * k + hidden + n * hidden + n) * s
    fwd_bytes = m * k * s + params + (m * n * rs if residual else 0) + m * n * out_s
    bwd_bytes = m * n * out_s + m * k * s + params + m * k * s + params
    return _cost(fwd_flops, 2 * fwd_flops, fwd_bytes, bwd_bytes)


def swiglu_mlp_cost(
    m: int,
    k: int,
    hidden: int,
    n: int,
    dtype: Any,
    *,
    residual: bool = False,
    residual_dtype: Any = None,
) -> Cost:
    """``fc2(silu(x @ Wg^T + bg) * (x @ Wv^T + bv))`` [+ residual], x (m, k), the gate and value
    weights (hidden, k) each (one packed (2 hidden, k) fc1 or two), fc2 (n, hidden), with biases.

    FLOPs: fc1 over both halves and fc2, ``2*m*(2 hidden)*k + 2*m*n*hidden``. Minimum bytes, as
    :func:`mlp_cost`, leave out the hidden activations (the (m, 2 hidden) fc1 output and the
    (m, hidden) gate output), which a fused MLP may keep on chip in the forward; what the
    backward reads of them is the implementation's choice and not counted.
    """
    s, rs = _sizes(dtype, residual_dtype)
    out_s = rs if residual else s
    fwd_flops = gemm_flops(m, 2 * hidden, k) + gemm_flops(m, n, hidden)
    params = (2 * hidden * k + 2 * hidden + n * hidden + n) * s
    fwd_bytes = m * k * s + params + (m * n * rs if residual else 0) + m * n * out_s
    bwd_bytes = m * n * out_s + m * k * s + params + m * k * s + params
    return _cost(fwd_flops, 2 * fwd_flops, fwd_bytes, bwd_bytes)


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------


def attention_flops(b: int, h: int, tq: int, tk: int, d: int, *, causal: bool = False) -> int:
    """Forward FLOPs: ``4*b*h*tq*tk*d`` (Q K^T and P V), halved for a causal mask."""
    flops = 4 * b * h * tq * tk * d
    return flops // 2 if causal else flops


def attention_cost(
    b: int,
    h: int,
    tq: int,
    tk: int,
    d: int,
    dtype: Any,
    *,
    h_kv: Optional[int] = None,
    causal: bool = False,
    return_lse: bool = False,
) -> Cost:
    """Flash attention, q (b, h, tq, d), k/v (b, h_kv, tk, d), o (b, h, tq, d).

    fwd bytes: q, k, v read, o written (and the fp32 LSE, b*h*tq, when it is returned). bwd bytes:
    q, k, v, o, do and the LSE read; dq, dk, dv written. The tq x tk scores never reach HBM.
    FLOPs: :func:`attention_flops` forward, 2.5x that backward.
    """
    s = dtype_size(dtype)
    h_kv = h if h_kv is None else h_kv
    q = b * h * tq * d
    kv = b * h_kv * tk * d
    lse = b * h * tq * 4
    fwd_flops = attention_flops(b, h, tq, tk, d, causal=causal)
    fwd_bytes = (q + 2 * kv + q) * s + (lse if return_lse else 0)
    bwd_bytes = (q + 2 * kv + q + q) * s + lse + (q + 2 * kv) * s
    return _cost(fwd_flops, int(2.5 * fwd_flops), fwd_bytes, bwd_bytes)


def attention_varlen_cost(lengths, h: int, d: int, dtype: Any, *, causal: bool = False) -> Cost:
    """Packed variable-length self-attention: :func:`attention_cost` of each sequence, summed (the
    FLOPs are the sequences' own, no padding; the bytes are linear in the total token count)."""
    costs = [attention_cost(1, h, n, n, d, dtype, causal=causal) for n in lengths if n > 0]
    return Cost(flops={m: sum(c.flops[m] for c in costs) for m in ("fwd", "fwd+bwd")},
                bytes={m: sum(c.bytes[m] for c in costs) for m in ("fwd", "fwd+bwd")})


# ------------------------------------------------------------------------------------------------
# Normalisation (memory bound: FLOPs are not counted)
# ------------------------------------------------------------------------------------------------


def layer_norm_cost(
    rows: int, width: int, dtype: Any, *, weight: bool = True, bias: bool = True, out_dtype: Any = None
) -> Cost:
    """LayerNorm over the last dim of a (rows, width) tensor.

    fwd bytes: x read, weight/bias read (width each), y written. bwd bytes: dy, x, weight and the
    fp32 mean/rstd (2 * rows * 4) read; dx, dweight, dbias written. FLOPs: None (memory bound).
    """
    s = dtype_size(dtype)
    os_ = dtype_size(out_dtype) if out_dtype is not None else s
    params = ((width if weight else 0) + (width if bias else 0)) * s
    fwd_bytes = rows * width * s + params + rows * width * os_
    bwd_bytes = (
        rows * width * os_ + rows * width * s + (width * s if weight else 0) + rows * 8 + rows * width * s + params
    )
    return _cost(None, None, fwd_bytes, bwd_bytes)


def add_layer_norm_cost(
    rows: int, width: int, dtype: Any, *, residual_dtype: Any = None, weight: bool = True, bias: bool = True
) -> Cost:
    """``s = x + residual; y = LayerNorm(s)``, returning both y and s.

    fwd bytes: x, residual, weight, bias read; y and s written. bwd bytes: dy, ds, s, weight and
    mean/rstd read; dx (dresidual equals dx: one write when the dtypes match), dweight, dbias
    written.
    """
    s, rs = _sizes(dtype, residual_dtype)
    e = rows * width
    params = ((width if weight else 0) + (width if bias else 0)) * s
    fwd_bytes = e * s + e * rs + params + e * s + e * rs
    bwd_bytes = e * s + e * rs + e * rs + (width * s if weight else 0) + rows * 8 + e * s + params
    return _cost(None, None, fwd_bytes, bwd_bytes)


# ------------------------------------------------------------------------------------------------
# Patch embedding
# ------------------------------------------------------------------------------------------------


def patch_embed_cost(
    b: int,
    c: int,
    img_h: int,
    img_w: int,
    patch: int,
    dim: int,
    dtype: Any,
    *,
    bias: bool = True,
    pos_embed: bool = True,
    prefix_tokens: int = 0,
    images_require_grad: bool = False,
) -> Cost:
    """Patchify + GEMM (+ bias + pos_embed, prefix tokens written in place): images (b, c, H, W),
    weight (dim, c, p, p) -> (b, prefix + n, dim) with n = (H/p) * (W/p).

    FLOPs: the GEMM ``2 * (b*n) * dim * (c*p*p)``; backward is the weight gradient only (1x) unless
    the images require a gradient (2x). fwd bytes: images, weight, bias, pos_embed ((prefix + n) x
    dim) and prefix tokens read, output written. bwd bytes: dy, images, (weight if the images need a
    gradient) read; dweight, dbias, dpos_embed, dprefix (and dimages) written.
    """
    s = dtype_size(dtype)
    n = (img_h // patch) * (img_w // patch)
    k = c * patch * patch
    t = prefix_tokens + n
    fwd_flops = gemm_flops(b * n, dim, k)
    params = dim * k + (dim if bias else 0) + (t * dim if pos_embed else 0) + prefix_tokens * dim
    images = b * c * img_h * img_w
    out = b * t * dim
    fwd_bytes = (images + params + out) * s
    bwd_bytes = (
        out + images + (dim * k if images_require_grad else 0) + params + (images if images_require_grad else 0)
    ) * s
    bwd_flops = fwd_flops * (2 if images_require_grad else 1)
    return _cost(fwd_flops, bwd_flops, fwd_bytes, bwd_bytes)


# ------------------------------------------------------------------------------------------------
# A whole ViT forward
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    """The architecture numbers that decide a ViT's FLOPs."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3
    num_classes: int = 1000
    class_token: bool = True
    reg_tokens: int = 0
    global_pool: str = "token"  # "token" (class token) or "avg": either way one vector per image reaches the head

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny_patch16": ViTConfig(16, 192, 12, 3),
    "vit_small_patch16": ViTConfig(16, 384, 12, 6),
    "vit_base_patch16": ViTConfig(16, 768, 12, 12),
    "vit_base_patch32": ViTConfig(32, 768, 12, 12),
    "vit_large_patch16": ViTConfig(16, 1024, 24, 16),
    "vit_large_patch14": ViTConfig(14, 1024, 24, 16),
    "vit_huge_patch14": ViTConfig(14, 1280, 32, 16),
}


def vit_config(config: Union[str, ViTConfig, Mapping[str, Any], Any]) -> ViTConfig:
    """A :class:`ViTConfig` from a name ("vit_base_patch16", optionally with an "_224" suffix), a
    mapping, or any object with the same attribute names (e.g. a model's config)."""
    if isinstance(config, ViTConfig):
        return config
    if isinstance(config, str):
        name = config
        for suffix in ("_224", "_384", "_448", "_518"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if name not in VIT_CONFIGS:
            raise ValueError(f"unknown ViT config {config!r}; known: {sorted(VIT_CONFIGS)}")
        return VIT_CONFIGS[name]
    fields = ViTConfig.__dataclass_fields__
    if isinstance(config, Mapping):
        values = {k: v for k, v in config.items() if k in fields}
    else:
        values = {k: getattr(config, k) for k in fields if hasattr(config, k)}
    missing = [k for k in ("patch_size", "embed_dim", "depth", "num_heads") if k not in values]
    if missing:
        raise ValueError(f"ViT config {config!r} lacks {missing}")
    return ViTConfig(**values)


def vit_mac_breakdown(config, img_size: Union[int, tuple[int, int]] = 224, batch: int = 1) -> dict[str, int]:
    """Multiply-accumulates of one ViT forward, by component, for ``batch`` images.

    - ``patch_embed``: the (N, C*P*P) @ (C*P*P, D) GEMM, N = (H/P)(W/P) patches.
    - per block, T = N + prefix tokens: ``qkv`` T*D*3D, ``proj`` T*D*D, ``fc1`` T*D*hidden,
      ``fc2`` T*hidden*D, and ``attention`` 2*T*T*D (Q K^T and P V over all heads: H*T*T*d each,
      H*d = D); each multiplied by depth.
    - ``head``: one pooled vector per image, D * num_classes.
    LayerNorm, softmax, GELU, bias and residual arithmetic are not counted (see the module notes).
    """
    cfg = vit_config(config)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {cfg.patch_size}")
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    t = n + cfg.num_prefix_tokens
    d, hid, depth = cfg.embed_dim, cfg.mlp_hidden, cfg.depth
    k = cfg.in_chans * cfg.patch_size * cfg.patch_size
    parts = {
        "patch_embed": n * k * d,
        "qkv": depth * t * d * 3 * d,
        "attention": depth * 2 * t * t * d,
        "proj": depth * t * d * d,
        "fc1": depth * t * d * hid,
        "fc2": depth * t * hid * d,
        "head": d * cfg.num_classes,
    }
    return {name: batch * macs for name, macs in parts.items()}


def vit_macs(config, img_size: Union[int, tuple[int, int]] = 224, batch: int = 1) -> int:
    """Total multiply-accumulates of a ViT forward (see :func:`vit_mac_breakdown`)."""
    return sum(vit_mac_breakdown(config, img_size, batch).values())


def vit_flops(config, img_size: Union[int, tuple[int, int]] = 224, batch: int = 1) -> int:
    """FLOPs of a ViT forward: 2 x :func:`vit_macs`. ViT-B/16 at 224: 35.13 GFLOP per image."""
    return 2 * vit_macs(config, img_size, batch)


def vit_params(config, img_size: Union[int, tuple[int, int]] = 224) -> int:
    """Parameter count of a ViT (timm's layout: patch projection with bias, class/register tokens,
    a learned position embedding over the patches and the class token, two LayerNorms per block,
    qkv/proj/fc1/fc2 with biases, the final norm and the head)."""
    cfg = vit_config(config)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    d, hid = cfg.embed_dim, cfg.mlp_hidden
    k = cfg.in_chans * cfg.patch_size * cfg.patch_size
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (hid * d + hid) + (d * hid + d)
    head = d * cfg.num_classes + cfg.num_classes if cfg.num_classes else 0
    return d * k + d + cfg.num_prefix_tokens * d + (n + int(cfg.class_token)) * d + cfg.depth * block + 2 * d + head


def vit_cost(
    config,
    img_size: Union[int, tuple[int, int]] = 224,
    batch: int = 1,
    dtype: Any = "bf16",
    *,
    param_dtype: Any = None,
    num_params: Optional[int] = None,
) -> Cost:
    """A whole ViT on ``batch`` images, per mode: "fwd" (inference), "fwd+bwd", and "train"
    (forward, backward and an AdamW step).

    FLOPs: "fwd" is :func:`vit_flops`. The backward is 2x every GEMM (data and weight gradients)
    except the patch embedding (weight gradient only: the images need none) and 2.5x attention.
    "train" adds nothing for the optimizer (O(params) elementwise work).
    Bytes, a floor that leaves the activations out (the model is compute bound at these shapes):
    the forward reads the weights (``param_dtype``, default ``dtype``) and the images
    (``param_dtype``) and writes the logits (``dtype``); the backward reads the logits' gradient
    and the weights and writes the weights' gradients; the AdamW step reads weights, gradients and
    both moments and writes weights and moments (7 tensors of ``num_params``, default
    :func:`vit_params`).
    """
    cfg = vit_config(config)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    parts = vit_mac_breakdown(cfg, (h, w), batch)
    fwd_flops = 2 * sum(parts.values())
    bwd_flops = 2 * (
        2 * (sum(parts.values()) - parts["patch_embed"] - parts["attention"]) + parts["patch_embed"]
    ) + int(2 * 2.5 * parts["attention"])
    s, ps = dtype_size(dtype), dtype_size(param_dtype if param_dtype is not None else dtype)
    p = vit_params(cfg, (h, w)) if num_params is None else num_params
    logits = batch * (cfg.num_classes or cfg.embed_dim)  # pooled features when there is no head
    fwd_bytes = p * ps + batch * cfg.in_chans * h * w * ps + logits * s
    bwd_bytes = logits * s + 2 * p * ps
    return Cost(
        flops={"fwd": fwd_flops, "fwd+bwd": fwd_flops + bwd_flops, TRAIN_MODE: fwd_flops + bwd_flops},
        bytes={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes, TRAIN_MODE: fwd_bytes + bwd_bytes + 7 * p * ps},
    )
