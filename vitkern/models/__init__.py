"""Models built from the vitkern ops: the Vision Transformer, its factories and weight conversion."""

from vitkern.models.vit import (
    ViT,
    create_model,
    list_models,
    model_config,
    vit_base_patch16_224,
    vit_base_patch16_384,
    vit_base_patch32_224,
    vit_huge_patch14_224,
    vit_large_patch16_224,
    vit_small_patch16_224,
    vit_tiny_patch16_224,
)

__all__ = [
    "ViT",
    "create_model",
    "list_models",
    "model_config",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "vit_base_patch16_384",
]
