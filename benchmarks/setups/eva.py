"""EVA-02-B/14 (QK-norm-free EVA-02 with 2-D RoPE, SwiGLU with its norm): timm's ``Eva`` against
vitkern's ``Eva.from_timm`` of the same random weights, eager (provider ``torch``) and compiled
(``torch.compile``): inference (fwd) and one AdamW training step (train), with the precision,
modes and training step of the ``vit`` setup (:mod:`benchmarks.setups.vit`)."""

from __future__ import annotations

import torch

from benchmarks.flops import vit_config, vit_cost
from benchmarks.setups import Case, Setup, Unavailable, randn
from benchmarks.setups.vit import inference_fn, make_train_step

_EVA02_B = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12)
_TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)


def build(shape, dtype, device):
    try:
        import timm
    except ImportError as exc:
        raise Unavailable(f"timm is not installed ({exc})") from exc
    img, b = shape["img_size"], shape["batch"]
    tiny = shape["name"].endswith("tiny")
    kw = dict(_TINY if tiny else _EVA02_B)
    num_classes = 10 if tiny else 1000
    with torch.device(device):
        ref = timm.create_model("eva02_base_patch14_224", pretrained=False, img_size=img, num_classes=num_classes,
                                ref_feat_shape=(img // kw["patch_size"],) * 2, **kw).eval()
    models = {"torch": ref}

    def ours(vk=None):
        if "vitkern" not in models:
            if vk is None:
                import vitkern as vk
            models["vitkern"] = vk.models.Eva.from_timm(ref).eval()
        return models["vitkern"]

    images = randn((b, 3, img, img), torch.float32, device)
    labels = torch.randint(0, num_classes, (b,), device=device)
    train_step = make_train_step(lambda which: ours() if which == "vitkern" else models[which], labels, dtype,
                                 device)
    num_params = sum(p.numel() for p in ref.parameters())
    return Case(
        args=(images,),
        torch_fn=inference_fn(ref, dtype, device),
        vitkern_fn=lambda vk: inference_fn(ours(vk), dtype, device),
        # SwiGLU at 4 x 2 / 3 with three matrices has the GELU MLP's 8 d^2 weights: the ViT count holds
        cost=vit_cost(vit_config(dict(kw, img_size=img, num_classes=num_classes)), img, b, dtype,
                      param_dtype=torch.float32, num_params=num_params),
        torch_label="timm Eva (eva02_base_patch14_224 config)",
        items=b,
        train_step=train_step,
    )


def _shape(name, batch, img=224, train=False):
    s = dict(name=name, img_size=img, batch=batch)
    if train:
        s["train"] = True
    return s


SETUP = Setup(
    name="eva",
    description="EVA-02-B/14: timm's Eva against vitkern's Eva (same weights), eager and compiled",
    build=build,
    gpu_shapes=(_shape("EVA-02-B/14", 256, train=True), _shape("EVA-02-B/14", 8)),
    cpu_shapes=(_shape("EVA-02 tiny", 2, img=32, train=True),),
    modes=("fwd", "train"),
    modes_for=lambda shape: ("fwd", "train") if shape.get("train") else ("fwd",),
    order=220,
    kind="model",
    formula="vit_cost of the ViT with the same width, depth, heads and patch (the SwiGLU MLP has as many weights)",
)
