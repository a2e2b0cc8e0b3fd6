"""vitkern: fused Triton and CUDA kernels for Vision Transformers.

Public API (re-exports only; see the op modules under ``vitkern.ops`` for each op's layers).
"""

from vitkern._version import __version__
from vitkern._backend import BackendUnavailableError, get_backend, use_backend
from vitkern._extension import cuda_extension_available
from vitkern._tuning import tune
from vitkern.ops._config import set_sm_carveout, sm_carveout
from vitkern.ops.layer_norm import add_layer_norm, layer_norm
from vitkern.ops.attention import (
    attention,
    attention_qkvpacked,
    attention_qkvpacked_varlen,
    attention_varlen,
    scaled_dot_product_attention,
)
from vitkern.ops.qk_prologue.spec import QKNorm, RopeTables
from vitkern.ops.linear import linear
from vitkern.ops.mlp import mlp
from vitkern.ops.swiglu import swiglu, swiglu_mlp
from vitkern.ops.patch_embed import patch_embed, resample_patch_embed, resample_pos_embed
from vitkern.ops.pos_resample import resample_pos_embed_packed
from vitkern.patching import PatchReport, patch_model, patch_sdpa, sdpa_override, unpatch_model, unpatch_sdpa
from vitkern import nn
from vitkern.nn.rope import Rope2D
from vitkern import models
from vitkern.models import ViT, create_model, list_models
from vitkern.models.naflex import NaFlexViT, PackedBatch, cu_seqlens_from_mask, pack_images

# The model factories (vit_base_patch16_224, ...), one per registered name.
globals().update({name: getattr(models, name) for name in list_models()})

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "get_backend",
    "use_backend",
    "tune",
    "set_sm_carveout",
    "sm_carveout",
    "cuda_extension_available",
    "layer_norm",
    "add_layer_norm",
    "attention",
    "attention_qkvpacked",
    "attention_varlen",
    "attention_qkvpacked_varlen",
    "scaled_dot_product_attention",
    "QKNorm",
    "RopeTables",
    "Rope2D",
    "linear",
    "mlp",
    "swiglu",
    "swiglu_mlp",
    "patch_embed",
    "resample_pos_embed",
    "resample_pos_embed_packed",
    "resample_patch_embed",
    "PatchReport",
    "patch_model",
    "unpatch_model",
    "patch_sdpa",
    "unpatch_sdpa",
    "sdpa_override",
    "nn",
    "ViT",
    "NaFlexViT",
    "PackedBatch",
    "pack_images",
    "cu_seqlens_from_mask",
    "create_model",
    "list_models",
    *list_models(),
]
