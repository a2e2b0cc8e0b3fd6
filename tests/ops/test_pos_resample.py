"""The packed position-embedding resampling (vitkern.ops.pos_resample): the Triton kernel against
the float64 per-grid reference (timm NaFlex's F.interpolate rule) for every mode, antialias and
align_corners setting, aspect-preserving crops and the factorized tables, forward and both table
gradients in fp32 / bf16 / fp16; the separable weights against F.interpolate itself; argument
errors; determinism; the registered ops under opcheck; torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.ops.pos_resample import (axis_weights, build_plan, grid_pos_embed_ref, resample_pos_embed_packed,
                                      resample_pos_embed_packed_ref)
from vitkern.testing.numerics import assert_flash_rule

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# image grids below, at and above a 4 x 5 learned grid, both aspects, a repeat, a single patch
GRIDS = ((3, 5), (4, 5), (6, 2), (1, 1), (2, 7), (9, 8), (3, 5))
SETTINGS = [  # (mode, antialias, align_corners, aspect_preserving)
    ("bicubic", True, False, False),   # timm NaFlex's default
    ("bicubic", False, False, True),
    ("bicubic", False, True, False),
    ("bilinear", True, False, True),
    ("bilinear", False, False, False),
    ("nearest", False, False, False),
    ("area", False, False, True),
]


def _tables(factorized, dim, device, gh=4, gw=5):
    if factorized:
        return (torch.randn(1, gh, dim, dtype=torch.float64, device=device),
                torch.randn(1, gw, dim, dtype=torch.float64, device=device))
    return torch.randn(1, gh, gw, dim, dtype=torch.float64, device=device), None


def _check(factorized, setting, dtype, device, dim=40, grids=GRIDS):
    mode, aa, ac, ar = setting
    table64, table_x64 = _tables(factorized, dim, device)
    kw = dict(mode=mode, antialias=aa, align_corners=ac, aspect_preserving=ar)

    def run(table, table_x, out_dtype, backend):
        leaves = [t.detach().requires_grad_() for t in (table, table_x) if t is not None]
        table_x = leaves[1] if factorized else None
        if out_dtype == torch.float64:  # the public function takes the kernels' dtypes
            return resample_pos_embed_packed_ref(leaves[0], table_x, grids, mode, aa, ac, ar, out_dtype), leaves
        with vitkern.use_backend(backend):
            out = resample_pos_embed_packed(leaves[0], grids, pos_embed_x=table_x, dtype=out_dtype, **kw)
        return out, leaves

    ref, ref_leaves = run(table64, table_x64, torch.float64, "reference")
    lp = (table64.to(dtype), table_x64.to(dtype) if factorized else None)
    torch_out, torch_leaves = run(*lp, dtype, "reference")
    got, got_leaves = run(*lp, dtype, "triton")
    assert got.shape == (sum(h * w for h, w in grids), dim) and got.dtype == dtype
    # the kernel sums its taps in fp32 (torch's CPU resampling accumulates in double): the
    # accumulation bound, taps x eps x the largest term, is the atol's scale
    source = (table64.shape[1], table_x64.shape[1]) if factorized else table64.shape[1:3]
    plan = build_plan(grids, source, "bilinear" if factorized else mode, aa and not factorized,
                      ac and not factorized, ar, torch.device("cpu"), learned=not factorized)
    ty, tx = plan.y_index.shape[1], plan.x_index.shape[1]
    taps = ty + tx if factorized else ty * tx
    assert_flash_rule("out", got, ref, torch_out, dtype, scale=taps * table64.abs().max().item())
    grad = torch.randn(ref.shape, dtype=torch.float64, device=device)
    for out, leaves in ((ref, ref_leaves), (torch_out, torch_leaves), (got, got_leaves)):
        out.backward(grad.to(out.dtype))
    for name, r, t, g in zip(("d pos_embed", "d pos_embed_x"), ref_leaves, torch_leaves, got_leaves):
        assert g.grad.dtype == dtype
        assert_flash_rule(name, g.grad, r.grad, t.grad, dtype, scale=grad.abs().sum(0).max().item())


@pytest.fixture(params=["joint", "x_first", "y_first"])
def pass_order(request, monkeypatch):
    """Each of the kernel's pass orders, forced (the launcher's own choice is tested below)."""
    from vitkern.ops.pos_resample import op

    monkeypatch.setattr(op, "pick_pass_order", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_learned_grid_matches_reference(setting, dtype, pass_order, device):
    _check(False, setting, dtype, device)


@pytest.mark.parametrize("ar", [False, True], ids=["crop", "square"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_factorized_tables_match_reference(ar, dtype, device):
    _check(True, ("bilinear", False, False, ar), dtype, device)


def test_naflex_base_shape_bf16(pass_order, device):
    """A ViT-B NaFlex shape class: the 16 x 16 grid, D = 768, downsampled and upsampled images."""
    _check(False, SETTINGS[0], BF16, device, dim=96, grids=((8, 24), (16, 16), (32, 11), (5, 5)))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s))
def test_separable_weights_are_f_interpolate(setting):
    """The claim the kernel rests on: two 1-D weight matrices reproduce F.interpolate's 2-D result."""
    mode, aa, ac, _ = setting
    grid = torch.randn(1, 3, 16, 12, dtype=torch.float64)
    kwargs = {} if mode in ("nearest", "area") else dict(antialias=aa, align_corners=ac)
    for size in ((5, 7), (16, 12), (32, 9), (3, 40), (1, 1), (64, 2)):
        want = F.interpolate(grid, size=size, mode=mode, **kwargs)[0]
        wy, wx = axis_weights(16, size[0], mode, aa, ac), axis_weights(12, size[1], mode, aa, ac)
        got = torch.einsum("yi,xj,cij->cyx", wy, wx, grid[0])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_plan_tables():
    plan = build_plan(((2, 3), (1, 4), (2, 3)), (4, 4), "bicubic", False, False, False, torch.device("cpu"))
    assert plan.total == 6 + 4 + 6 and plan.y_index.shape[1] == 4 and plan.x_index.shape[1] == 4
    assert torch.equal(plan.y_count, (plan.y_weight != 0).sum(1).int())
    for w, n in ((plan.y_weight, plan.y_count), (plan.x_weight, plan.x_count)):  # non-zero taps first
        assert all((w[i, :n[i]] != 0).all() and (w[i, n[i]:] == 0).all() for i in range(w.shape[0]))
    # each row's taps reproduce its dense weight row; padding taps carry weight 0
    for table, idx, w in ((plan.y_dense, plan.y_index, plan.y_weight), (plan.x_dense, plan.x_index, plan.x_weight)):
        rebuilt = torch.zeros_like(table).scatter_add_(1, idx.long(), w)
        torch.testing.assert_close(rebuilt, table)
    # rows of image 0: y = 0, 0, 0, 1, 1, 1 in the length-2 table; x = 0, 1, 2 in the length-3 table
    assert plan.y_row[:6].tolist() == [0, 0, 0, 1, 1, 1] and plan.x_row[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert plan.y_row[6:10].tolist() == [2] * 4 and plan.y_row[10:].tolist() == plan.y_row[:6].tolist()


def test_pass_loads_count_the_gathers():
    """pass_loads against a direct count of what each order gathers and writes."""
    from vitkern.ops.pos_resample.plan import pass_loads

    grids = ((3, 5), (6, 2), (9, 8), (3, 5))
    plan = build_plan(grids, (4, 5), "bicubic", True, False, False, torch.device("cpu"))
    ny, nx = plan.y_count.tolist(), plan.x_count.tolist()
    ys, xs = plan.y_row.tolist(), plan.x_row.tolist()
    joint = sum(ny[y] * nx[x] for y, x in zip(ys, xs))
    x_first = sum(4 * nx[j] + 4 for j in range(len(nx))) + sum(ny[y] for y in ys)
    y_first = sum(5 * ny[i] + 5 for i in range(len(ny))) + sum(nx[x] for x in xs)
    assert plan.loads == {"joint": joint, "x_first": x_first, "y_first": y_first}
    assert plan.loads == pass_loads(plan.y_count, plan.x_count, plan.y_row, plan.x_row, (4, 5))
    factorized = build_plan(grids, (4, 5), "bilinear", False, False, False, torch.device("cpu"), learned=False)
    assert factorized.loads == {}


def test_plan_groups_the_rows_of_each_x_weight_row():
    """The backward's segments: ``x_perm`` lists the packed rows by x weight row, stably (packed
    order within a segment, so the sum's order is fixed), and ``x_seg`` holds each segment's
    bounds, empty for an x weight row no packed row uses."""
    grids = ((3, 5), (6, 2), (9, 8), (3, 5), (1, 1))
    for ar in (False, True):
        plan = build_plan(grids, (4, 5), "bicubic", True, False, ar, torch.device("cpu"))
        x_row, perm, seg = plan.x_row.long(), plan.x_perm.long(), plan.x_seg.long()
        assert plan.x_perm.dtype == plan.x_seg.dtype == torch.int32
        assert sorted(perm.tolist()) == list(range(plan.total))
        assert seg.shape[0] == plan.x_index.shape[0] + 1 and seg[0] == 0 and seg[-1] == plan.total
        for xr in range(plan.x_index.shape[0]):
            members = perm[seg[xr]:seg[xr + 1]]
            assert (x_row[members] == xr).all()
            assert members.tolist() == (x_row == xr).nonzero().flatten().tolist()


def test_pick_pass_order():
    """The launcher's choice: one launch for a few small images, a separable order for a batch
    of many (the benchmark's 128-image NaFlex batch: 17.1 gathers a row joint, 5.2 separable),
    never an intermediate grid past int32 offsets."""
    from vitkern.ops.pos_resample import plan as plan_module
    from vitkern.ops.pos_resample.plan import pick_pass_order

    def order(grids, dim=768, source=(16, 16)):
        p = build_plan(grids, source, "bicubic", True, False, False, torch.device("cpu"))
        return pick_pass_order(p.loads, source, dim, p.x_index.shape[0], p.y_index.shape[0]), p

    assert order(((14, 14),))[0] == "joint"
    assert order(((16, 16),))[0] == "joint"           # the grid's own size: one tap a row
    batch = [(h, w) for h in range(4, 33, 3) for w in range(5, 33, 4)] * 2
    got, p = order(batch)
    assert got in ("x_first", "y_first") and p.loads[got] * 2 < p.loads["joint"]
    assert pick_pass_order({}, (16, 16), 768, 1, 1) == "joint"
    from vitkern.ops.pos_resample.launch import _pos_resample_fwd

    t = torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="pass_order"):   # checked for factorized tables too
        _pos_resample_fwd(torch.zeros(4, 5, 8), torch.zeros(5, 8), t[:, 0], t[:, 0], t, t.float(), t[:, 0], t,
                          t.float(), t[:, 0], F32, "rows_first")
    huge = dict(p.loads, joint=10 ** 12)              # the separable orders win on gathers...
    assert pick_pass_order(huge, (16, 16), 768, p.x_index.shape[0], p.y_index.shape[0]) != "joint"
    rows = plan_module.MAX_INTERMEDIATE_ELEMENTS // 768 // 16 + 1   # ...unless their grid overflows int32
    assert pick_pass_order(huge, (16, 16), 768, rows, rows) == "joint"


def test_the_launcher_picks_the_separable_order_for_a_batch(monkeypatch, device):
    """The order the launcher takes reaches the op, and its output is the joint order's."""
    from vitkern.ops.pos_resample import op
    from vitkern.ops.pos_resample import plan as plan_module

    seen, real = [], op.pick_pass_order
    monkeypatch.setattr(op, "pick_pass_order", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(plan_module, "SECOND_PASS_BYTES", 0)   # the second launch free at this small size
    table = torch.randn(1, 4, 5, 32, device=device)
    with vitkern.use_backend("triton"):
        got = resample_pos_embed_packed(table, GRIDS * 3)
    assert seen[-1] != "joint"
    monkeypatch.setattr(op, "pick_pass_order", lambda *a: "joint")
    with vitkern.use_backend("triton"):
        want = resample_pos_embed_packed(table, GRIDS * 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backward_tiles_a_tall_grid_and_wide_rows(device):
    """The backward kernel's program grid beyond one tile: a learned grid of 70 rows (five BLOCK_I
    = 16 blocks) and D = 136 (two BLOCK_D = 128 blocks), rows of one x weight row spread over
    several images, and x weight rows that no packed row uses (the aspect-preserving crop)."""
    table = torch.randn(1, 70, 3, 136, dtype=torch.float64, device=device)
    grids = ((5, 2), (9, 3), (5, 2), (2, 6))
    grad = torch.randn(sum(h * w for h, w in grids), 136, dtype=torch.float64, device=device)
    for ar in (False, True):
        kw = dict(mode="bilinear", antialias=False, align_corners=False, aspect_preserving=ar)
        ref = table.detach().requires_grad_()
        want = torch.autograd.grad(resample_pos_embed_packed_ref(ref, None, grids, "bilinear", False, False, ar,
                                                                 torch.float64), ref, grad)[0]
        leaf = table.detach().float().requires_grad_()
        with vitkern.use_backend("triton"):
            got = torch.autograd.grad(resample_pos_embed_packed(leaf, grids, **kw), leaf, grad.float())[0]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(device):
    table = torch.randn(1, 4, 5, 32, device=device, requires_grad=True)
    grad = torch.randn(sum(h * w for h, w in GRIDS), 32, device=device)
    with vitkern.use_backend("triton"):
        grads = [torch.autograd.grad(resample_pos_embed_packed(table, GRIDS), table, grad)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_empty_batch_and_identity(device):
    table = torch.randn(1, 4, 5, 16, device=device)
    with vitkern.use_backend("triton"):
        assert resample_pos_embed_packed(table, ()).shape == (0, 16)
        # the learned grid's own size is the table itself, exactly
        assert torch.equal(resample_pos_embed_packed(table, [(4, 5)]), table.reshape(20, 16))


def test_bad_arguments_name_themselves():
    table = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match=r"grid_sizes\[1\]"):
        resample_pos_embed_packed(table, [(2, 2), (0, 3)])
    with pytest.raises(TypeError, match="grid_sizes"):
        resample_pos_embed_packed(table, torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="pos_embed must have"):
        resample_pos_embed_packed(table[0], [(2, 2)])
    with pytest.raises(ValueError, match="mode"):
        resample_pos_embed_packed(table, [(2, 2)], mode="trilinear")
    with pytest.raises(ValueError, match="pos_embed_x"):
        resample_pos_embed_packed(torch.randn(1, 4, 16), [(2, 2)], pos_embed_x=torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="dtype"):
        resample_pos_embed_packed(table, [(2, 2)], dtype=torch.float64)


def test_opcheck_ops(device):
    table = torch.randn(4, 5, 24, device=device, requires_grad=True)
    plan = build_plan(GRIDS[:3], (4, 5), "bicubic", True, False, False, device)
    args = (table, None, plan.y_row, plan.x_row, plan.y_index, plan.y_weight, plan.y_count, plan.y_dense,
            plan.x_index, plan.x_weight, plan.x_count, plan.x_dense, plan.x_perm, plan.x_seg, BF16)
    for order in ("joint", "x_first", "y_first"):
        torch.library.opcheck(torch.ops.vitkern.pos_resample_fwd.default, args + (order,),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    grad = torch.randn(plan.total, 24, device=device)
    torch.library.opcheck(torch.ops.vitkern.pos_resample_bwd.default,
                          (grad, table.detach(), None, plan.y_row, plan.x_row, plan.y_dense, plan.x_dense, plan.x_perm,
                           plan.x_seg))


def test_torch_compile_fullgraph(device):
    """Under torch.compile the reference's ops trace (no graph break) and give the kernel's values."""
    torch._dynamo.reset()
    table = torch.randn(1, 4, 5, 16, device=device)

    def fn(t):
        return resample_pos_embed_packed(t, GRIDS) * 2

    with vitkern.use_backend("triton"):
        eager = fn(table)
    explained = torch._dynamo.explain(fn)(table)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(table)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_grid_reference_is_timm_rule():
    """grid_pos_embed_ref is F.interpolate of the NCHW grid, cropped when aspect-preserving."""
    table = torch.randn(1, 4, 5, 8)
    want = F.interpolate(table.permute(0, 3, 1, 2), size=(7, 7), mode="bicubic", antialias=True,
                         align_corners=False)[0, :, :3, :7].flatten(1).t()
    got = grid_pos_embed_ref(table, None, (3, 7), "bicubic", True, False, True, torch.float32)
    torch.testing.assert_close(got, want)
    packed = resample_pos_embed_packed_ref(table, None, ((3, 7), (4, 5)), "bicubic", True, False, True, F32)
    torch.testing.assert_close(packed[:21], want)
    torch.testing.assert_close(packed[21:], table.reshape(20, 8))  # timm: its own size as it is


def test_own_size_is_the_table_when_aspect_preserving(device):
    table = torch.randn(1, 4, 5, 8, device=device)
    with vitkern.use_backend("triton"):
        got = resample_pos_embed_packed(table, [(4, 5), (5, 5)], aspect_preserving=True)
    torch.testing.assert_close(got[:20], table.reshape(20, 8), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The plans kept on the device (plan.device_plan): reuse, CUDA graph capture, streams
# --------------------------------------------------------------------------------------------


@pytest.fixture
def plans(monkeypatch):
    """The plan cache, empty, with build_plan counted."""
    from vitkern.ops.pos_resample import plan as plan_module

    plan_module.clear_plan_cache()
    built = []
    real = plan_module.build_plan
    monkeypatch.setattr(plan_module, "build_plan", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    yield plan_module, built
    plan_module.clear_plan_cache()


def test_a_repeated_layout_reuses_its_device_plan(plans, device):
    plan_module, built = plans
    table = torch.randn(1, 4, 5, 16, device=device)
    with vitkern.use_backend("triton"):
        first = resample_pos_embed_packed(table, GRIDS)
        again = resample_pos_embed_packed(table, [list(g) for g in GRIDS])   # the same layout, as lists
        other = resample_pos_embed_packed(table, GRIDS[:3])
    assert torch.equal(first, again) and torch.equal(other, first[:other.shape[0]])
    assert len(built) == 2
    key = lambda grids: (grids, (4, 5), "bicubic", True, False, False, True, table.device)  # noqa: E731
    assert plan_module.device_plan(GRIDS, (4, 5), "bicubic", True, False, False, table.device) is \
        plan_module._plans[key(GRIDS)].plan


def test_the_least_recent_unpinned_plans_are_evicted(plans, monkeypatch):
    plan_module, built = plans
    monkeypatch.setattr(plan_module, "PLAN_CACHE_SIZE", 3)
    cpu = torch.device("cpu")
    layouts = [((n, 2),) for n in range(1, 7)]

    def get(layout):
        return plan_module.device_plan(layout, (4, 5), "bilinear", False, False, False, cpu)

    capturing = []
    monkeypatch.setattr(plan_module, "_capturing", lambda device: bool(capturing))
    for layout in layouts[:3]:
        get(layout)
    capturing.append(True)
    pinned = get(layouts[0])                  # read in a capture: pinned
    assert get(((9, 9),)) is None             # a new layout in a capture: nothing to copy from the host
    capturing.clear()
    for layout in layouts[3:]:
        get(layout)
    kept = [k[0] for k in plan_module._plans]
    assert kept == [layouts[0], *layouts[3:]]   # the pinned plan and the three most recent
    assert get(layouts[0]) is pinned and len(built) == 6


def test_a_capture_of_a_new_layout_runs_device_ops_only(plans, monkeypatch, device):
    """During a CUDA graph capture a layout without a device plan takes the reference's ops (no
    host-to-device copy), which give the kernel's values; a layout built before the capture
    keeps the kernel."""
    plan_module, built = plans
    table = torch.randn(1, 4, 5, 24, device=device, requires_grad=True)
    with vitkern.use_backend("triton"):
        warm = resample_pos_embed_packed(table, GRIDS)
        monkeypatch.setattr(plan_module, "_capturing", lambda device: True)
        seen = resample_pos_embed_packed(table, GRIDS)
        new = resample_pos_embed_packed(table, GRIDS[1:])
    assert torch.equal(seen, warm) and len(built) == 1
    assert seen.grad_fn.name() == warm.grad_fn.name() != new.grad_fn.name()
    torch.testing.assert_close(new, warm[GRIDS[0][0] * GRIDS[0][1]:], rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(new.sum(), table)
    assert grad.shape == table.shape


def test_a_plan_read_on_another_stream_records_it_once(plans, monkeypatch):
    """Evicting a plan must wait for the work of every stream that read it: its tensors record
    each stream other than the one they were built on, once."""
    plan_module, _ = plans

    class Stream:
        def __init__(self, stream_id):
            self.stream_id = stream_id

    current, recorded = [Stream(1)], []
    monkeypatch.setattr(plan_module, "_current_stream", lambda device: current[0])
    monkeypatch.setattr(plan_module, "_record_stream", lambda t, stream: recorded.append((t, stream.stream_id)))
    args = (((3, 4), (2, 2)), (4, 5), "bicubic", True, False, False, torch.device("cpu"))
    plan = plan_module.device_plan(*args)
    plan_module.device_plan(*args)
    assert recorded == []                     # read on the stream it was built on
    current[0] = Stream(7)
    plan_module.device_plan(*args)
    plan_module.device_plan(*args)
    tensors = [t for t in vars(plan).values() if isinstance(t, torch.Tensor)]
    assert [s for _, s in recorded] == [7] * len(tensors) and all(a is b for (a, _), b in zip(recorded, tensors))
