"""A whole Vision Transformer: images/s and peak memory for inference and for a training step.

Models, all with the same random weights:

- ``torch``: timm's ``VisionTransformer`` (eager; its attention calls
  ``F.scaled_dot_product_attention``), built on the device with timm's init;
- ``torch.compile``: that model's forward compiled (default mode, static shapes);
- ``torchvision``: torchvision's ``vit_b_16`` / ``vit_l_16`` / ``vit_h_14`` (the weights mapped by
  ``vitkern.models.convert``'s key table); a "skipped" row for ViT-S/16, which torchvision does not
  have. The CPU smoke config is torchvision's ``VisionTransformer`` class at the same size;
- the vitkern providers: ``vitkern.ViT`` with the same constructor keywords and
  ``load_state_dict(timm_model.state_dict())``.

Precision: the models keep fp32 weights and run under ``torch.autocast`` in the run's dtype (bf16 on
a GPU), for inference as for training, as timm's ``train.py --amp`` and ``benchmark.py --amp`` (the
source of its published results) run them. The CPU run is plain fp32, no autocast.

Modes:

- ``fwd``: inference, eval mode, under ``torch.no_grad()``; the logits are compared.
- ``train``: one step of ``AdamW(lr=0, weight_decay=0.05)``: forward, cross-entropy against fixed
  random labels, backward, optimizer step, ``zero_grad(set_to_none=True)`` (so the gradients count
  in the step's peak memory, not in what was allocated before it). The update runs in full but with
  lr 0 it leaves the weights as they are, so every repetition and every provider starts from the
  same weights and their results compare: the loss, and the patch projection's weight gradient (the
  far end of the backward pass) divided by the first step's largest value so that the runner's
  tolerance applies to it as to the loss. Training runs at one batch per model (the shape marked
  ``train``): 256 for ViT-S/B, 64 for ViT-L/H (80 GB cards).

FLOPs and bytes: :func:`benchmarks.flops.vit_cost` (fwd: :func:`~benchmarks.flops.vit_flops`; train:
forward plus backward; the optimizer's elementwise work is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks.flops import vit_config, vit_cost
from benchmarks.setups import Case, Reference, Setup, randn


@dataclass(frozen=True)
class _Model:
    kwargs: dict  # VisionTransformer / vitkern.ViT keywords (img_size comes from the shape)
    torchvision: Optional[str] = None  # torchvision.models builder, "class" for VisionTransformer(...)
    num_classes: int = 1000


MODELS = {
    "ViT-S/16": _Model(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "ViT-B/16": _Model(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), "vit_b_16"),
    "ViT-L/16": _Model(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), "vit_l_16"),
    "ViT-H/14": _Model(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), "vit_h_14"),
    # The CPU smoke config: patch 8, width 64, depth 2, 2 heads, 10 classes.
    "tiny": _Model(dict(patch_size=8, embed_dim=64, depth=2, num_heads=2), "class", num_classes=10),
}
TORCHVISION_VITS = "vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14"
LR = 0.0
WEIGHT_DECAY = 0.05


def _torchvision_model(name: str, spec: _Model, img: int, device):
    """``(model, label)``: torchvision's model for ``spec``, randomly initialised on ``device``, or
    ``(None, why there is none)``."""
    if spec.torchvision is None:
        return None, f"torchvision has no {name} (its ViTs: {TORCHVISION_VITS})"
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        return None, f"torchvision is not installed ({exc})"
    k = spec.kwargs
    with torch.device(device):
        if spec.torchvision == "class":
            model = tvm.VisionTransformer(
                image_size=img, patch_size=k["patch_size"], num_layers=k["depth"], num_heads=k["num_heads"],
                hidden_dim=k["embed_dim"], mlp_dim=4 * k["embed_dim"], num_classes=spec.num_classes,
            )
            return model, "torchvision VisionTransformer"
        model = getattr(tvm, spec.torchvision)(weights=None, image_size=img, num_classes=spec.num_classes)
        return model, f"torchvision {spec.torchvision}"


def _load_timm_weights_into_torchvision(tv_model, timm_state: dict) -> None:
    from vitkern.models.convert import convert_torchvision_state_dict

    # The converter only renames keys, so feeding it torchvision's own key names as the values gives
    # the table timm key -> torchvision key.
    names = convert_torchvision_state_dict({k: k for k in tv_model.state_dict()})
    tv_model.load_state_dict({tv_key: timm_state[timm_key] for timm_key, tv_key in names.items()})


def autocast_forward(model, dtype, device):
    """``model(images)`` under autocast in ``dtype`` (plain fp32 when ``dtype`` is float32)."""
    amp = dtype != torch.float32

    def fn(images):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(images)

    return fn


def inference_fn(model, dtype, device):
    """The fwd mode's callable: eval mode (also after a training step), autocast."""
    run = autocast_forward(model, dtype, device)

    def fn(images):
        if model.training:
            model.eval()
        return run(images)

    fn.model = model
    return fn


def make_train_step(get_model, labels, dtype, device):
    """``Case.train_step`` for models returning logits: ``train_step(which, wrap)`` gives one AdamW
    step of ``get_model(which)`` (its forward wrapped by ``wrap``) returning the loss and the patch
    projection's weight gradient (the model's first 4-d parameter), scaled by the first step's
    largest value."""
    optimizers: dict = {}
    grad_scale: dict = {}

    def train_step(which, wrap):
        model = get_model(which)
        model.train()
        fwd = wrap(autocast_forward(model, dtype, device))
        if which not in optimizers:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
            optimizers[which] = (opt, scaler)
        opt, scaler = optimizers[which]
        probe = next(p for p in model.parameters() if p.dim() == 4)  # the patch projection

        def step(images):
            loss = F.cross_entropy(fwd(images).float(), labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            grad = probe.grad
            opt.zero_grad(set_to_none=True)
            if "value" not in grad_scale:  # set once, by the first step of this case (the reference's)
                grad_scale["value"] = float(grad.abs().max()) or 1.0
            return loss.detach(), grad / grad_scale["value"]

        return step

    return train_step


def build(shape, dtype, device):
    from timm.models.vision_transformer import VisionTransformer

    name, img, b = shape["name"], shape["img_size"], shape["batch"]
    spec = MODELS[name]
    kw = dict(spec.kwargs, img_size=img, num_classes=spec.num_classes)
    with torch.device(device):
        timm_model = VisionTransformer(**kw).eval()
    state = timm_model.state_dict()
    fused = all(getattr(blk.attn, "fused_attn", False) for blk in timm_model.blocks)
    models = {"torch": timm_model}

    tv_model, tv_label = _torchvision_model(name, spec, img, device)
    if tv_model is not None:
        _load_timm_weights_into_torchvision(tv_model, state)
        models["torchvision"] = tv_model.eval()

    def vitkern_model(vk=None):
        if "vitkern" not in models:
            if vk is None:
                import vitkern as vk
            m = vk.ViT(**kw, weight_init="skip", device=device)
            m.load_state_dict(state)
            models["vitkern"] = m.eval()
        return models["vitkern"]

    images = randn((b, 3, img, img), torch.float32, device)  # fp32: autocast casts
    labels = torch.randint(0, spec.num_classes, (b,), device=device)
    train_step = make_train_step(lambda which: vitkern_model() if which == "vitkern" else models[which], labels,
                                 dtype, device)

    num_params = sum(p.numel() for p in timm_model.parameters())
    return Case(
        args=(images,),
        torch_fn=inference_fn(timm_model, dtype, device),
        vitkern_fn=lambda vk: inference_fn(vitkern_model(vk), dtype, device),
        cost=vit_cost(vit_config(kw), img, b, dtype, param_dtype=torch.float32, num_params=num_params),
        torch_label=(
            "timm VisionTransformer, " + ("SDPA attention" if fused else "attention without SDPA (TIMM_FUSED_ATTN?)")
        ),
        items=b,
        references={
            "torchvision": Reference(inference_fn(tv_model, dtype, device) if tv_model is not None else None, tv_label)
        },
        train_step=train_step,
    )


def _shape(name, batch, train=False):
    s = dict(name=name, img_size=224, batch=batch)
    if train:
        s["train"] = True
    return s


SETUP = Setup(
    name="vit",
    description=(
        "a whole ViT (timm's VisionTransformer as the reference): inference (fwd) and one AdamW training step "
        "(train, at the shapes marked train); fp32 weights under autocast"
    ),
    build=build,
    gpu_shapes=(
        _shape("ViT-B/16", 256, train=True),  # the headline case first: the --quick set
        _shape("ViT-B/16", 1),
        _shape("ViT-L/16", 64, train=True),
        _shape("ViT-H/14", 64, train=True),
        _shape("ViT-S/16", 256, train=True),
        _shape("ViT-B/16", 8),
        _shape("ViT-B/16", 64),
        _shape("ViT-S/16", 1),
        _shape("ViT-S/16", 8),
        _shape("ViT-S/16", 64),
        _shape("ViT-L/16", 1),
        _shape("ViT-L/16", 8),
        _shape("ViT-L/16", 256),
        _shape("ViT-H/14", 1),
        _shape("ViT-H/14", 8),
        _shape("ViT-H/14", 256),
    ),
    cpu_shapes=(dict(name="tiny", img_size=32, batch=4, train=True),),
    modes=("fwd", "train"),
    modes_for=lambda shape: ("fwd", "train") if shape.get("train") else ("fwd",),
    order=200,
    kind="model",
    formula="vit_cost: vit_flops fwd (2 x MACs of patch embed, qkv, attention, proj, fc1, fc2, head); train adds the "
    "backward (2x GEMMs, 1x patch embed, 2.5x attention); bytes: weights, images, logits (+ grads, AdamW state)",
)
