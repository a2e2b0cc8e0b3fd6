"""Weight conversion into :class:`vitkern.models.vit.ViT`.

Sources: timm ``VisionTransformer`` models, ``torchvision.models.VisionTransformer``, Hugging Face
``ViTModel`` / ``ViTForImageClassification`` (transformers 5.x names, and the 4.x names
``encoder.layer.N.attention.attention.query`` ...), the original google-research/vision_transformer
``.npz`` checkpoints (JAX layout), and safetensors files. Nothing here unpickles data:
``np.load(allow_pickle=False)``, safetensors, ``torch.load(weights_only=True)``.

The ViT's state_dict keys are timm's, so every converter produces a timm-format state_dict.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from vitkern.models.vit import CONFIG_KEYS, ViT
from vitkern.nn.linear import resolve_activation
from vitkern.ops.activation import Activation

__all__ = [
    "timm_config",
    "from_timm",
    "torchvision_config",
    "convert_torchvision_state_dict",
    "from_torchvision",
    "hf_config",
    "convert_hf_state_dict",
    "from_hf",
    "npz_config",
    "load_npz",
    "from_npz",
    "save_safetensors",
    "load_safetensors",
    "load_checkpoint",
]


def _mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio r with ``int(dim * r) == hidden`` (how the blocks size their MLP)."""
    r = hidden / dim
    if int(dim * r) != hidden:
        r = (hidden + 0.5) / dim
    return r


def _img_size(size) -> Any:
    if isinstance(size, (tuple, list)):
        h, w = int(size[0]), int(size[1])
        return h if h == w else (h, w)
    return int(size)


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()))
    return p.device, p.dtype


def _build(config: Dict[str, Any], state_dict: Mapping[str, torch.Tensor], device, dtype) -> ViT:
    model = ViT(**config, weight_init="skip", device=device, dtype=dtype)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} converted, {tuple(own[k].shape)} in the ViT"
             for k in sorted(set(own) & set(state_dict)) if state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"converted weights do not fit the inferred ViT config {config}: missing {missing}, "
            f"unexpected (not mapped to the ViT) {unexpected}" + (f", shapes differ: {wrong}" if wrong else "")
        )
    model.load_state_dict(state_dict)
    return model


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------


# VisionTransformer's methods on the forward path: a subclass that overrides one computes something
# else than the config describes.
_TIMM_FORWARD_METHODS = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")


def _check_timm_class(model: nn.Module) -> None:
    """Only timm's ``VisionTransformer`` (or a subclass keeping its forward) converts; every other
    class is refused by name."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.deit import VisionTransformerDistilled

    cls = type(model)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls is VisionTransformerDistilled:
        return  # the distilled DeiT: distilled=True
    if getattr(model, "dist_token", None) is not None or hasattr(model, "head_dist"):
        raise ValueError(
            f"ViT.from_timm: {name} has a distillation token or head but is not timm's "
            "VisionTransformerDistilled; it is not supported"
        )
    if not isinstance(model, VisionTransformer):
        if cls.__name__ == "Eva" and cls.__module__.startswith("timm."):
            raise ValueError(f"ViT.from_timm: {name} is timm's EVA family: convert it with "
                             "vitkern.models.Eva.from_timm")
        if cls.__name__ == "NaFlexVit" and cls.__module__.startswith("timm."):
            raise ValueError(f"ViT.from_timm: {name} is timm's NaFlex ViT: convert it with "
                             "vitkern.NaFlexViT.from_timm")
        raise ValueError(
            f"ViT.from_timm: {name} is not supported: only timm.models.vision_transformer."
            "VisionTransformer converts (Beit, VisionTransformerRelPos and the other ViT variants are "
            "other architectures; timm's Eva converts with vitkern.models.Eva.from_timm, NaFlexVit with "
            "vitkern.NaFlexViT.from_timm)"
        )
    overridden = [m for m in _TIMM_FORWARD_METHODS if getattr(cls, m, None) is not getattr(VisionTransformer, m, None)]
    if overridden:
        raise ValueError(
            f"ViT.from_timm: {name} overrides VisionTransformer's {', '.join(overridden)}, so its forward "
            "is not the one the converted config computes; it is not supported"
        )


def _is_timm_swiglu_packed(mlp: nn.Module) -> bool:
    """timm's ``SwiGLUPacked`` (a ``GluMlp`` with SiLU, gate first, no hidden norm, linear layers):
    the MLP of DINOv2 giant."""
    from timm.layers import GluMlp

    if type(mlp) is not GluMlp:
        return False
    if mlp.gate_last or not isinstance(mlp.act, nn.SiLU) or not isinstance(mlp.norm, nn.Identity) \
            or not isinstance(mlp.fc1, nn.Linear):
        raise ValueError("ViT.from_timm: a GluMlp other than SwiGLUPacked (SiLU, gate first, no hidden norm) "
                         "is not supported")
    return True


def _check_timm_attn_pool(model: nn.Module, pool: nn.Module) -> None:
    """timm's ``attn_pool`` converts when it is SigLIP's MAP head as timm's ViT builds it for
    ``global_pool="map"``: an ``AttentionPoolLatent`` with one latent query, a query projection,
    no qk-norm or position embedding, the blocks' head count and MLP ratio, token pooling. Anything
    else (timm's "prr" pooling, a modified head) is refused naming what differs."""
    from timm.layers import Mlp as TimmMlp

    def unsupported(what: str):
        return ValueError(f"ViT.from_timm: {what} is not supported")

    kind = type(pool).__name__
    if kind != "AttentionPoolLatent" or model.global_pool != "map":
        raise unsupported(f"global_pool={model.global_pool!r} ({kind} attention pooling; only SigLIP's MAP head, "
                          "AttentionPoolLatent, converts)")
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads if len(model.blocks) else pool.num_heads
    problems = []
    if pool.latent_len != 1 or pool.latent_dim != dim:
        problems.append(f"latent_len {pool.latent_len} / latent_dim {pool.latent_dim} (1 and embed_dim expected)")
    if not isinstance(pool.q, nn.Linear) or not isinstance(pool.kv, nn.Linear):
        problems.append("no query projection")
    if not (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)):
        problems.append("qk-norm")
    if pool.pos_embed is not None:
        problems.append("a position embedding")
    if pool.pool != "token":
        problems.append(f"pool_type {pool.pool!r}")
    if pool.num_heads != heads:
        problems.append(f"{pool.num_heads} heads (the blocks have {heads})")
    if getattr(pool, "mlp", None) is None or type(pool.mlp) is not TimmMlp or not isinstance(pool.proj, nn.Linear):
        problems.append("no output projection / MLP (out_features=0) or another MLP type")
    elif len(model.blocks) and pool.mlp.fc1.out_features != model.blocks[0].mlp.fc1.out_features:
        problems.append("an MLP width other than the blocks'")
    if (pool.q.bias is None if isinstance(pool.q, nn.Linear) else False) or pool.kv.bias is None:
        problems.append("q / kv without bias")
    if problems:
        raise unsupported(f"an attention-pooling head ({kind}) with " + "; ".join(problems))


def timm_config(model: nn.Module) -> Dict[str, Any]:
    """ViT constructor keywords equivalent to a timm ``VisionTransformer``.

    SigLIP's MAP head (``global_pool="map"``) converts to ``attn_pool``; QuickGELU (the
    ``*_clip_quickgelu_*`` models) to ``act="quick_gelu"``. Raises ``ValueError`` for features this
    ViT does not implement (other attention pooling, custom block or MLP types, non-LayerNorm
    norms, patch-embed norms, activations the epilogues do not compute, a head-dim override)
    and for model classes other than ``VisionTransformer`` (Eva, Beit, VisionTransformerRelPos,
    NaFlexVit, a subclass overriding the forward; the distilled DeiT converts), naming the class.
    """
    from timm.layers import Attention as TimmAttention, LayerScale as TimmLayerScale, Mlp as TimmMlp
    from timm.models.vision_transformer import Block as TimmBlock

    def unsupported(what: str):
        return ValueError(f"ViT.from_timm: {what} is not supported")

    _check_timm_class(model)
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        _check_timm_attn_pool(model, attn_pool)
    pe = model.patch_embed
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
        raise unsupported("a norm layer in the patch embedding")
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or hasattr(pe, "backbone"):
        raise unsupported(f"{type(model).__name__} with {type(pe).__name__}: a hybrid (CNN stem) or non-conv "
                          "patch embedding")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        warnings.warn("ViT.from_timm: patch dropout (patch_drop_rate) is not supported and is dropped", stacklevel=3)
    blocks = list(model.blocks)
    depth = len(blocks)
    dim = model.embed_dim
    cfg: Dict[str, Any] = dict(
        img_size=_img_size(pe.img_size),
        patch_size=_img_size(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        global_pool=model.global_pool,
        embed_dim=dim,
        depth=depth,
        class_token=model.cls_token is not None,
        pos_embed="learn" if model.pos_embed is not None else "none",
        no_embed_class=bool(model.no_embed_class),
        reg_tokens=int(model.num_reg_tokens),
        distilled=getattr(model, "dist_token", None) is not None,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_size=bool(model.dynamic_img_size),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        drop_rate=float(model.head_drop.p),
        pos_drop_rate=float(model.pos_drop.p),
    )
    cfg["final_norm"] = cfg["fc_norm"] or not isinstance(model.norm, nn.Identity)
    norms = [m for m in (model.norm, model.fc_norm, model.norm_pre) if not isinstance(m, nn.Identity)]
    if depth:
        b = blocks[0]
        if type(b) is not TimmBlock:
            raise unsupported(f"block type {type(b).__name__}")
        if type(b.attn) is not TimmAttention or getattr(b.attn, "gate", None) is not None:
            raise unsupported(f"attention type {type(b.attn).__name__}")
        if b.attn.head_dim * b.attn.num_heads != dim or b.attn.proj.out_features != dim:
            raise unsupported("an attention head dim or output dim other than embed_dim / num_heads")
        swiglu = _is_timm_swiglu_packed(b.mlp)
        if type(b.mlp) is not TimmMlp and not swiglu:
            raise unsupported(f"MLP type {type(b.mlp).__name__}")
        if (
            (b.mlp.fc1.bias is None) != (b.attn.proj.bias is None)
            or (b.mlp.fc2.bias is None) != (b.attn.proj.bias is None)
        ):
            raise unsupported("MLP biases that differ from the attention projection's")
        cfg.update(
            num_heads=b.attn.num_heads,
            mlp_ratio=_mlp_ratio(dim, b.mlp.fc1.out_features),
            qkv_bias=b.attn.qkv.bias is not None,
            qk_norm=not isinstance(b.attn.q_norm, nn.Identity),
            scale_attn_norm=not isinstance(b.attn.norm, nn.Identity),
            scale_mlp_norm=not isinstance(b.mlp.norm, nn.Identity) and not swiglu,
            proj_bias=b.attn.proj.bias is not None,
            init_values=float(b.ls1.init_values) if isinstance(b.ls1, TimmLayerScale) else None,
            proj_drop_rate=float(b.attn.proj_drop.p),
            attn_drop_rate=float(b.attn.attn_drop.p),
            act="gelu" if swiglu else resolve_activation(b.mlp.act),  # SwiGLU's SiLU gate is not `act`
        )
        if swiglu:
            cfg["mlp_layer"] = "swiglu_packed"
        last = blocks[-1].drop_path1
        cfg["drop_path_rate"] = float(getattr(last, "drop_prob", 0.0))
        for blk in blocks:
            norms += [blk.norm1, blk.norm2]
            inner = (blk.attn.q_norm, blk.attn.k_norm, blk.attn.norm, blk.mlp.norm)
            norms += [m for m in inner if not isinstance(m, nn.Identity)]
    else:
        cfg.update(num_heads=1)
    if attn_pool is not None:
        norms.append(attn_pool.norm)
        if depth and resolve_activation(attn_pool.mlp.act) != cfg["act"]:
            raise unsupported("an attention-pooling MLP activation other than the blocks'")
    for m in norms:
        if not isinstance(m, nn.LayerNorm):
            raise unsupported(f"norm layer {type(m).__name__} (LayerNorm only)")
    if norms:
        eps = {float(m.eps) for m in norms}
        if len(eps) > 1:
            raise unsupported(f"LayerNorms with different eps {sorted(eps)}")
        cfg["norm_eps"] = eps.pop()
    return cfg


def from_timm(model: nn.Module, **overrides) -> ViT:
    """A ViT with the config and weights of a timm ``VisionTransformer`` (same device and dtype).

    Every entry of the source's state_dict must map to the ViT (an extra parameter or buffer raises
    ``ValueError`` naming it). The source's ``pretrained_cfg`` (input size, interpolation, mean,
    std, crop) is kept, copied, as ``pretrained_cfg`` with timm's ``default_cfg`` alias, so
    ``timm.data.resolve_model_data_config`` gives the same preprocessing for both models.
    """
    cfg = timm_config(model)
    cfg.update(overrides)
    device, dtype = _param_device_dtype(model)
    out = _build(cfg, model.state_dict(), device, dtype)
    out.train(model.training)
    out.distilled_training = bool(getattr(model, "distilled_training", False))
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, Mapping):
        out.pretrained_cfg = copy.deepcopy(dict(pretrained_cfg))
        out.default_cfg = out.pretrained_cfg
    return out


# ----------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------


def torchvision_config(model: nn.Module) -> Dict[str, Any]:
    """ViT constructor keywords equivalent to a ``torchvision.models.VisionTransformer``."""
    if not isinstance(getattr(model, "conv_proj", None), nn.Conv2d):
        raise ValueError("ViT.from_torchvision: conv-stem patch embeddings (conv_stem_configs) are not supported")
    if "pre_logits" in dict(model.heads.named_children()):
        raise ValueError("ViT.from_torchvision: a representation layer (representation_size) is not supported")
    layers = list(model.encoder.layers)
    head = model.heads.head
    cfg: Dict[str, Any] = dict(
        img_size=int(model.image_size),
        patch_size=int(model.patch_size),
        in_chans=model.conv_proj.in_channels,
        num_classes=head.out_features,
        global_pool="token",
        embed_dim=int(model.hidden_dim),
        depth=len(layers),
        num_heads=int(layers[0].num_heads) if layers else 1,
        mlp_ratio=_mlp_ratio(int(model.hidden_dim), int(model.mlp_dim)),
        qkv_bias=True,
        class_token=True,
        attn_drop_rate=float(getattr(model, "attention_dropout", 0.0)),
        norm_eps=float(model.encoder.ln.eps),
        act="gelu",
    )
    return cfg


_TV_BLOCK = {
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1",  # torchvision's old MLPBlock names
    "mlp.linear_2": "mlp.fc2",
}


def convert_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision ``VisionTransformer`` state_dict -> timm/vitkern keys."""
    out: Dict[str, torch.Tensor] = {}
    block_re = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
    for key, value in state_dict.items():
        if key == "class_token":
            out["cls_token"] = value
        elif key == "encoder.pos_embedding":
            out["pos_embed"] = value
        elif key.startswith("conv_proj."):
            out["patch_embed.proj." + key[len("conv_proj.") :]] = value
        elif key.startswith("encoder.ln."):
            out["norm." + key[len("encoder.ln.") :]] = value
        elif key.startswith("heads.head."):
            out["head." + key[len("heads.head.") :]] = value
        else:
            m = block_re.match(key)
            if m is None:
                raise ValueError(f"unexpected torchvision ViT key {key!r}")
            i, rest = m.groups()
            for src, dst in _TV_BLOCK.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = value
                    break
            else:
                raise ValueError(f"unexpected torchvision ViT key {key!r}")
    return out


def from_torchvision(model: nn.Module, **overrides) -> ViT:
    """A ViT with the config and weights of a ``torchvision.models.VisionTransformer``."""
    cfg = torchvision_config(model)
    cfg.update(overrides)
    device, dtype = _param_device_dtype(model)
    out = _build(cfg, convert_torchvision_state_dict(model.state_dict()), device, dtype)
    out.train(model.training)
    return out


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers
# ----------------------------------------------------------------------------------------------


def _hf_activation(act) -> str:
    """``hidden_act`` as the ViT's ``act``: one of the names :class:`Activation` knows (Hugging
    Face's "gelu" is the erf GELU; "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" the tanh one;
    "quick_gelu" OpenAI CLIP's)."""
    try:
        parsed = Activation.resolve(act) if isinstance(act, str) else Activation.NONE
    except ValueError:
        parsed = Activation.NONE
    if parsed is Activation.NONE:
        raise ValueError(f"ViT.from_hf: hidden_act {act!r} is not supported (a GELU: 'gelu', 'gelu_new', "
                         "'gelu_pytorch_tanh' or 'gelu_fast', or 'quick_gelu')")
    return parsed.public_name


# The Hugging Face vision encoders from_hf converts, by config.model_type. Each maps onto a ViT
# configuration: ViT / ViT-MSN (class token), DeiT (class and distillation tokens), DINOv2
# (LayerScale; with registers: register tokens outside the position embedding), CLIP (pre-norm,
# the post-norm on the pooled class token only: fc_norm) and SigLIP (no class token, the MAP head).
_HF_FAMILIES = ("vit", "vit_msn", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model",
                "siglip_vision_model")

# Classes refused by name: their forward is not one the converted ViT computes.
_HF_REFUSED = {
    "DeiTForImageClassification": "its classifier reads the class token only, next to a distillation "
                                  "token (the ViT's distilled head averages two heads, as timm's and "
                                  "DeiTForImageClassificationWithTeacher); convert its .deit (a DeiTModel)",
    "Dinov2ForImageClassification": "its classifier reads the class token and the mean patch token "
                                    "concatenated; convert its .dinov2 (a Dinov2Model)",
    "Dinov2WithRegistersForImageClassification": "its classifier reads the class token and the mean "
                                                 "patch token concatenated; convert its .dinov2_with_registers",
    "CLIPVisionModelWithProjection": "the projection (visual_projection, no bias) is not the ViT's head; "
                                     "convert its .vision_model",
}


def _hf_family(config, model=None) -> str:
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
        lambda k, d=None: getattr(config, k, d))
    family = get("model_type") or "vit"  # a bare dict of ViT keys
    if model is not None and type(model).__name__ in _HF_REFUSED:
        raise ValueError(f"ViT.from_hf: {type(model).__name__} is not supported: {_HF_REFUSED[type(model).__name__]}")
    if family not in _HF_FAMILIES:
        name = type(model).__name__ if model is not None else type(config).__name__
        hint = ""
        if family.startswith("siglip2"):
            hint = " (SigLIP2's NaFlex towers take flattened variable-size patches: convert them with " \
                   "vitkern.NaFlexViT.from_hf; timm's fixed-size vit_*_siglip2_* models convert with from_timm)"
        elif family in ("clip", "siglip"):
            hint = " (convert the image tower: model.vision_model)"
        raise ValueError(f"ViT.from_hf: {name} (model_type {family!r}) is not supported{hint}; supported: "
                         f"{', '.join(_HF_FAMILIES)}")
    return family


def hf_config(config, num_classes: Optional[int] = None, family: Optional[str] = None) -> Dict[str, Any]:
    """ViT constructor keywords for a Hugging Face vision config (object or dict): ``ViTConfig``,
    ``DeiTConfig``, ``Dinov2Config``, ``Dinov2WithRegistersConfig``, ``CLIPVisionConfig``,
    ``SiglipVisionConfig`` (``family``, the ``model_type``, defaults to the config's).

    ``hidden_act`` "gelu" is the erf GELU; "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" the tanh
    approximation; "quick_gelu" CLIP's. ``num_classes`` defaults to ``num_labels`` (pass 0 for a
    ``ViTModel``). ``attention_probs_dropout_prob`` / ``attention_dropout`` becomes
    ``attn_drop_rate``; ``hidden_dropout_prob`` (applied after each branch in HF) has no exact
    counterpart and is not carried over. The position embedding resamples as
    ``interpolate_pos_encoding=True`` does (bicubic to the new grid size without antialias:
    ``pos_embed_antialias=False``) when the model runs with ``dynamic_img_size=True`` (a keyword of
    :func:`from_hf`; DINOv2, which always interpolates, sets it) or after ``set_input_size``.
    """
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (
        lambda k, d=None: getattr(config, k, d)
    )
    family = family or get("model_type") or "vit"
    swiglu = family.startswith("dinov2") and bool(get("use_swiglu_ffn", False))
    act = "gelu" if swiglu else _hf_activation(get("hidden_act", "gelu"))  # SwiGLU: SiLU, not `act`
    dim = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    if get("head_dim") is not None and int(get("head_dim")) * heads != dim:
        raise ValueError("ViT.from_hf: head_dim * num_attention_heads must equal hidden_size")
    if num_classes is None:
        labels = get("num_labels")
        if labels is None:
            id2label = get("id2label")
            labels = len(id2label) if id2label else 0
        num_classes = int(labels)
    if swiglu:
        # Dinov2SwiGLUFFN keeps two thirds of the hidden width, rounded up to a multiple of 8; the
        # packed fc1 holds the gate and the value halves (timm's SwiGLUPacked)
        hidden = 2 * ((int(int(dim * float(get("mlp_ratio", 4))) * 2 / 3) + 7) // 8 * 8)
    elif family.startswith("dinov2"):
        hidden = int(dim * float(get("mlp_ratio", 4)))
    else:
        hidden = int(get("intermediate_size"))
    patch = _img_size(get("patch_size"))
    cfg = dict(
        img_size=_img_size(get("image_size")),
        patch_size=patch,
        in_chans=int(get("num_channels", 3)),
        num_classes=num_classes,
        global_pool="token",
        embed_dim=dim,
        depth=int(get("num_hidden_layers")),
        num_heads=heads,
        mlp_ratio=_mlp_ratio(dim, hidden),
        qkv_bias=bool(get("qkv_bias", True)),
        class_token=True,
        attn_drop_rate=float(get("attention_probs_dropout_prob", get("attention_dropout", 0.0)) or 0.0),
        norm_eps=float(get("layer_norm_eps", 1e-12)),
        act=act,
        pos_embed_antialias=False,  # interpolate_pos_encoding: F.interpolate(size=, bicubic)
    )
    if family == "deit":
        cfg["distilled"] = True
    elif family.startswith("dinov2"):
        cfg.update(init_values=float(get("layerscale_value", 1.0)), dynamic_img_size=True)
        if swiglu:
            cfg["mlp_layer"] = "swiglu_packed"
        if family == "dinov2_with_registers":
            # timm's layout of these weights: the class token carries its position embedding, the
            # register tokens have none (no_embed_class)
            # and its interpolate_pos_encoding antialiases (Dinov2Model's does not)
            cfg.update(reg_tokens=int(get("num_register_tokens")), no_embed_class=True, pos_embed_antialias=True)
    elif family == "clip_vision_model":
        cfg.update(pre_norm=True, fc_norm=True)  # post_layernorm normalises the pooled class token only
    elif family == "siglip_vision_model":
        cfg.update(class_token=False, global_pool="map" if get("vision_use_head", True) else "avg", fc_norm=False)
    return cfg


# (key after the model's prefix) -> timm name, per family; keys outside the tables raise
_HF_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_EMBED_FAMILY = {
    "deit": {
        "embeddings.distillation_token": "dist_token",
        "cls_classifier.weight": "head.weight",
        "cls_classifier.bias": "head.bias",
        "distillation_classifier.weight": "head_dist.weight",
        "distillation_classifier.bias": "head_dist.bias",
    },
    "dinov2_with_registers": {"embeddings.register_tokens": "reg_token"},
    "clip_vision_model": {
        "embeddings.class_embedding": "cls_token",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.position_embedding.weight": "pos_embed",
        "pre_layrnorm.weight": "norm_pre.weight",
        "pre_layrnorm.bias": "norm_pre.bias",
        "post_layernorm.weight": "fc_norm.weight",
        "post_layernorm.bias": "fc_norm.bias",
    },
    "siglip_vision_model": {
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "embeddings.position_embedding.weight": "pos_embed",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
        "head.probe": "attn_pool.latent",
        "head.attention.out_proj.weight": "attn_pool.proj.weight",
        "head.attention.out_proj.bias": "attn_pool.proj.bias",
        "head.layernorm.weight": "attn_pool.norm.weight",
        "head.layernorm.bias": "attn_pool.norm.bias",
        "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
        "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
        "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
        "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
    },
}
_HF_LAYER = {
    # transformers 5.x (ViT, DeiT, DINOv2)
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    # CLIP / SigLIP
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    # transformers 4.x
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_QKV = {
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
    "self_attn.q_proj": 0,
    "self_attn.k_proj": 1,
    "self_attn.v_proj": 2,
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
}
# DINOv2's SwiGLU MLP: transformers 5.x gate / up / down, 4.x the packed weights_in / weights_out
_HF_SWIGLU = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.weights_in", "mlp.weights_out")
_HF_IGNORED = ("pooler.", "embeddings.mask_token")
_HF_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "vision_model.")


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor], family: str = "vit") -> Dict[str, torch.Tensor]:
    """A Hugging Face vision encoder's state_dict -> timm/vitkern keys (``family``: the config's
    ``model_type``, see :func:`hf_config`; transformers 5.x ``layers.N.attention.q_proj`` or 4.x
    ``encoder.layer.N.attention.attention.query`` names). The separate q/k/v projections are
    concatenated into ``qkv``; DINOv2's ``layer_scale{1,2}.lambda1`` become ``ls{1,2}.gamma``;
    SigLIP's head (``probe``, ``nn.MultiheadAttention``'s packed ``in_proj``, ``layernorm``,
    ``mlp``) becomes timm's ``attn_pool`` (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``);
    CLIP's ``class_embedding`` (D,) and the ``position_embedding`` tables gain their batch dims.
    The ``ViTModel`` pooler (dense + tanh) and the mask token are dropped; any other key raises
    ``ValueError`` naming it."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[int, torch.Tensor]] = {}
    swiglu: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    embed = dict(_HF_EMBED, **_HF_EMBED_FAMILY.get(family, {}))
    layer_re = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
    for key, value in state_dict.items():
        k = next((key[len(p):] for p in _HF_PREFIXES if key.startswith(p)), key)
        if k in embed:
            name = embed[k]
            if name == "cls_token" and value.dim() == 1:
                value = value.reshape(1, 1, -1)  # CLIP's class_embedding
            elif name == "pos_embed" and value.dim() == 2:
                value = value.unsqueeze(0)  # CLIP's / SigLIP's nn.Embedding table
            out[name] = value
            continue
        if family == "siglip_vision_model" and k in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            q, kv = value[: value.shape[0] // 3], value[value.shape[0] // 3 :]
            kind = k.rsplit("_", 1)[-1]
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = q, kv
            continue
        if k.startswith(_HF_IGNORED):
            continue
        m = layer_re.match(k)
        if m is None:
            raise ValueError(f"unexpected Hugging Face {family} key {key!r}")
        i, name, kind = m.groups()
        if name in _HF_SWIGLU and kind != "lambda1" and family.startswith("dinov2"):
            swiglu.setdefault((i, kind), {})[name] = value
        elif name in _HF_QKV and kind != "lambda1":
            qkv.setdefault((i, kind), {})[_HF_QKV[name]] = value
        elif name in ("layer_scale1", "layer_scale2") and kind == "lambda1" and family.startswith("dinov2"):
            out[f"blocks.{i}.{_HF_LAYER[name]}.gamma"] = value
        elif name in _HF_LAYER and kind != "lambda1" and not name.startswith("layer_scale"):
            out[f"blocks.{i}.{_HF_LAYER[name]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected Hugging Face {family} key {key!r}")
    for (i, kind), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"Hugging Face layer {i}: query/key/value {kind} incomplete")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for (i, kind), parts in swiglu.items():
        if "mlp.weights_in" in parts:  # 4.x: one packed projection, already the gate first
            out[f"blocks.{i}.mlp.fc1.{kind}"] = parts["mlp.weights_in"]
        elif "mlp.gate_proj" in parts and "mlp.up_proj" in parts:
            out[f"blocks.{i}.mlp.fc1.{kind}"] = torch.cat([parts["mlp.gate_proj"], parts["mlp.up_proj"]], dim=0)
        elif set(parts) & {"mlp.gate_proj", "mlp.up_proj"}:
            raise ValueError(f"Hugging Face layer {i}: SwiGLU gate_proj / up_proj {kind} incomplete")
        down = parts.get("mlp.down_proj", parts.get("mlp.weights_out"))
        if down is not None:
            out[f"blocks.{i}.mlp.fc2.{kind}"] = down
    if family == "dinov2_with_registers" and "cls_token" in out and "pos_embed" in out:
        # as timm's _convert_dinov2: the class token takes its position embedding along
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def from_hf(model, state_dict: Optional[Mapping[str, torch.Tensor]] = None, **overrides) -> ViT:
    """A ViT from a Hugging Face vision encoder: ``ViTModel`` / ``ViTForImageClassification`` /
    ``ViTMSNModel``, ``DeiTModel`` / ``DeiTForImageClassificationWithTeacher`` (the distilled ViT:
    two heads averaged), ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` and
    ``SiglipVisionModel`` (with its MAP head).

    ``model`` may also be a config (or its dict) when ``state_dict`` is given. A model without a
    classifier has ``num_classes=0``: ``forward_features`` equals its ``last_hidden_state`` (CLIP:
    before ``post_layernorm``, which is the ViT's fc_norm on the class token) and
    ``forward_head(x, pre_logits=True)`` its ``pooler_output`` for CLIP and SigLIP. The ViT pooler
    is dropped. Other classes are refused by name (``ValueError``): DeiT / DINOv2 classifiers
    whose head reads other tokens, SigLIP2's NaFlex towers, DINOv2 giant's SwiGLU MLP, and every
    model_type outside the list.
    """
    if isinstance(model, nn.Module):
        config = model.config
        family = _hf_family(config, model)
        sd = model.state_dict() if state_dict is None else state_dict
        device, dtype = _param_device_dtype(model)
        training = model.training
    else:
        if state_dict is None:
            raise ValueError("ViT.from_hf: pass a model, or a config together with state_dict=")
        config, sd = model, state_dict
        family = _hf_family(config)
        first = next(iter(sd.values()))
        device, dtype, training = first.device, first.dtype, False
    converted = convert_hf_state_dict(sd, family)
    num_classes = converted["head.weight"].shape[0] if "head.weight" in converted else 0
    cfg = hf_config(config, num_classes=num_classes, family=family)
    cfg.update(overrides)
    out = _build(cfg, converted, device, dtype)
    out.train(training)
    return out


# ----------------------------------------------------------------------------------------------
# Export: vitkern weights into another library's model
# ----------------------------------------------------------------------------------------------


def export_state_dict(
    state: Mapping[str, torch.Tensor],
    template: Mapping[str, torch.Tensor],
    convert,
    *,
    kept: Tuple[str, ...] = (),
    who: str = "export",
) -> Tuple[Dict[str, torch.Tensor], list]:
    """The inverse of an import converter, found by running it: ``state`` (timm / vitkern keys)
    laid out as ``template`` (the target library's state_dict: its keys, shapes and dtypes).

    Every element of ``template`` gets a unique integer id, ``convert`` (the importer:
    its state_dict -> timm keys) moves the ids, and each target element takes the value of the
    vitkern element its id landed on. So the export follows exactly what the import does (renames,
    q/k/v concatenation, packed projections, reshapes) in either naming the template uses. Target
    keys starting with ``kept`` (parts vitkern does not have: a pooler, a mask token) keep the
    template's values and are returned as the second item. Anything that does not map one to one
    (a target element no vitkern element takes, an id landing twice or combined arithmetically
    with another, a vitkern key the target lacks or of another shape) raises a ValueError naming
    it; nothing is returned partly.
    """
    kept_keys = [k for k in template if k.startswith(kept)] if kept else []
    mapped = [k for k in template if k not in kept_keys]
    total = sum(template[k].numel() for k in mapped)
    id_dtype = torch.int32 if total < 2**31 else torch.int64  # 4 bytes a parameter for every ViT but giants
    ids: Dict[str, torch.Tensor] = {}
    offset = 0
    for key in mapped:
        n = template[key].numel()
        ids[key] = torch.arange(offset, offset + n, dtype=id_dtype).reshape(template[key].shape)
        offset += n
    moved = convert(ids)
    missing = [k for k in moved if k not in state]
    unexpected = [k for k in state if k not in moved]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)}" for k, v in moved.items()
              if k in state and v.shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{who}: the target layout does not fit this model: target parameters with no source "
                         f"{missing}, model parameters the target lacks {unexpected}, shapes {shapes}")
    # One to one: every moved value is an id in range (a sum of two ids would be out of range, land
    # twice or leave an element unfilled) and each id lands once.
    counts = torch.zeros(offset, dtype=torch.int32)
    for v in moved.values():
        flat = v.reshape(-1).long()
        if flat.numel() and (flat.min() < 0 or flat.max() >= offset):
            raise ValueError(f"{who}: the importer combines elements arithmetically; it cannot be inverted")
        counts += torch.bincount(flat, minlength=offset).to(torch.int32)
    if (counts > 1).any():
        raise ValueError(f"{who}: one target element feeds several model elements; it cannot be inverted")
    unfilled = [k for k in mapped if (counts[ids[k].reshape(-1).long()] == 0).any()]
    if unfilled:
        raise ValueError(f"{who}: target parameters this model does not fill: {unfilled}")
    # every target element once, in one flat buffer per target dtype, then cut back into tensors
    buffers = {dt: torch.empty(offset, dtype=dt) for dt in {template[k].dtype for k in mapped}}
    for key, v in moved.items():
        src = state[key].detach().reshape(-1).cpu()
        index = v.reshape(-1).long()
        for buf in buffers.values():
            buf[index] = src.to(buf.dtype)
    out: Dict[str, torch.Tensor] = {}
    for key in mapped:
        t = template[key]
        out[key] = buffers[t.dtype][ids[key].reshape(-1).long()].reshape(t.shape).to(t.device)
    for key in kept_keys:
        out[key] = template[key]
    return out, kept_keys


def to_hf(model: ViT, hf_model: nn.Module) -> nn.Module:
    """Copy a ViT's weights into a Hugging Face vision encoder of the same configuration (a
    ``ViTModel`` / ``ViTForImageClassification``, ``DeiTModel`` / ``DeiTForImageClassificationWithTeacher``,
    ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` or ``SiglipVisionModel``, in
    its own naming): the inverse of :func:`from_hf`, so a fine-tuned vitkern model goes back to
    transformers. The parts vitkern does not have (the ``ViTModel`` pooler, the mask token) keep
    ``hf_model``'s values, with a warning naming them; a configuration that does not fit raises a
    ValueError naming the parameters, before anything is copied. Returns ``hf_model``."""
    if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
        raise ValueError(f"ViT.to_hf: expected a transformers model, got {type(hf_model).__name__}")
    family = _hf_family(hf_model.config, hf_model)
    template = hf_model.state_dict()
    folded = tuple(k for k in template if family == "dinov2_with_registers"
                   and k.endswith("embeddings.position_embeddings"))
    state, kept = _export_with_folded_rows(model.state_dict(), template, family, folded)
    if kept:
        warnings.warn(f"ViT.to_hf: {type(hf_model).__name__} parameters vitkern has no counterpart for keep their "
                      f"values: {kept}", stacklevel=3)
    hf_model.load_state_dict(state, strict=True)
    return hf_model


def _export_with_folded_rows(state, template, family, folded_tables):
    if not folded_tables:
        return export_state_dict(state, template, lambda sd: convert_hf_state_dict(sd, family),
                                 kept=_HF_IGNORED_EXPORT, who="ViT.to_hf")
    # DINOv2 with registers: convert folds the position table's first row (the class token's)
    # into the class token. Export the table without that row (the import sees a zero row there,
    # so the class token maps one to one), then put the zero row back in front: the sum the
    # import takes is the same.
    key = folded_tables[0]
    table = template[key]
    rest = {k: v for k, v in template.items() if k != key}
    rest[key] = table[:, 1:]

    def convert(sd):
        sd = dict(sd)
        sd[key] = torch.cat((torch.zeros_like(sd[key][:, :1]), sd[key]), dim=1)
        return convert_hf_state_dict(sd, family)

    out, kept = export_state_dict(state, rest, convert, kept=_HF_IGNORED_EXPORT, who="ViT.to_hf")
    out[key] = torch.cat((torch.zeros_like(table[:, :1]), out[key]), dim=1)
    return {k: out[k] for k in template}, kept


# what from_hf drops, which an export leaves as the target has it
_HF_IGNORED_EXPORT = tuple(p + i for p in ("",) + _HF_PREFIXES for i in _HF_IGNORED)


def to_torchvision(model: ViT, tv_model: nn.Module) -> nn.Module:
    """Copy a ViT's weights into a ``torchvision.models.VisionTransformer`` of the same
    configuration (the inverse of :func:`from_torchvision`); a configuration that does not fit
    raises a ValueError naming the parameters before anything is copied. Returns ``tv_model``."""
    state, _ = export_state_dict(model.state_dict(), tv_model.state_dict(), convert_torchvision_state_dict,
                                 who="ViT.to_torchvision")
    tv_model.load_state_dict(state, strict=True)
    return tv_model


# ----------------------------------------------------------------------------------------------
# Original JAX checkpoints (.npz)
# ----------------------------------------------------------------------------------------------

_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _open_npz(path):
    import numpy as np

    try:
        w = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a readable .npz checkpoint: {e}") from e
    if not isinstance(w, np.lib.npyio.NpzFile):
        raise ValueError(f"{os.fspath(path)!r} is not an .npz archive")
    return w


def _npz_prefix(w, prefix: Optional[str]) -> str:
    if prefix is not None:
        if f"{prefix}embedding/kernel" not in w.files:
            raise ValueError(f"no '{prefix}embedding/kernel' in the checkpoint")
        return prefix
    for p in _NPZ_PREFIXES:
        if f"{p}embedding/kernel" in w.files:
            return p
    raise ValueError("not a ViT .npz checkpoint: no 'embedding/kernel' array (JAX layout expected)")


class _NpzLayout:
    """Key names of the original (google-research/vision_transformer) and big_vision layouts."""

    def __init__(self, w, prefix: str):
        self.w, self.p = w, prefix
        self.used: set = set()
        self.big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in w.files or (
            f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w.files
        )
        self.stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w.files
        self.mha, self.mlp, self.ln2 = (0, 0, 1) if self.big_vision else (1, 3, 2)
        self.pos_key = (
            f"{prefix}pos_embedding" if self.big_vision else f"{prefix}Transformer/posembed_input/pos_embedding"
        )

    def has(self, key: str) -> bool:
        return f"{self.p}{key}" in self.w.files

    def get(self, key: str):
        full = f"{self.p}{key}"
        if full not in self.w.files:
            raise ValueError(f"the checkpoint has no array {full!r}, which this model needs")
        self.used.add(full)
        return self.w[full]

    def mark(self, *keys: str) -> None:
        """Count ``keys`` (relative to the prefix) as mapped: read, or dropped on purpose."""
        self.used.update(f"{self.p}{k}" for k in keys)

    def unmapped(self):
        """The arrays under the prefix that no read or :meth:`mark` accounted for, sorted."""
        return sorted(k for k in self.w.files if k.startswith(self.p) and k not in self.used)

    def depth(self) -> int:
        if self.stacked:
            return int(self.get("Transformer/encoderblock/LayerNorm_0/scale").shape[0])
        pat = re.compile(re.escape(self.p) + r"Transformer/encoderblock_(\d+)/")
        idx = {int(m.group(1)) for k in self.w.files for m in [pat.match(k)] if m}
        return max(idx) + 1 if idx else 0

    def block(self, i: int, key: str):
        if self.stacked:
            return self.get(f"Transformer/encoderblock/{key}")[i]
        return self.get(f"Transformer/encoderblock_{i}/{key}")

    def map_keys(self):
        """The arrays of a MAP (multihead attention pooling) head, as SigLIP's image towers have."""
        return sorted(k for k in self.w.files if k.startswith(f"{self.p}MAPHead_"))

    def refuse_map_head(self, model: ViT) -> None:
        """Refuse, by name and before anything is copied, a MAP head for a model without one:
        pooling otherwise would give other features and logits."""
        keys = self.map_keys()
        if keys and model.attn_pool is None:
            raise ValueError(
                f"the checkpoint has a MAP (attention pooling) head: {len(keys)} arrays under "
                f"{self.p}MAPHead_*, e.g. {keys[0]!r} (SigLIP's image towers have one), and the model "
                f"has none (global_pool={model.global_pool!r}); build it with global_pool='map' "
                "(ViT.from_npz infers it)"
            )
        if model.attn_pool is not None and not keys:
            raise ValueError(f"the model has a MAP head (global_pool='map') but the checkpoint has no "
                             f"{self.p}MAPHead_0 arrays")


# big_vision's MAPHead_0 arrays (relative to "MAPHead_0/")
_MAP_HEAD_ARRAYS = (
    ("probe",)
    + tuple(f"MultiHeadDotProductAttention_0/{n}/{p}"
            for n in ("query", "key", "value", "out") for p in ("kernel", "bias"))
    + ("LayerNorm_0/scale", "LayerNorm_0/bias")
    + tuple(f"MlpBlock_0/Dense_{r}/{p}" for r in (0, 1) for p in ("kernel", "bias"))
)


def _stage_map_head(pool: nn.Module, lay: "_NpzLayout", copy) -> None:
    """big_vision's ``MAPHead_0`` into timm's ``AttentionPoolLatent`` layout (timm's loader: the
    probe is the latent, query -> q, key and value concatenated -> kv, out -> proj)."""
    p = "MAPHead_0/"
    mha = p + "MultiHeadDotProductAttention_0/"
    copy(pool.latent, _t(lay.get(p + "probe"), False), p + "probe")
    copy(pool.q.weight, _t(lay.get(mha + "query/kernel"), False).flatten(1).T, mha + "query/kernel")
    copy(pool.q.bias, _t(lay.get(mha + "query/bias"), False).reshape(-1), mha + "query/bias")
    copy(pool.kv.weight, torch.cat([_t(lay.get(mha + f"{n}/kernel"), False).flatten(1).T for n in ("key", "value")]),
         mha + "key/value kernels")
    copy(pool.kv.bias, torch.cat([_t(lay.get(mha + f"{n}/bias"), False).reshape(-1) for n in ("key", "value")]),
         mha + "key/value biases")
    copy(pool.proj.weight, _t(lay.get(mha + "out/kernel")).flatten(1), mha + "out/kernel")
    copy(pool.proj.bias, _t(lay.get(mha + "out/bias")), mha + "out/bias")
    copy(pool.norm.weight, _t(lay.get(p + "LayerNorm_0/scale")), p + "LayerNorm_0/scale")
    copy(pool.norm.bias, _t(lay.get(p + "LayerNorm_0/bias")), p + "LayerNorm_0/bias")
    for r, fc in enumerate((pool.mlp.fc1, pool.mlp.fc2)):
        copy(fc.weight, _t(lay.get(p + f"MlpBlock_0/Dense_{r}/kernel")), p + f"MlpBlock_0/Dense_{r}/kernel")
        copy(fc.bias, _t(lay.get(p + f"MlpBlock_0/Dense_{r}/bias")), p + f"MlpBlock_0/Dense_{r}/bias")


def _t(a, transpose: bool = True) -> torch.Tensor:
    """timm's _n2p: numpy -> torch, HWIO -> OIHW / (in, out) -> (out, in) when ``transpose``."""
    import numpy as np

    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == a.shape[1] == a.shape[2] == 1:
        a = a.flatten()
    if transpose:
        if a.ndim == 4:
            a = a.transpose([3, 2, 0, 1])
        elif a.ndim == 3:
            a = a.transpose([2, 0, 1])
        elif a.ndim == 2:
            a = a.transpose([1, 0])
    return torch.from_numpy(np.ascontiguousarray(a))


def npz_config(path, prefix: Optional[str] = None) -> Dict[str, Any]:
    """ViT constructor keywords inferred from a JAX ``.npz`` checkpoint's arrays.

    The MLP activation defaults to "gelu_tanh" (``flax.linen.gelu``, what these checkpoints were
    trained with) and ``norm_eps`` to 1e-6 (flax's LayerNorm).
    """
    with _open_npz(path) as w:
        lay = _NpzLayout(w, _npz_prefix(w, prefix))
        kernel = lay.get("embedding/kernel")
        if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"embedding/kernel must be (P, P, C, D), got {kernel.shape}")
        patch, _, in_chans, dim = (int(s) for s in kernel.shape)
        depth = lay.depth()
        class_token = lay.has("cls")
        cfg: Dict[str, Any] = dict(
            patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth, class_token=class_token
        )
        if depth:
            q = lay.block(0, f"MultiHeadDotProductAttention_{lay.mha}/query/kernel")
            cfg["num_heads"] = int(q.shape[1])
            cfg["qkv_bias"] = lay.has(
                f"Transformer/encoderblock/MultiHeadDotProductAttention_{lay.mha}/query/bias"
                if lay.stacked
                else f"Transformer/encoderblock_0/MultiHeadDotProductAttention_{lay.mha}/query/bias"
            )
            hidden = lay.block(0, f"MlpBlock_{lay.mlp}/Dense_0/kernel").shape[-1]
            cfg["mlp_ratio"] = _mlp_ratio(dim, int(hidden))
        if w.files and lay.pos_key in w.files:
            n = int(w[lay.pos_key].reshape(-1, dim).shape[0])
            n_grid = n - (1 if class_token and n != int(math.isqrt(n)) ** 2 else 0)
            g = math.isqrt(n_grid)
            if g * g != n_grid:
                raise ValueError(f"cannot infer a square position grid from {n} position embeddings; pass img_size=")
            cfg["img_size"] = g * patch
            cfg["no_embed_class"] = class_token and n_grid == n
        else:
            cfg["pos_embed"] = "none"
        cfg["num_classes"] = int(lay.get("head/kernel").shape[-1]) if lay.has("head/kernel") else 0
        if lay.map_keys():
            if sorted(lay.map_keys()) != sorted(f"{lay.p}MAPHead_0/{k}" for k in _MAP_HEAD_ARRAYS):
                raise ValueError(f"the MAP head's arrays are not big_vision's MAPHead_0 (one head, its "
                                 f"{len(_MAP_HEAD_ARRAYS)} arrays): {lay.map_keys()[:8]}")
            cfg["global_pool"] = "map"  # SigLIP: the MAP head pools the normed patch tokens
        else:
            cfg["global_pool"] = "token" if class_token else "avg"
        cfg["fc_norm"] = False
        cfg["final_norm"] = lay.has("Transformer/encoder_norm/scale")
        cfg["act"] = "gelu_tanh"
        cfg["norm_eps"] = 1e-6
    return cfg


@torch.no_grad()
def load_npz(model: ViT, path, prefix: Optional[str] = None) -> ViT:
    """Load an original JAX ``.npz`` checkpoint into ``model`` (``np.load(allow_pickle=False)``).

    Follows timm's loader: q/k/v kernels concatenated into ``qkv``, a position embedding of another
    grid resampled (bilinear), the head loaded only when its class count matches (a warning
    otherwise; a model without a head drops it). Returns the model.

    Every array under the prefix must map to a parameter of the model: one that does not (a MAP
    head, a representation layer in front of a loaded head, an encoder norm or class token the
    model lacks) raises ``ValueError`` naming it, and nothing is loaded. Arrays outside the
    prefix (a text tower, optimizer state) are not the image model's and are not read.
    """
    from vitkern.ops.patch_embed import resample_pos_embed

    with _open_npz(path) as w:
        lay = _NpzLayout(w, _npz_prefix(w, prefix))
        lay.refuse_map_head(model)
        # Every array is read and checked first, and copied only when all of them fit: a failed
        # load leaves the model unchanged.
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []

        def copy(param: Optional[torch.Tensor], value: torch.Tensor, name: str) -> None:
            if param is None:
                raise ValueError(f"load_npz: the checkpoint has {name} but the model has no such parameter")
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"load_npz: {name} has shape {tuple(value.shape)} in the checkpoint, "
                    f"{tuple(param.shape)} in the model"
                )
            staged.append((param, value))

        if lay.depth() != len(model.blocks):
            raise ValueError(f"load_npz: the checkpoint has {lay.depth()} blocks, the model {len(model.blocks)}")

        pe = model.patch_embed.proj
        copy(pe.weight, _t(lay.get("embedding/kernel")), "embedding/kernel")
        if pe.bias is not None:
            copy(pe.bias, _t(lay.get("embedding/bias")), "embedding/bias")
        if model.cls_token is not None:
            copy(model.cls_token, _t(lay.get("cls"), False), "cls")
        if model.pos_embed is not None:
            lay.used.add(lay.pos_key)
            pos = _t(w[lay.pos_key], False)
            if pos.dim() == 2:
                pos = pos.unsqueeze(0)
            if tuple(pos.shape) != tuple(model.pos_embed.shape):
                pos = resample_pos_embed(
                    pos,
                    new_size=model.patch_embed.grid_size,
                    num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                    interpolation="bilinear",
                )
            copy(model.pos_embed, pos, "pos_embedding")
        if not isinstance(model.norm, nn.Identity):
            copy(model.norm.weight, _t(lay.get("Transformer/encoder_norm/scale")), "encoder_norm/scale")
            copy(model.norm.bias, _t(lay.get("Transformer/encoder_norm/bias")), "encoder_norm/bias")
        pre_logits = [k for k in ("pre_logits/kernel", "pre_logits/bias") if lay.has(k)]
        if lay.has("head/kernel") or lay.has("head/bias"):
            ckpt_classes = int(lay.get("head/kernel").shape[-1])
            if isinstance(model.head, nn.Linear) and model.head.out_features == ckpt_classes:
                if pre_logits:
                    raise ValueError(
                        "load_npz: the checkpoint has a representation layer (pre_logits: a dense layer "
                        "and tanh between the pooling and the head), which the ViT does not have; the "
                        "head would be applied to other features. Build the model with num_classes=0 "
                        "(or another class count) to drop the head and the representation layer"
                    )
                copy(model.head.weight, _t(lay.get("head/kernel")), "head/kernel")
                if model.head.bias is not None:
                    copy(model.head.bias, _t(lay.get("head/bias")), "head/bias")
            else:
                # The classifier (and the representation layer before it) is dropped on purpose:
                # a model without a head, or with another class count (warned).
                lay.mark("head/kernel", "head/bias", *pre_logits)
                if isinstance(model.head, nn.Linear):
                    warnings.warn(
                        f"load_npz: the checkpoint's head has {ckpt_classes} classes, the model "
                        f"{model.head.out_features}; the head is left as initialised"
                        + (" and the representation layer (pre_logits) is dropped" if pre_logits else ""),
                        stacklevel=3,
                    )
        if model.attn_pool is not None:
            _stage_map_head(model.attn_pool, lay, copy)
        mha = f"MultiHeadDotProductAttention_{lay.mha}"
        for i, blk in enumerate(model.blocks):
            copy(blk.norm1.weight, _t(lay.block(i, "LayerNorm_0/scale")), f"block {i} LayerNorm_0/scale")
            copy(blk.norm1.bias, _t(lay.block(i, "LayerNorm_0/bias")), f"block {i} LayerNorm_0/bias")
            qkv_w = torch.cat(
                [_t(lay.block(i, f"{mha}/{n}/kernel"), False).flatten(1).T for n in ("query", "key", "value")]
            )
            copy(blk.attn.qkv.weight, qkv_w, f"block {i} query/key/value kernels")
            if blk.attn.qkv.bias is not None:
                qkv_b = torch.cat(
                    [_t(lay.block(i, f"{mha}/{n}/bias"), False).reshape(-1) for n in ("query", "key", "value")]
                )
                copy(blk.attn.qkv.bias, qkv_b, f"block {i} query/key/value biases")
            copy(blk.attn.proj.weight, _t(lay.block(i, f"{mha}/out/kernel")).flatten(1), f"block {i} out/kernel")
            if blk.attn.proj.bias is not None:
                copy(blk.attn.proj.bias, _t(lay.block(i, f"{mha}/out/bias")), f"block {i} out/bias")
            copy(
                blk.norm2.weight, _t(lay.block(i, f"LayerNorm_{lay.ln2}/scale")), f"block {i} LayerNorm_{lay.ln2}/scale"
            )
            copy(blk.norm2.bias, _t(lay.block(i, f"LayerNorm_{lay.ln2}/bias")), f"block {i} LayerNorm_{lay.ln2}/bias")
            for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
                copy(fc.weight, _t(lay.block(i, f"MlpBlock_{lay.mlp}/Dense_{r}/kernel")), f"block {i} Dense_{r}/kernel")
                if fc.bias is not None:
                    copy(fc.bias, _t(lay.block(i, f"MlpBlock_{lay.mlp}/Dense_{r}/bias")), f"block {i} Dense_{r}/bias")
        rest = lay.unmapped()
        if rest:
            raise ValueError(
                f"load_npz: {len(rest)} array(s) of the checkpoint map to no parameter of the model "
                f"(nothing was loaded): {rest[:8]}{' ...' if len(rest) > 8 else ''}"
            )
    for param, value in staged:
        param.copy_(value.to(param.dtype))
    return model


def npz_arrays(model: ViT) -> Dict[str, Any]:
    """A ViT's weights as the arrays of the original JAX layout (numpy, float32): the inverse of
    :func:`load_npz`. A model with a MAP head (SigLIP) is written in big_vision's naming
    (``pos_embedding``, ``MultiHeadDotProductAttention_0``, ``MlpBlock_0``, ``MAPHead_0/...``), every
    other one in google-research/vision_transformer's (``Transformer/posembed_input/...``,
    ``MultiHeadDotProductAttention_1``, ``MlpBlock_3``). Kernels are HWIO / (in, out), q / k / v /
    out kernels (D, H, d) / (H, d, D), as those checkpoints store them. What the layout cannot hold
    raises a ValueError naming it: register or distillation tokens, LayerScale, QK-norm, the
    attention / MLP norms, a pre-norm or fc_norm, a SwiGLU MLP, a position embedding without the
    class token's row."""
    import numpy as np

    unsupported = {
        "register tokens": model.reg_token is not None,
        "a distillation token": model.dist_token is not None,
        "LayerScale": any(not isinstance(b.ls1, nn.Identity) for b in model.blocks),
        "QK-norm or the inner attention norm": any(
            not isinstance(m, nn.Identity) for b in model.blocks for m in (b.attn.q_norm, b.attn.k_norm, b.attn.norm)),
        "the MLP norm or a SwiGLU MLP": any(
            not hasattr(b.mlp, "fc1") or not isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity)
            for b in model.blocks),
        "a pre-norm (norm_pre)": not isinstance(model.norm_pre, nn.Identity),
        "an fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "a position embedding without the class token (no_embed_class)": model.no_embed_class
        and model.cls_token is not None,
    }
    bad = [name for name, yes in unsupported.items() if yes]
    if bad:
        raise ValueError(f"save_npz: the JAX .npz layout has no place for {', '.join(bad)}")

    def a(t: torch.Tensor, transpose: bool = True):
        x = t.detach().to("cpu", torch.float32).numpy()
        if transpose and x.ndim == 4:
            return np.ascontiguousarray(x.transpose([2, 3, 1, 0]))  # OIHW -> HWIO
        if transpose and x.ndim == 2:
            return np.ascontiguousarray(x.T)  # (out, in) -> (in, out)
        return np.ascontiguousarray(x)

    big_vision = model.attn_pool is not None
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    D = model.embed_dim
    out: Dict[str, Any] = {"embedding/kernel": a(model.patch_embed.proj.weight)}
    if model.patch_embed.proj.bias is not None:
        out["embedding/bias"] = a(model.patch_embed.proj.bias)
    if model.cls_token is not None:
        out["cls"] = a(model.cls_token, False)
    if model.pos_embed is not None:
        out["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = a(model.pos_embed, False)
    if not isinstance(model.norm, nn.Identity):
        out["Transformer/encoder_norm/scale"] = a(model.norm.weight)
        out["Transformer/encoder_norm/bias"] = a(model.norm.bias)
    if isinstance(model.head, nn.Linear):
        out["head/kernel"] = a(model.head.weight)
        if model.head.bias is not None:
            out["head/bias"] = a(model.head.bias)

    def attention(prefix: str, q_w, q_b, kv_w, kv_b, proj, heads: int):
        d = D // heads
        kv_w = kv_w.chunk(2) if kv_w is not None else (None, None)
        kv_b = kv_b.chunk(2) if kv_b is not None else (None, None)
        for name, w, b in (("query", q_w, q_b), ("key", kv_w[0], kv_b[0]), ("value", kv_w[1], kv_b[1])):
            out[f"{prefix}/{name}/kernel"] = a(w.T.reshape(D, heads, d), False)
            if b is not None:
                out[f"{prefix}/{name}/bias"] = a(b.reshape(heads, d), False)
        out[f"{prefix}/out/kernel"] = a(proj.weight.T.reshape(heads, d, D), False)
        if proj.bias is not None:
            out[f"{prefix}/out/bias"] = a(proj.bias)

    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = a(blk.norm1.weight), a(blk.norm1.bias)
        q_w, kv_w = blk.attn.qkv.weight[:D], blk.attn.qkv.weight[D:]
        qkv_b = blk.attn.qkv.bias
        attention(p + f"MultiHeadDotProductAttention_{mha}", q_w, None if qkv_b is None else qkv_b[:D], kv_w,
                  None if qkv_b is None else qkv_b[D:], blk.attn.proj, blk.attn.num_heads)
        out[p + f"LayerNorm_{ln2}/scale"], out[p + f"LayerNorm_{ln2}/bias"] = a(blk.norm2.weight), a(blk.norm2.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            out[p + f"MlpBlock_{mlp}/Dense_{r}/kernel"] = a(fc.weight)
            if fc.bias is not None:
                out[p + f"MlpBlock_{mlp}/Dense_{r}/bias"] = a(fc.bias)
    if big_vision:
        pool = model.attn_pool
        p = "MAPHead_0/"
        out[p + "probe"] = a(pool.latent, False)
        attention(p + "MultiHeadDotProductAttention_0", pool.q.weight, pool.q.bias, pool.kv.weight, pool.kv.bias,
                  pool.proj, pool.num_heads)
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = a(pool.norm.weight), a(pool.norm.bias)
        for r, fc in enumerate((pool.mlp.fc1, pool.mlp.fc2)):
            out[p + f"MlpBlock_0/Dense_{r}/kernel"], out[p + f"MlpBlock_0/Dense_{r}/bias"] = a(fc.weight), a(fc.bias)
    return out


def save_npz(model: ViT, path) -> None:
    """Write a ViT as an original JAX ``.npz`` checkpoint (:func:`npz_arrays`'s layout), which
    :func:`load_npz` / :func:`from_npz` and timm's npz loader read back."""
    import numpy as np

    np.savez(path, **npz_arrays(model))


def from_npz(path, prefix: Optional[str] = None, device=None, dtype=None, **config) -> ViT:
    """Build a ViT from a JAX ``.npz`` checkpoint: config from :func:`npz_config`, updated by
    ``config`` (e.g. ``act="gelu"`` to match timm, which loads these with the erf GELU)."""
    cfg = npz_config(path, prefix=prefix)
    cfg.update(config)
    model = ViT(**cfg, weight_init="skip", device=device, dtype=dtype)
    return load_npz(model, path, prefix=prefix)


# ----------------------------------------------------------------------------------------------
# safetensors and generic checkpoints
# ----------------------------------------------------------------------------------------------

_CONFIG_KEY = "vitkern_config"


def save_safetensors(model: ViT, path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the state_dict (timm's keys, loadable by timm too) and the config (JSON metadata)."""
    from safetensors.torch import save_file

    meta = {"format": "pt", _CONFIG_KEY: json.dumps(model.config)}
    meta.update(metadata or {})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path), metadata=meta)


# Bounds on a config read from a file (checked before anything is allocated): generous for any
# real ViT, small enough that a hostile file cannot make the constructor loop or allocate for long.
_CONFIG_INT_BOUNDS = {
    "in_chans": (1, 4096),
    "num_classes": (0, 1 << 22),
    "embed_dim": (1, 1 << 16),
    "depth": (0, 1024),
    "num_heads": (1, 4096),
    "reg_tokens": (0, 4096),
}
_CONFIG_SIZE_BOUND = 1 << 16  # img_size / patch_size, per side
_CONFIG_MLP_RATIO_BOUND = 64.0


def _file_error(path: str, what: str) -> ValueError:
    return ValueError(f"{path!r}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _safetensors_config(meta: Mapping[str, str], path: str) -> Dict[str, Any]:
    """The ViT keywords stored in a safetensors file's metadata, parsed and bounded."""
    raw = meta.get(_CONFIG_KEY)
    if raw is None:
        return {}
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise _file_error(path, f"the {_CONFIG_KEY!r} metadata is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _file_error(path, f"the {_CONFIG_KEY!r} metadata must be a JSON object of ViT keywords, got "
                                f"{type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise _file_error(path, f"the stored config has keywords ViT does not take: {unknown}")
    return cfg


def _check_config_bounds(cfg: Mapping[str, Any], path: str) -> None:
    for key, (lo, hi) in _CONFIG_INT_BOUNDS.items():
        if key in cfg and not (_is_int(cfg[key]) and lo <= cfg[key] <= hi):
            raise _file_error(path, f"config {key} must be an int in [{lo}, {hi}], got {cfg[key]!r}")
    for key in ("img_size", "patch_size"):
        if key not in cfg:
            continue
        v = cfg[key]
        sides = v if isinstance(v, (list, tuple)) else [v]
        if len(sides) not in (1, 2) or not all(_is_int(x) and 1 <= x <= _CONFIG_SIZE_BOUND for x in sides):
            raise _file_error(path, f"config {key} must be an int or a pair of ints in [1, {_CONFIG_SIZE_BOUND}], "
                                    f"got {v!r}")
    if "mlp_ratio" in cfg:
        r = cfg["mlp_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= _CONFIG_MLP_RATIO_BOUND:
            raise _file_error(path, f"config mlp_ratio must be a number in (0, {_CONFIG_MLP_RATIO_BOUND}], got {r!r}")


class _Adaptation:
    """How a timm-format checkpoint is fitted to a model of another class count or image size,
    decided from the shapes alone (timm's rule for pretrained weights, ``load_pretrained`` with
    ``checkpoint_filter_fn``): a classifier (``head.weight`` / ``head.bias``) whose class count
    differs from the model's is dropped and the model's head kept as initialised (with a warning;
    silently for a model without a head, ``num_classes=0``), and a ``pos_embed`` of another grid
    is resampled to the model's (bicubic, antialiased, prefix-token rows kept). Everything else
    must match."""

    def __init__(self, model: ViT, shapes: Mapping[str, Tuple[int, ...]], path: str,
                 stored: Optional[Mapping[str, Any]] = None):
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.drop: Tuple[str, ...] = ()
        self.note: Optional[str] = None
        self.old_grid: Optional[Tuple[int, int]] = None
        self.num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        self.new_grid = tuple(model.patch_embed.grid_size)
        # the classifier, and a distilled model's second one (DeiT's head_dist), dropped together
        heads = ("head", "head_dist") if getattr(model, "distilled", False) else ("head",)
        head_w = shapes.get("head.weight")
        if head_w is not None and own.get("head.weight") != tuple(head_w):
            classes = head_w[0] if len(head_w) == 2 else None
            consistent = all(
                shapes.get(f"{h}.weight") in (None, (classes, model.num_features))
                and shapes.get(f"{h}.bias") in (None, (classes,))
                for h in heads
            )
            if classes is not None and head_w[1] == model.num_features and consistent:
                self.drop = tuple(f"{h}.{p}" for h in heads for p in ("weight", "bias") if f"{h}.{p}" in shapes)
                if model.num_classes > 0:
                    self.note = (f"{path!r}: the checkpoint's head has {classes} classes, the model "
                                 f"{model.num_classes}; the head{'s are' if len(heads) > 1 else ' is'} left "
                                 "as initialised")
        pos = shapes.get("pos_embed")
        mine = own.get("pos_embed")
        if pos is not None and mine is not None and tuple(pos) != mine and len(pos) == 3 and pos[0] == 1 \
                and pos[2] == mine[2]:
            n = pos[1] - self.num_prefix
            grid = self._stored_grid(stored, n)
            if grid is None:
                side = math.isqrt(max(n, 0))
                if n <= 0 or side * side != n:
                    raise _file_error(path, f"pos_embed has {pos[1]} tokens: after the model's {self.num_prefix} "
                                            f"prefix token(s) they are no square grid, and the file stores no "
                                            f"image and patch size that account for them")
                grid = (side, side)
            self.old_grid = grid

    @staticmethod
    def _stored_grid(stored: Optional[Mapping[str, Any]], n: int) -> Optional[Tuple[int, int]]:
        if not stored or "img_size" not in stored or "patch_size" not in stored:
            return None
        try:
            img, patch = (v if isinstance(v, (list, tuple)) else [v, v]
                          for v in (stored["img_size"], stored["patch_size"]))
            grid = (int(img[0]) // int(patch[0]), int(img[1]) // int(patch[1]))
        except (TypeError, ValueError, IndexError, ZeroDivisionError):
            return None
        return grid if grid[0] * grid[1] == n else None

    def shapes(self, shapes: Mapping[str, Tuple[int, ...]], model: nn.Module) -> Dict[str, Tuple[int, ...]]:
        """The checkpoint's shapes after the adaptation."""
        out = {k: tuple(v) for k, v in shapes.items() if k not in self.drop}
        if self.old_grid is not None:
            out["pos_embed"] = tuple(model.pos_embed.shape)
        return out

    def apply(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The adapted state_dict (after the checks passed: the warning comes only with a load)."""
        from vitkern.ops.patch_embed import resample_pos_embed

        if self.note:
            warnings.warn(self.note, stacklevel=3)
        state = {k: v for k, v in state.items() if k not in self.drop}
        if self.old_grid is not None:
            state["pos_embed"] = resample_pos_embed(
                state["pos_embed"],
                new_size=self.new_grid,
                old_size=self.old_grid,
                num_prefix_tokens=self.num_prefix,
                interpolation="bicubic",
                antialias=True,  # timm's checkpoint_filter_fn
            )
        return state


def _check_state_against(model: nn.Module, shapes: Mapping[str, Tuple[int, ...]], strict: bool, path: str,
                         may_miss=()) -> None:
    """Keys and shapes of a checkpoint (``shapes``) against ``model``'s state_dict, before any copy:
    ``load_state_dict`` copies every matching entry before it reports the others. ``may_miss``: the
    model's keys the checkpoint may lack (a head dropped on purpose)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes) - set(may_miss))
    unexpected = sorted(set(shapes) - set(own))
    if strict and (missing or unexpected):
        raise _file_error(path, f"the checkpoint does not fit the model: missing {missing[:8]}"
                                f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                                f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{k}: {shapes[k]} in the checkpoint, {own[k]} in the model"
             for k in sorted(set(own) & set(shapes)) if tuple(shapes[k]) != own[k]]
    if wrong:
        raise _file_error(path, "shapes differ: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))


def load_safetensors(path, device=None, dtype=None, strict: bool = True, **config) -> ViT:
    """Build a ViT from a safetensors file: the stored config updated by ``config`` (a file without
    one, e.g. a timm export, needs the full config as keywords).

    ``num_classes`` / ``img_size`` keywords other than the file's adapt the weights as
    :func:`load_checkpoint` does (the head dropped, ``pos_embed`` resampled). The stored config is
    parsed, bounded (sizes, depth) and checked against the file's tensor shapes on the meta device
    before anything is allocated; errors name the file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = os.fspath(path)
    with safe_open(p, framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    stored = _safetensors_config(meta, p)
    cfg = dict(stored, **config)
    _check_config_bounds(cfg, p)
    try:
        skeleton = ViT(**cfg, weight_init="skip", device="meta")
    except (TypeError, ValueError) as e:
        raise _file_error(p, f"the config {cfg} does not build a ViT: {e}") from None
    plan = _Adaptation(skeleton, shapes, p, stored)
    _check_state_against(skeleton, plan.shapes(shapes, skeleton), strict, p, may_miss=plan.drop)
    del skeleton
    state = load_file(p, device=str(device) if device is not None else "cpu")
    if dtype is None:
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    # The dropped head keeps its initialisation: built with the default init, not "skip".
    model = ViT(**cfg, weight_init="skip" if not plan.drop else "", device=device, dtype=dtype)
    state = _Adaptation(model, shapes, p, stored).apply(state)
    model.load_state_dict(state, strict=strict and not plan.drop)
    return model


def _as_state_dict(state, path: str) -> Dict[str, torch.Tensor]:
    """A loaded object as a state_dict (a mapping of string keys to tensors), or a clear error."""
    if not isinstance(state, Mapping):
        raise _file_error(path, f"does not hold a state_dict (a mapping of parameter names to tensors) but a "
                                f"{type(state).__name__}")
    keys = [k for k in state if not isinstance(k, str)]
    if keys:
        raise _file_error(path, f"the state_dict has keys that are not strings: {keys[:5]!r}")
    values = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if values:
        raise _file_error(path, f"the state_dict has entries that are not tensors: {values[:5]!r}")
    return dict(state)


def load_checkpoint(model: ViT, path, strict: bool = True) -> ViT:
    """Load weights into ``model`` from ``.safetensors``, a JAX ``.npz`` or a torch file
    (``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is
    unwrapped). Keys are timm's. Returns the model.

    A checkpoint of another class count or image size loads as timm loads pretrained weights into
    an adapted model (``load_pretrained`` and ``checkpoint_filter_fn``), whatever ``strict``: a
    classifier (``head.weight`` / ``head.bias``) whose class count differs from the model's is
    dropped and the model's head stays as initialised (a warning says so; a model built with
    ``num_classes=0`` drops it silently), and a ``pos_embed`` of another patch grid is resampled
    to the model's (bicubic, antialiased; the class / register token rows kept). The old grid is
    the stored config's (a vitkern safetensors file) when it accounts for the tokens, else square.
    Anything else that differs (a patch size, a width, a missing block) raises. ``strict=False``
    allows missing and unexpected keys, as ``load_state_dict``. An ``.npz`` file goes to
    :func:`load_npz`, which has its own rules.

    Keys and shapes are checked before any copy, so a failed load leaves the model unchanged.
    """
    p = os.fspath(path)
    if p.endswith(".npz"):
        return load_npz(model, p)
    state, stored = read_checkpoint(p)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    plan = _Adaptation(model, shapes, p, stored)
    _check_state_against(model, plan.shapes(shapes, model), strict, p, may_miss=plan.drop)
    model.load_state_dict(plan.apply(state), strict=strict and not plan.drop)
    return model


def read_checkpoint(path) -> tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """``(state_dict, stored config or None)`` of a ``.safetensors`` file (with vitkern's stored
    config when its metadata has one) or a torch file (``torch.load(weights_only=True)``; a
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper unwrapped, a ``module.`` prefix dropped)."""
    p = os.fspath(path)
    stored = None
    if p.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(p, framework="pt") as f:
            meta = f.metadata() or {}
        try:
            stored = _safetensors_config(meta, p)  # only a hint for the old grid here
        except ValueError:
            stored = None
        state = load_file(p)
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
        state = _as_state_dict(state, p)
        state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, stored


def load_timm_checkpoint(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a timm-format checkpoint into a model whose keys are timm's (``Eva``, ``NaFlexViT``):
    a classifier of another class count is dropped with a warning (the model's own kept, as timm's
    pretrained loading adapts a head); any other missing, unexpected or mis-shaped key raises a
    ValueError naming it before anything is copied (``strict=False`` allows missing and unexpected
    keys). Returns the model."""
    state, _ = read_checkpoint(path)
    who = type(model).__name__
    own = model.state_dict()
    head = [k for k in ("head.weight", "head.bias") if k in state and (k not in own or own[k].shape != state[k].shape)]
    if head:
        if getattr(model, "num_classes", 0):
            warnings.warn(f"{who}.load_checkpoint: {path}: the classifier has another class count; it is not loaded",
                          stacklevel=3)
        state = {k: v for k, v in state.items() if k not in head}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not (head and k.startswith("head."))]
    unexpected = [k for k in state if k not in own]
    if bad or (strict and (missing or unexpected)):
        raise ValueError(f"{who}.load_checkpoint: {path} does not fit this model: shapes {bad}, missing {missing}, "
                         f"unexpected {unexpected}")
    model.load_state_dict(state, strict=False)
    return model
