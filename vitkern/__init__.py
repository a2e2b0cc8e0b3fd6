"""vitkern: fused Triton and CUDA kernels for Vision Transformers.

Public API (re-exports only; see the op modules under ``vitkern.ops`` for each op's layers).
"""

from vitkern._version import __version__
from vitkern._backend import BackendUnavailableError, get_backend, use_backend
from vitkern._extension import cuda_extension_available
from vitkern.ops.layer_norm import add_layer_norm, layer_norm
from vitkern.ops.attention import attention, attention_qkvpacked, scaled_dot_product_attention
from vitkern.ops.linear import linear
from vitkern.ops.mlp import mlp
from vitkern.ops.patch_embed import patch_embed, resample_pos_embed
from vitkern.ops import cuda_backend as _cuda_backend  # noqa: F401  (registers the "cuda" backend of patch_embed)
from vitkern import nn
from vitkern.models.vit import (
    ViT,
    create_model,
    list_models,
    vit_base_patch16_224,
    vit_base_patch16_384,
    vit_base_patch32_224,
    vit_huge_patch14_224,
    vit_large_patch16_224,
    vit_small_patch16_224,
    vit_tiny_patch16_224,
)

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "get_backend",
    "use_backend",
    "cuda_extension_available",
    "layer_norm",
    "add_layer_norm",
    "attention",
    "attention_qkvpacked",
    "scaled_dot_product_attention",
    "linear",
    "mlp",
    "patch_embed",
    "resample_pos_embed",
    "nn",
    "ViT",
    "create_model",
    "list_models",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "vit_base_patch16_384",
]
