"""Models built from the vitkern ops: the Vision Transformer, the registry of named configurations
with their factories, and weight conversion (``vitkern.models.convert``).

Every factory in the registry (``vit_base_patch16_224``, ...) is exported here under its name."""

from vitkern.models.vit import ViT
from vitkern.models.eva import Eva
from vitkern.models.naflex import NaFlexViT, PackedBatch, cu_seqlens_from_mask, pack_images
from vitkern.models.registry import (
    create_model,
    get_pretrained_cfg,
    list_models,
    model_class,
    model_config,
    model_entrypoint,
    register_model,
)

globals().update({name: model_entrypoint(name) for name in list_models()})

__all__ = [
    "ViT",
    "Eva",
    "NaFlexViT",
    "PackedBatch",
    "cu_seqlens_from_mask",
    "pack_images",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
    "model_class",
    "model_config",
    "model_entrypoint",
    "register_model",
    *list_models(),
]
