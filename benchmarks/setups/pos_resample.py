"""A packed mixed-resolution batch's position embeddings: the learned 16 x 16 grid of a NaFlex
ViT-B resampled to every image's grid (timm's default: bicubic, antialiased), forward and the
grid's gradient.

Reference: timm's rule as timm runs it, ``F.interpolate`` once per distinct grid size plus a
concatenation (vitkern's "reference" / "torch" backend), against vitkern's one launch for the
batch. Judged by GB/s against the output written and the grid read once (the taps' gathers are
L2 hits); the reference's cost is its launches, several per image in a batch of mixed sizes.
vitkern keeps a layout's tap tables on the device (``plan.device_plan``), so a repeated batch
layout skips their host build and copy; the "new layout" shape drops them before every call, as
a stream of batches that never repeat a layout pays. "vitkern-one-pass" forces the kernel's joint
order (each row's ny * nx taps gathered from the grid in one launch) where the plan takes a
separable one (two launches through an fp32 intermediate grid, ~3x fewer gathers at the 128-image
batch): the row that settles ``plan.pick_pass_order``'s threshold.
"""

from benchmarks.flops import _cost, dtype_size
from benchmarks.setups import Case, Reference, Setup, randn
from benchmarks.setups.naflex import image_sizes


def build(shape, dtype, device):
    from vitkern.ops.pos_resample import resample_pos_embed_packed_ref

    patch, grid, dim = 16, shape["grid"], shape["dim"]
    sizes = image_sizes(shape["images"], shape["min_px"], shape["max_px"], patch)
    grids = tuple((h // patch, w // patch) for h, w in sizes)
    table = randn((1, grid, grid, dim), dtype, device, scale=0.02, requires_grad=True)
    total = sum(h * w for h, w in grids)

    def vitkern_fn(vk):
        if not shape.get("new_layout"):
            return lambda t: vk.resample_pos_embed_packed(t, grids)
        from vitkern.ops.pos_resample import clear_plan_cache

        def fresh(t):
            clear_plan_cache()
            return vk.resample_pos_embed_packed(t, grids)
        return fresh

    def torch_fn(t):
        return resample_pos_embed_packed_ref(t, None, grids, "bicubic", True, False, False, dtype)

    def one_pass(t):
        from vitkern.ops.pos_resample.op import _pos_resample_triton

        return _pos_resample_triton(t, None, grids, "bicubic", True, False, False, dtype, pass_order="joint")

    s = dtype_size(dtype)
    fwd_bytes = grid * grid * dim * s + total * dim * s
    bwd_bytes = total * dim * s + grid * grid * dim * s
    return Case(
        args=(table,),
        torch_fn=torch_fn,
        vitkern_fn=vitkern_fn,
        cost=_cost(None, None, fwd_bytes, bwd_bytes),
        grad_inputs=(table,),
        torch_label=f"F.interpolate per grid size ({len(set(grids))} of {len(grids)} images) + cat",
        references={"vitkern-one-pass": Reference(one_pass, "the kernel's one-pass (joint) order forced")},
    )


def _shape(name, images, min_px, max_px, grid=16, dim=768, new_layout=False):
    return dict(name=name + (", new layout each call" if new_layout else ""), images=images, min_px=min_px,
                max_px=max_px, grid=grid, dim=dim, new_layout=new_layout)


SETUP = Setup(
    name="pos_resample",
    description="a packed batch's position embeddings: the learned grid resampled to every image's grid",
    build=build,
    gpu_shapes=(_shape("NaFlex ViT-B/16", 128, 128, 512), _shape("NaFlex ViT-B/16", 128, 128, 512, new_layout=True),
                _shape("NaFlex ViT-B/16", 32, 224, 384)),
    cpu_shapes=(_shape("NaFlex tiny", 6, 16, 80, grid=4, dim=64),
                _shape("NaFlex tiny", 6, 16, 80, grid=4, dim=64, new_layout=True)),
    order=62,
    formula="bytes only: the grid read once and the rows written (bwd: the rows' gradient read, the grid's written)",
)


def tap_stats(images: int, min_px: int, max_px: int, grid: int = 16, dim: int = 768) -> dict:
    """The batch's resampling work as the plan has it: images, distinct grid sizes, rows, the
    tables' padded tap widths, the mean non-zero taps a row (the joint order's gathers per
    output row), each order's gathered and written table rows per output row, the separable
    orders' intermediate grid rows, the order the launcher picks at width ``dim``, and the
    backward's segments (distinct x weight rows, and the most packed rows one of them sums)."""
    import torch

    from vitkern.ops.pos_resample import build_plan
    from vitkern.ops.pos_resample.plan import pick_pass_order

    grids = [(h // 16, w // 16) for h, w in image_sizes(images, min_px, max_px, 16)]
    plan = build_plan(grids, (grid, grid), "bicubic", True, False, False, torch.device("cpu"))
    taps = plan.y_count[plan.y_row.long()].double() * plan.x_count[plan.x_row.long()].double()
    n_x, n_y = plan.x_index.shape[0], plan.y_index.shape[0]
    return dict(images=images, distinct=len(set(grids)), rows=plan.total,
                padded_taps=(plan.y_index.shape[1], plan.x_index.shape[1]), mean_taps=round(taps.mean().item(), 1),
                loads_per_row={k: round(v / plan.total, 1) for k, v in plan.loads.items()},
                intermediate_rows={"x_first": grid * n_x, "y_first": grid * n_y},
                order=pick_pass_order(plan.loads, (grid, grid), dim, n_x, n_y),
                bwd_segments={"x_weight_rows": n_x, "longest": int(plan.x_seg.diff().max())})


if __name__ == "__main__":
    for shape in SETUP.gpu_shapes:
        print(shape["name"], tap_stats(shape["images"], shape["min_px"], shape["max_px"], shape["grid"]))
