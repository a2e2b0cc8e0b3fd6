"""Drop-in speed for models people already have: patch timm, torchvision and Hugging Face ViTs in
place, and route any model's ``scaled_dot_product_attention``.

- :func:`patch_model` binds vitkern's fused forwards to the attention, MLP, LayerNorm, patch
  embedding and block modules it recognises (their parameters, ``state_dict()`` and optimizer
  state stay as they are) and returns a :class:`PatchReport`; :func:`unpatch_model` restores them.
- :func:`patch_sdpa` / :func:`unpatch_sdpa` and ``with sdpa_override(): ...`` route
  ``torch.nn.functional.scaled_dot_product_attention`` (:mod:`vitkern.patching.sdpa`).

Files: ``core.py`` (installing a method on an instance, the report), ``timm.py``,
``torchvision.py``, ``hf.py`` (each library's modules: what is patched, and why not),
``sdpa.py``.
"""

from __future__ import annotations

from torch import nn

from vitkern.ops.layer_norm import layer_norm
from vitkern.patching.core import PatchReport, install, is_patched, uninstall_all
from vitkern.patching.hf import patch_hf_modules
from vitkern.patching.sdpa import patch_sdpa, sdpa_override, sdpa_patched, unpatch_sdpa
from vitkern.patching.timm import patch_timm_modules
from vitkern.patching.torchvision import patch_torchvision_modules

__all__ = [
    "PatchReport",
    "patch_model",
    "patch_sdpa",
    "sdpa_override",
    "sdpa_patched",
    "unpatch_model",
    "unpatch_sdpa",
]


def _layer_norm_forward(self, x):
    return layer_norm(x, self.weight, self.bias, self.eps)


def _known_plain_layer_norms() -> tuple:
    # Subclasses whose forward is F.layer_norm over the last dims (timm's LayerNorm, whose only
    # addition is an optional fast-norm path computing the same); not those that permute
    # (timm's LayerNorm2d normalises channels-first inputs).
    try:
        from timm.layers.norm import LayerNorm as TimmLayerNorm
    except ImportError:
        return ()
    return (TimmLayerNorm,)


def _plain_layer_norm(m: nn.Module) -> bool:
    kind = type(m)
    return kind is nn.LayerNorm or kind in _known_plain_layer_norms() or (
        issubclass(kind, nn.LayerNorm) and kind.forward is nn.LayerNorm.forward)


def _patch_layer_norms(model: nn.Module, report: PatchReport) -> None:
    from vitkern.nn.layer_norm import LayerNorm as _VkLayerNorm

    for name, m in model.named_modules():
        if not isinstance(m, nn.LayerNorm) or isinstance(m, _VkLayerNorm) or is_patched(m):
            continue
        kind = f"{type(m).__module__.split('.')[0]} {type(m).__name__}"
        if not _plain_layer_norm(m):
            report.add(name, kind, False, "a LayerNorm subclass with its own forward")
        elif len(m.normalized_shape) != 1:
            report.add(name, kind, False, "normalised over more than the last dimension")
        else:
            install(m, "forward", _layer_norm_forward)
            report.add(name, kind, True, "fused layer_norm")


def patch_model(
    model: nn.Module,
    *,
    attention: bool = True,
    mlp: bool = True,
    layer_norm: bool = True,
    patch_embed: bool = True,
    residual_fusion: bool = True,
    verbose: bool = False,
) -> PatchReport:
    """Run ``model``'s ViT modules on vitkern's fused ops, in place.

    Recognised: timm's ``VisionTransformer`` family (``Attention``, ``Mlp``, ``Block`` with
    LayerScale / drop path, ``PatchEmbed``: ViT, DeiT / DeiT-III, DINOv2 with registers, CLIP /
    SigLIP towers as far as their modules are these), torchvision's ``VisionTransformer``
    (``EncoderBlock``, the patchify conv) and Hugging Face ViT / DeiT / DINOv2 (with registers) /
    CLIP / SigLIP vision encoders, plus every plain ``nn.LayerNorm`` over the last dimension.
    With ``residual_fusion`` the blocks' residual adds (and LayerScale, drop path) move into the
    proj / fc2 GEMM epilogues. Nothing is copied: the patched forwards read the modules' own
    parameters, so ``state_dict()`` keys and values, optimizer state, ``model.to(...)``, DDP /
    FSDP2 wrapping and checkpoints loaded into an unpatched model all stay as they are.

    Returns a :class:`PatchReport` of every module patched and every one left alone, with the
    reason (``verbose`` prints it). Patching a patched model patches only what is new.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be an nn.Module, got {type(model).__name__}")
    report = PatchReport()
    flags = dict(attention=attention, mlp=mlp, patch_embed=patch_embed, residual_fusion=residual_fusion)
    patch_timm_modules(model, report, **flags)
    patch_torchvision_modules(model, report, **flags)
    patch_hf_modules(model, report, **flags)
    if layer_norm:
        _patch_layer_norms(model, report)
    if verbose:
        print(report)
    return report


def unpatch_model(model: nn.Module) -> int:
    """Restore every module :func:`patch_model` patched in ``model`` (their original forwards,
    exactly); returns how many modules were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model: model must be an nn.Module, got {type(model).__name__}")
    return uninstall_all(model)
