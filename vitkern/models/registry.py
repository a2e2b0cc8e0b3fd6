"""The named models: ``@register_model``, the standard ViT configurations registered with it, and
:func:`create_model` / :func:`list_models` / :func:`model_config`, which read the registry.

A named model is written once, as a function returning its ViT constructor keywords (timm's values
for the name), decorated with ``@register_model(pretrained_cfg=_cfg(tag, ...))``: the preprocessing
config of timm's default weights for that name (input size, interpolation, mean / std, crop, class
count), without download sources. The decorator records both under the function's name and puts the
factory of that name in its place, so ``vit_base_patch16_224(**kw)``,
``create_model("vit_base_patch16_224", **kw)`` and ``model_config("vit_base_patch16_224", **kw)``
all come from that one entry. ``vitkern`` and ``vitkern.models`` export every factory by reading the
registry.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional

from vitkern.models.vit import ViT

__all__ = [
    "register_model",
    "list_models",
    "model_config",
    "model_entrypoint",
    "model_class",
    "get_pretrained_cfg",
    "create_model",
]

# name -> (constructor keywords, factory)
_MODELS: Dict[str, tuple[Dict[str, Any], Callable[..., ViT]]] = {}
# name -> the model class its keywords construct (ViT unless registered with another)
_MODEL_CLASSES: Dict[str, type] = {}
# name -> preprocessing config (timm's pretrained_cfg keys, no download source)
_PRETRAINED_CFGS: Dict[str, Dict[str, Any]] = {}

IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)

# The keys of a pretrained_cfg that say where weights come from: a local "file" loads; vitkern
# downloads nothing, so "url" / "hf_hub_id" are never read.
_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename")


def _cfg(tag: str, **kwargs) -> Dict[str, Any]:
    """timm's ViT ``_cfg`` defaults (Inception mean / std, 224 px, crop 0.9, bicubic) for the
    weights tagged ``tag``, updated by ``kwargs``."""
    return {
        "tag": tag,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "num_classes": 1000,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def register_model(
    config_fn: Optional[Callable[[], Dict[str, Any]]] = None,
    *,
    pretrained_cfg: Optional[Mapping[str, Any]] = None,
    model_cls: type = ViT,
):
    """Register ``config_fn()`` (``model_cls``'s constructor keywords: ViT's by default,
    :class:`vitkern.models.Eva`'s for the EVA family) as the model named ``config_fn.__name__``
    and return that model's factory ``factory(pretrained=False, **kwargs) -> ViT``, which takes the
    keywords of :func:`create_model`. The factory's docstring is ``config_fn``'s, followed by the
    shape of the configuration. ``@register_model(pretrained_cfg=...)`` also records the name's
    preprocessing config (timm's ``pretrained_cfg`` keys), which models built by name carry."""
    if config_fn is None:
        return lambda fn: register_model(fn, pretrained_cfg=pretrained_cfg, model_cls=model_cls)
    name = config_fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is registered already")
    args = dict(config_fn())

    def factory(pretrained: bool = False, **kwargs) -> ViT:
        return create_model(name, pretrained=pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = config_fn.__module__
    dim, heads = args["embed_dim"], args["num_heads"]
    factory.__doc__ = (
        f"{inspect.cleandoc(config_fn.__doc__ or name)}\n\n"
        f"Patch {args['patch_size']}, width {dim}, depth {args['depth']}, {heads} heads (head dim "
        f"{dim // heads}), {args.get('img_size', 224)} px. Keywords override the config "
        f"(see :func:`create_model`)."
    )
    _MODELS[name] = (args, factory)
    _MODEL_CLASSES[name] = model_cls
    cfg = dict(pretrained_cfg or {})
    cfg.pop("architecture", None)
    _PRETRAINED_CFGS[name] = {"architecture": name, **cfg}
    return factory


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def _entry(name: str) -> tuple[Dict[str, Any], Callable[..., ViT]]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


def model_config(name: str, **kwargs) -> Dict[str, Any]:
    """The constructor keywords of a named model, updated by ``kwargs``."""
    return dict(_entry(name)[0], **kwargs)


def model_class(name: str) -> type:
    """The class a named model is (:class:`ViT`, or :class:`vitkern.models.Eva`)."""
    _entry(name)
    return _MODEL_CLASSES[name]


def model_entrypoint(name: str) -> Callable[..., ViT]:
    """The factory registered as ``name`` (``vitkern.<name>``)."""
    return _entry(name)[1]


def get_pretrained_cfg(name: str) -> Dict[str, Any]:
    """A copy of the preprocessing config a model built as ``name`` carries (``model.pretrained_cfg``):
    timm's ``pretrained_cfg`` of its default weights for that name (architecture, tag, input_size,
    interpolation, mean, std, crop_pct, crop_mode, num_classes, ...), without download sources."""
    _entry(name)
    return copy.deepcopy(_PRETRAINED_CFGS[name])


_NO_DOWNLOAD = (
    "vitkern never downloads weights. To load a local file (.safetensors, JAX .npz or a torch "
    "state_dict with timm's keys), pass create_model(name, pretrained=True, "
    "pretrained_cfg_overlay=dict(file=PATH)) as in timm, or create_model(name, checkpoint_path=PATH); "
    "or convert a loaded model with ViT.from_timm / from_torchvision / from_hf / from_npz"
)


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path=None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
    **kwargs,
) -> ViT:
    """Build a named model (``list_models()``: ViTs, and the EVA family as
    :class:`vitkern.models.Eva`); keywords override the config (e.g. ``num_classes``, ``dtype``).

    Nothing is downloaded. Weights come from local files, as timm's ``create_model`` takes them:
    ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)`` loads ``PATH``, and
    ``checkpoint_path=PATH`` loads after it (each a ``.safetensors``, JAX ``.npz`` or torch
    state_dict file; one of another class count or image size is adapted as
    ``ViT.load_checkpoint`` describes: the head dropped, the position embedding resampled).
    ``pretrained=True`` without a file raises ValueError saying so.

    The model carries ``pretrained_cfg`` (and timm's ``default_cfg`` alias): the name's config
    (:func:`get_pretrained_cfg`) updated by ``pretrained_cfg_overlay``; as in timm, constructor
    keywords (``num_classes``, ``img_size``) do not change it (it describes the source weights), so
    ``timm.data.resolve_model_data_config(model)`` gives timm's preprocessing for the name.
    """
    cfg = get_pretrained_cfg(name)
    if pretrained_cfg_overlay is not None:
        if not isinstance(pretrained_cfg_overlay, Mapping):
            raise TypeError(
                f"pretrained_cfg_overlay must be a dict, got {type(pretrained_cfg_overlay).__name__}"
            )
        overlay = dict(pretrained_cfg_overlay)
        if any(overlay.get(k) for k in _SOURCE_KEYS):
            # a new weight source replaces the name's, as in timm
            for k in _SOURCE_KEYS:
                cfg.pop(k, None)
        cfg.update(copy.deepcopy(overlay))
    file = cfg.get("file") if pretrained else None
    if pretrained and not file:
        raise ValueError(f"create_model({name!r}, pretrained=True): {_NO_DOWNLOAD}")
    model = _MODEL_CLASSES[name](**model_config(name, **kwargs))
    if file:
        model.load_checkpoint(file)
    if checkpoint_path is not None:
        model.load_checkpoint(checkpoint_path)
    model.pretrained_cfg = cfg
    model.default_cfg = model.pretrained_cfg
    return model


# ----------------------------------------------------------------------------------------------
# The standard configurations (timm's names and shapes)
# ----------------------------------------------------------------------------------------------


@register_model(pretrained_cfg=_cfg("augreg_in21k_ft_in1k"))
def vit_tiny_patch16_224() -> Dict[str, Any]:
    """ViT-Ti/16 at 224 px (the tiny width of DeiT and of "How to train your ViT")."""
    return dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)


@register_model(pretrained_cfg=_cfg("augreg_in21k_ft_in1k"))
def vit_small_patch16_224() -> Dict[str, Any]:
    """ViT-S/16 at 224 px."""
    return dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register_model(pretrained_cfg=_cfg("augreg2_in21k_ft_in1k"))
def vit_base_patch16_224() -> Dict[str, Any]:
    """ViT-B/16 at 224 px (Dosovitskiy et al., 2020)."""
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model(pretrained_cfg=_cfg("augreg_in21k_ft_in1k"))
def vit_base_patch32_224() -> Dict[str, Any]:
    """ViT-B/32 at 224 px."""
    return dict(patch_size=32, embed_dim=768, depth=12, num_heads=12)


@register_model(pretrained_cfg=_cfg("augreg_in21k_ft_in1k"))
def vit_large_patch16_224() -> Dict[str, Any]:
    """ViT-L/16 at 224 px."""
    return dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_model(pretrained_cfg=_cfg("orig_in21k", num_classes=0))
def vit_huge_patch14_224() -> Dict[str, Any]:
    """ViT-H/14 at 224 px. No classifier by default, as timm: its only checkpoint is the
    ImageNet-21k feature extractor."""
    return dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0)


@register_model(pretrained_cfg=_cfg("augreg_in21k_ft_in1k", input_size=(3, 384, 384), crop_pct=1.0))
def vit_base_patch16_384() -> Dict[str, Any]:
    """ViT-B/16 at 384 px."""
    return dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12)


# SigLIP / SigLIP2 image towers (timm's vit_*_siglip_*: no class token, the MAP head pools the
# normed patch tokens; timm's default weights for these names are SigLIP2's "v2_webli", except
# so400m at 384 px). No classifier: the MAP head's output is the image embedding.
def _siglip_cfg(tag: str = "v2_webli", size: int = 224) -> Dict[str, Any]:
    return _cfg(tag, input_size=(3, size, size), num_classes=0, crop_pct=0.9)


@register_model(pretrained_cfg=_siglip_cfg())
def vit_base_patch16_siglip_224() -> Dict[str, Any]:
    """SigLIP / SigLIP2 ViT-B/16 image tower at 224 px, with the MAP (attention pooling) head."""
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool="map",
                num_classes=0)


@register_model(pretrained_cfg=_siglip_cfg(size=256))
def vit_base_patch16_siglip_256() -> Dict[str, Any]:
    """SigLIP / SigLIP2 ViT-B/16 image tower at 256 px, with the MAP head."""
    return dict(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False,
                global_pool="map", num_classes=0)


@register_model(pretrained_cfg=_siglip_cfg(size=256))
def vit_large_patch16_siglip_256() -> Dict[str, Any]:
    """SigLIP / SigLIP2 ViT-L/16 image tower at 256 px, with the MAP head."""
    return dict(img_size=256, patch_size=16, embed_dim=1024, depth=24, num_heads=16, class_token=False,
                global_pool="map", num_classes=0)


@register_model(pretrained_cfg=_siglip_cfg())
def vit_so400m_patch14_siglip_224() -> Dict[str, Any]:
    """SigLIP / SigLIP2 shape-optimised 400M image tower ("So400m/14") at 224 px: width 1152, 16
    heads of 72, MLP 4304, with the MAP head."""
    return dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False,
                global_pool="map", num_classes=0)


@register_model(pretrained_cfg=_siglip_cfg("webli", 384))
def vit_so400m_patch14_siglip_384() -> Dict[str, Any]:
    """SigLIP So400m/14 image tower at 384 px, with the MAP head."""
    return dict(img_size=384, patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362,
                class_token=False, global_pool="map", num_classes=0)


# OpenAI-style CLIP image towers with QuickGELU (timm's *_clip_quickgelu_*: pre-norm, LayerNorm eps
# 1e-5, the final norm, then a projection "head" to the joint embedding, with the class count timm's
# default weights give it).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_QUICKGELU_NOTE = ("natively QuickGELU, use quickgelu model variant for original results",)


def _clip_cfg(tag: str, num_classes: int, license: str, size: int = 224, crop_pct: float = 1.0) -> Dict[str, Any]:
    return _cfg(tag, input_size=(3, size, size), crop_pct=crop_pct, mean=_CLIP_MEAN, std=_CLIP_STD,
                num_classes=num_classes, license=license, notes=_QUICKGELU_NOTE)


def _clip(**kw) -> Dict[str, Any]:
    return dict(pre_norm=True, norm_eps=1e-5, act="quick_gelu", **kw)


@register_model(pretrained_cfg=_clip_cfg("laion400m_e32", 512, "mit", crop_pct=0.9))
def vit_base_patch32_clip_quickgelu_224() -> Dict[str, Any]:
    """CLIP ViT-B/32 image tower with QuickGELU at 224 px."""
    return _clip(patch_size=32, embed_dim=768, depth=12, num_heads=12, num_classes=512)


@register_model(pretrained_cfg=_clip_cfg("metaclip_2pt5b", 512, "cc-by-nc-4.0"))
def vit_base_patch16_clip_quickgelu_224() -> Dict[str, Any]:
    """CLIP ViT-B/16 image tower with QuickGELU at 224 px."""
    return _clip(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=512)


@register_model(pretrained_cfg=_clip_cfg("dfn2b", 768, "apple-ascl"))
def vit_large_patch14_clip_quickgelu_224() -> Dict[str, Any]:
    """CLIP ViT-L/14 image tower with QuickGELU at 224 px."""
    return _clip(patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_classes=768)


@register_model(pretrained_cfg=_clip_cfg("openai", 768, "apache-2.0", size=336))
def vit_large_patch14_clip_quickgelu_336() -> Dict[str, Any]:
    """OpenAI CLIP ViT-L/14 image tower at 336 px (QuickGELU)."""
    return _clip(img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_classes=768)


# Distilled DeiT (timm's deit_*_distilled_*: class and distillation tokens, two heads averaged)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _deit_cfg(size: int = 224, crop_pct: float = 0.9) -> Dict[str, Any]:
    return _cfg("fb_in1k", input_size=(3, size, size), crop_pct=crop_pct, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                classifier=("head", "head_dist"))


@register_model(pretrained_cfg=_deit_cfg())
def deit_tiny_distilled_patch16_224() -> Dict[str, Any]:
    """DeiT-Ti/16 distilled (Touvron et al., 2021) at 224 px."""
    return dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, distilled=True)


@register_model(pretrained_cfg=_deit_cfg())
def deit_small_distilled_patch16_224() -> Dict[str, Any]:
    """DeiT-S/16 distilled at 224 px."""
    return dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, distilled=True)


@register_model(pretrained_cfg=_deit_cfg())
def deit_base_distilled_patch16_224() -> Dict[str, Any]:
    """DeiT-B/16 distilled at 224 px."""
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, distilled=True)


@register_model(pretrained_cfg=_deit_cfg(384, 1.0))
def deit_base_distilled_patch16_384() -> Dict[str, Any]:
    """DeiT-B/16 distilled at 384 px."""
    return dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12, distilled=True)


# DINOv2 (Oquab et al., 2023; timm's vit_*_patch14_dinov2 / *_reg4_dinov2): LayerScale 1e-5, 518
# px, no classifier; giant's MLP is SwiGLU (timm's SwiGLUPacked, on the fused SwiGLU GEMMs), the
# register variants keep the class token's position embedding in the token (no_embed_class).
def _dinov2_cfg() -> Dict[str, Any]:
    return _cfg("lvd142m", input_size=(3, 518, 518), crop_pct=1.0, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                num_classes=0)


def _dinov2(reg_tokens: int = 0, **kw) -> Dict[str, Any]:
    extra = dict(reg_tokens=reg_tokens, no_embed_class=True) if reg_tokens else {}
    return dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0, **extra, **kw)


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_small_patch14_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-S/14 at 518 px."""
    return _dinov2(embed_dim=384, depth=12, num_heads=6)


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_base_patch14_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-B/14 at 518 px."""
    return _dinov2(embed_dim=768, depth=12, num_heads=12)


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_large_patch14_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-L/14 at 518 px."""
    return _dinov2(embed_dim=1024, depth=24, num_heads=16)


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_giant_patch14_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-g/14 at 518 px, with the SwiGLU MLP (fc1 8192 = gate and value halves of 4096)."""
    return _dinov2(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed")


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_small_patch14_reg4_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-S/14 with 4 register tokens at 518 px."""
    return _dinov2(4, embed_dim=384, depth=12, num_heads=6)


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_base_patch14_reg4_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-B/14 with 4 register tokens at 518 px."""
    return _dinov2(4, embed_dim=768, depth=12, num_heads=12)


@register_model(pretrained_cfg=_dinov2_cfg())
def vit_giant_patch14_reg4_dinov2() -> Dict[str, Any]:
    """DINOv2 ViT-g/14 with 4 register tokens at 518 px, with the SwiGLU MLP."""
    return _dinov2(4, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed")
