"""The named models: ``@register_model``, the standard ViT configurations registered with it, and
:func:`create_model` / :func:`list_models` / :func:`model_config`, which read the registry.

A named model is written once, as a function returning its ViT constructor keywords (timm's values
for the name), decorated with ``@register_model``. The decorator records the keywords under the
function's name and puts the factory of that name in its place, so ``vit_base_patch16_224(**kw)``,
``create_model("vit_base_patch16_224", **kw)`` and ``model_config("vit_base_patch16_224", **kw)``
all come from that one entry. ``vitkern`` and ``vitkern.models`` export every factory by reading the
registry.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List

from vitkern.models.vit import ViT

__all__ = ["register_model", "list_models", "model_config", "model_entrypoint", "create_model"]

# name -> (constructor keywords, factory)
_MODELS: Dict[str, tuple[Dict[str, Any], Callable[..., ViT]]] = {}


def register_model(config_fn: Callable[[], Dict[str, Any]]) -> Callable[..., ViT]:
    """Register ``config_fn()`` (ViT constructor keywords) as the model named ``config_fn.__name__``
    and return that model's factory ``factory(pretrained=False, **kwargs) -> ViT``, which takes the
    keywords of :func:`create_model`. The factory's docstring is ``config_fn``'s, followed by the
    shape of the configuration."""
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


def model_entrypoint(name: str) -> Callable[..., ViT]:
    """The factory registered as ``name`` (``vitkern.<name>``)."""
    return _entry(name)[1]


def create_model(name: str, pretrained: bool = False, checkpoint_path=None, **kwargs) -> ViT:
    """Build a named ViT (``list_models()``); keywords override the config (e.g. ``num_classes``,
    ``drop_path_rate``, ``dtype``). Nothing is downloaded: pass ``checkpoint_path`` (a
    ``.safetensors``, JAX ``.npz`` or torch state_dict file) to load weights; one of another class
    count or image size is adapted as ``ViT.load_checkpoint`` describes (the head dropped, the
    position embedding resampled)."""
    if pretrained:
        raise ValueError(
            "vitkern does not download weights; pass checkpoint_path=... or convert a loaded model "
            "with ViT.from_timm / from_torchvision / from_hf / from_npz"
        )
    model = ViT(**model_config(name, **kwargs))
    if checkpoint_path is not None:
        model.load_checkpoint(checkpoint_path)
    return model


# ----------------------------------------------------------------------------------------------
# The standard configurations (timm's names and shapes)
# ----------------------------------------------------------------------------------------------


@register_model
def vit_tiny_patch16_224() -> Dict[str, Any]:
    """ViT-Ti/16 at 224 px (the tiny width of DeiT and of "How to train your ViT")."""
    return dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)


@register_model
def vit_small_patch16_224() -> Dict[str, Any]:
    """ViT-S/16 at 224 px."""
    return dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register_model
def vit_base_patch16_224() -> Dict[str, Any]:
    """ViT-B/16 at 224 px (Dosovitskiy et al., 2020)."""
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def vit_base_patch32_224() -> Dict[str, Any]:
    """ViT-B/32 at 224 px."""
    return dict(patch_size=32, embed_dim=768, depth=12, num_heads=12)


@register_model
def vit_large_patch16_224() -> Dict[str, Any]:
    """ViT-L/16 at 224 px."""
    return dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_model
def vit_huge_patch14_224() -> Dict[str, Any]:
    """ViT-H/14 at 224 px. No classifier by default, as timm: its only checkpoint is the
    ImageNet-21k feature extractor."""
    return dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0)


@register_model
def vit_base_patch16_384() -> Dict[str, Any]:
    """ViT-B/16 at 384 px."""
    return dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12)
