"""Models people already have, patched in place: ``vitkern.patch_model`` on timm's ViT-B/16,
torchvision's ``vit_b_16`` and Hugging Face's ``ViTForImageClassification`` (ViT-B/16 config),
against the same models unpatched, eager (provider ``torch``) and compiled (``torch.compile``).

The ``vitkern`` providers run a deep copy of the unpatched model (the same random weights) after
``vitkern.patch_model``; ``vitkern-triton`` etc. pin a backend for it as elsewhere. Precision,
modes and the training step are those of the ``vit`` setup (:mod:`benchmarks.setups.vit`): fp32
weights under autocast, eval inference under ``no_grad`` and one AdamW step with lr 0, compared on
the loss and the patch projection's weight gradient.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.flops import vit_config, vit_cost
from benchmarks.setups import Case, Setup, Unavailable, randn
from benchmarks.setups.vit import inference_fn, make_train_step

# library -> (model name, the shape's CPU smoke size); ViT-B/16 on a GPU
_VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)


class _Logits(torch.nn.Module):
    """A Hugging Face classifier as ``images -> logits`` (its parameters under ``model.``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(pixel_values=images).logits


def _build_model(library: str, kw: dict, img: int, num_classes: int, device):
    with torch.device(device):
        if library == "timm":
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(**kw, img_size=img, num_classes=num_classes), "timm VisionTransformer"
        if library == "torchvision":
            try:
                import torchvision.models as tvm
            except ImportError as exc:
                raise Unavailable(f"torchvision is not installed ({exc})") from exc
            model = tvm.VisionTransformer(
                image_size=img, patch_size=kw["patch_size"], num_layers=kw["depth"], num_heads=kw["num_heads"],
                hidden_dim=kw["embed_dim"], mlp_dim=4 * kw["embed_dim"], num_classes=num_classes,
            )
            return model, "torchvision VisionTransformer"
        try:
            import transformers
        except ImportError as exc:
            raise Unavailable(f"transformers is not installed ({exc})") from exc
        cfg = transformers.ViTConfig(
            hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
            intermediate_size=4 * kw["embed_dim"], image_size=img, patch_size=kw["patch_size"],
            num_labels=num_classes, attn_implementation="sdpa",
        )
        return _Logits(transformers.ViTForImageClassification(cfg)), "Hugging Face ViTForImageClassification"


def build(shape, dtype, device):
    library, img, b = shape["library"], shape["img_size"], shape["batch"]
    tiny = shape["name"].endswith("tiny")
    kw = dict(_TINY if tiny else _VIT_B)
    num_classes = 10 if tiny else 1000
    unpatched, label = _build_model(library, kw, img, num_classes, device)
    unpatched.eval()
    models = {"torch": unpatched}

    def patched(vk=None):
        if "vitkern" not in models:
            if vk is None:
                import vitkern as vk
            m = copy.deepcopy(unpatched)
            report = vk.patch_model(m)
            if not report.patched:
                raise Unavailable(f"patch_model found nothing to patch in the {label}")
            models["vitkern"] = m.eval()
        return models["vitkern"]

    images = randn((b, 3, img, img), torch.float32, device)
    labels = torch.randint(0, num_classes, (b,), device=device)
    train_step = make_train_step(lambda which: patched() if which == "vitkern" else models[which], labels, dtype,
                                 device)
    vit_kw = dict(kw, img_size=img, num_classes=num_classes)
    num_params = sum(p.numel() for p in unpatched.parameters())
    return Case(
        args=(images,),
        torch_fn=inference_fn(unpatched, dtype, device),
        vitkern_fn=lambda vk: inference_fn(patched(vk), dtype, device),
        cost=vit_cost(vit_config(vit_kw), img, b, dtype, param_dtype=torch.float32, num_params=num_params),
        torch_label=f"{label}, unpatched",
        items=b,
        train_step=train_step,
    )


def _shape(library, name, batch, img=224, train=False):
    s = dict(name=f"{library} {name}", library=library, img_size=img, batch=batch)
    if train:
        s["train"] = True
    return s


SETUP = Setup(
    name="patched",
    description=(
        "vitkern.patch_model on the models people already have (timm, torchvision, Hugging Face ViT-B/16) "
        "against the same models unpatched, eager and compiled: inference (fwd) and one AdamW training step (train)"
    ),
    build=build,
    gpu_shapes=tuple(
        s for lib in ("timm", "torchvision", "hf")
        for s in (_shape(lib, "ViT-B/16", 256, train=True), _shape(lib, "ViT-B/16", 8))
    ),
    cpu_shapes=tuple(_shape(lib, "tiny", 4, img=32, train=True) for lib in ("timm", "torchvision", "hf")),
    modes=("fwd", "train"),
    modes_for=lambda shape: ("fwd", "train") if shape.get("train") else ("fwd",),
    order=210,
    kind="model",
    formula="vit_cost of the same ViT config (see the vit setup)",
)
