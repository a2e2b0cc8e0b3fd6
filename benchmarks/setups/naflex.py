"""Mixed-resolution batches: timm's ``NaFlexVit`` (every image padded to the longest sequence, a dense
(B, 1, T, T) additive mask, SDPA) against vitkern's ``NaFlexViT`` of the same random weights on the
same images, packed end to end (``vitkern.pack_images`` + ``forward_packed``: GEMMs over the real
tokens only, one varlen attention call a block). The "vitkern-padded" reference runs vitkern's model
on timm's padded batch (the key-padding attention path: no mask tensor, but GEMMs over the
padding). Inference, autocast in the run's dtype; images/s and peak memory per provider."""

from __future__ import annotations

import torch

from benchmarks.flops import Cost, vit_config, vit_cost
from benchmarks.setups import Case, Reference, Setup, Unavailable

_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)


def image_sizes(count: int, min_px: int, max_px: int, patch: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` (H, W) pairs, multiples of ``patch``: the longer side uniform in [min_px, max_px],
    aspect ratio log-uniform in [1:3, 3:1] (the shorter side at least one patch)."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    for _ in range(count):
        long_side = int(torch.randint(min_px, max_px + 1, (1,), generator=g))
        aspect = float(torch.empty(1).uniform_(-1.0986, 1.0986, generator=g).exp())  # ln 3
        h, w = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
        sizes.append((max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)))
    return sizes


def _cost(kw, sizes, dtype) -> Cost:
    # the real tokens' work: a ViT of this width / depth on each image at its own size
    cfg = vit_config(dict(kw, class_token=False, reg_tokens=4, global_pool="avg", num_classes=1000))
    flops, nbytes = {}, {}
    for s in sorted(set(sizes)):
        c = vit_cost(cfg, s, sizes.count(s), dtype, param_dtype=torch.float32)
        for mode, v in c.flops.items():
            flops[mode] = None if v is None or flops.get(mode, 0) is None else flops.get(mode, 0) + v
        for mode, v in c.bytes.items():
            nbytes[mode] = nbytes.get(mode, 0) + v
    return Cost(flops=flops, bytes=nbytes)


def build(shape, dtype, device):
    try:
        import timm
        import timm.models.naflexvit  # noqa: F401  (timm versions before NaFlex have no such module)
    except ImportError as exc:
        raise Unavailable(f"timm with NaFlexVit is not installed ({exc})") from exc
    import vitkern

    tiny = shape["name"].endswith("tiny")
    kw = dict(_TINY if tiny else _BASE)
    with torch.device(device):
        ref = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, num_classes=1000,
                                **kw).eval()
    ours = vitkern.NaFlexViT.from_timm(ref).eval()
    sizes = image_sizes(shape["images"], shape["min_px"], shape["max_px"], kw["patch_size"])
    images = [torch.randn(3, h, w, device=device) for h, w in sizes]
    packed = vitkern.pack_images(images, kw["patch_size"])
    batch = packed.padded()
    amp = dtype != torch.float32

    def run(model, x):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(x)

    padded_tokens = batch["patches"].shape[0] * batch["patches"].shape[1]
    return Case(
        args=(batch["patches"], batch["patch_coord"], batch["patch_valid"]),
        torch_fn=lambda p, c, v: run(ref, {"patches": p, "patch_coord": c, "patch_valid": v}),
        vitkern_fn=lambda vk: lambda p, c, v: run(ours, packed),
        cost=_cost(kw, sizes, dtype),
        torch_label=f"timm NaFlexVit, padded to {packed.max_seqlen} tokens + dense mask "
                    f"({packed.patches.shape[0]} real of {padded_tokens})",
        items=len(sizes),
        references={
            "vitkern-padded": Reference(
                fn=lambda p, c, v: run(ours, {"patches": p, "patch_coord": c, "patch_valid": v}),
                label="vitkern NaFlexViT on timm's padded batch (key-padding attention)"),
        },
    )


def _shape(name, images, min_px, max_px):
    return dict(name=name, images=images, min_px=min_px, max_px=max_px)


SETUP = Setup(
    name="naflex",
    description="mixed-resolution batches: timm NaFlexVit (padded + mask) vs vitkern NaFlexViT packed (varlen)",
    build=build,
    gpu_shapes=(_shape("NaFlex ViT-B/16", 128, 128, 512), _shape("NaFlex ViT-B/16", 32, 224, 384)),
    cpu_shapes=(_shape("NaFlex tiny", 3, 16, 48),),
    modes=("fwd",),
    order=230,
    kind="model",
    formula="the sum over images of vit_cost at each image's own size (real tokens only)",
)
