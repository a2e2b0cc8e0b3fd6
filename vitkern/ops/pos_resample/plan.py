"""What a packed resampling reads besides the tables: each output row's weights along y and x.

timm's resampling of a learned position grid (``F.interpolate`` in float32, bilinear or bicubic,
antialiased or not, ``align_corners`` either way, and for the factorized y / x tables the 1-D
linear rule) is separable: output ``(y, x)`` of a grid resampled to ``(ly, lx)`` is

    pos[y, x] = sum_i sum_j Wy[y, i] Wx[x, j] G[i, j]

with ``Wy`` the ``(ly, Gh)`` matrix of the 1-D resampling along the rows and ``Wx`` likewise.
:func:`axis_weights` takes those matrices from ``F.interpolate`` itself (it resamples an
identity matrix, in float64, along one axis, the other at scale 1), so every mode matches
PyTorch's by construction, the antialiased bicubic's a = -0.5 filter and its support scaled on
downsampling included. A row of ``Wy`` has few non-zero weights (its taps: 2 bilinear, 4 bicubic,
more when an antialiased filter widens on downsampling); :func:`build_plan` stores them per
distinct output length, and per packed row the index of its y and x weight rows.

The separable form also gives the kernel a cheaper order than gathering each row's ``ny * nx``
taps: resample every grid row along x to each distinct x weight row first (``Gh * n_x`` rows of
``nx`` taps), then each output row along y (``ny`` taps) from that intermediate grid, or the
other way round; :func:`pick_pass_order` chooses by the gathers each order counts.
"""

from __future__ import annotations

import collections
import functools
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

#: ``F.interpolate`` modes the resampling takes (each separable, so a tap table describes it).
RESAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")

GridSize = Tuple[int, int]

#: The kernel's orders (:func:`pick_pass_order`): each row's taps along both axes at once, or
#: one axis through an intermediate grid first.
PASS_ORDERS = ("joint", "x_first", "y_first")


@functools.lru_cache(maxsize=4096)
def axis_weights(src: int, dst: int, mode: str, antialias: bool, align_corners: bool) -> torch.Tensor:
    """``(dst, src)`` float64 (CPU, not to be modified): row ``y`` holds the weights of the
    ``src`` input positions in output position ``y`` of ``F.interpolate(..., size=dst, mode=mode,
    antialias=antialias, align_corners=align_corners)`` along one axis of a 2-D resampling."""
    eye = torch.eye(src, dtype=torch.float64)[None, None]
    if mode in ("nearest", "nearest-exact", "area"):
        kwargs = {}
    else:
        kwargs = {"align_corners": align_corners, "antialias": antialias}
    # the first axis resampled, the second (the identity's columns) at scale 1, which every mode
    # leaves unchanged
    return F.interpolate(eye, size=(dst, src), mode=mode, **kwargs)[0, 0].contiguous()


@functools.lru_cache(maxsize=4096)
def _axis_taps(src: int, dst: int, mode: str, antialias: bool, align_corners: bool) -> tuple:
    """``(index (dst, taps) int32, weight (dst, taps) float32)``: the non-zero weights of each row
    of :func:`axis_weights`, zero-weight padding (index 0) past a row's own count."""
    dense = axis_weights(src, dst, mode, antialias, align_corners)
    nonzero = dense != 0
    taps = max(1, int(nonzero.sum(1).max()))
    # stable sort puts each row's non-zero columns first, in order
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :taps]
    weight = torch.gather(dense, 1, order)
    index = torch.where(weight != 0, order, torch.zeros_like(order))
    return index.to(torch.int32), weight.to(torch.float32)


@dataclass(frozen=True)
class ResamplePlan:
    """One packed batch's resampling: for the y axis (and x likewise) the tap tables
    ``y_index`` / ``y_weight`` ``(rows, taps)`` (a row's non-zero taps first), ``y_count``
    ``(rows,)`` int32 (how many), and the dense weight rows ``y_dense`` ``(rows, Gh)`` float32
    (the backward's), stacked over the batch's distinct output lengths, and ``y_row``
    ``(total,)`` int32: the table row of each packed output row. All on one device."""

    y_index: torch.Tensor
    y_weight: torch.Tensor
    y_count: torch.Tensor
    y_dense: torch.Tensor
    y_row: torch.Tensor
    x_index: torch.Tensor
    x_weight: torch.Tensor
    x_count: torch.Tensor
    x_dense: torch.Tensor
    x_row: torch.Tensor
    #: the packed rows ordered by their x weight row (stable: packed order within one), int32
    #: ``(total,)``, and where each x weight row's run starts in it, ``(n_x + 1,)``: the learned
    #: grid backward's segments (``kernels._pos_resample_bwd_kernel``)
    x_perm: Optional[torch.Tensor] = None
    x_seg: Optional[torch.Tensor] = None
    #: host ints: the gathered table rows of each pass order, ``{"joint": ..., "x_first": ...,
    #: "y_first": ...}`` (see :func:`pass_loads`); empty for factorized tables
    loads: dict = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return self.y_row.shape[0]


def interp_size(grid: GridSize, aspect_preserving: bool) -> GridSize:
    """timm's resampling size for an image grid: the grid, or a square of its longer side (then
    cropped to the grid) when aspect-preserving."""
    return (max(grid),) * 2 if aspect_preserving else tuple(grid)


def _axis_tables(src: int, lengths: Sequence[int], mode: str, antialias: bool, align_corners: bool):
    """The stacked tables of one axis over the distinct output ``lengths``, and each length's
    first row."""
    firsts, index, weight, dense, at = {}, [], [], [], 0
    for length in dict.fromkeys(lengths):
        i, w = _axis_taps(src, length, mode, antialias, align_corners)
        firsts[length] = at
        at += length
        index.append(i)
        weight.append(w)
        dense.append(axis_weights(src, length, mode, antialias, align_corners))
    if not index:  # no images
        return (torch.zeros((0, 1), dtype=torch.int32), torch.zeros((0, 1)), torch.zeros(0, dtype=torch.int32),
                torch.zeros((0, src)), firsts)
    taps = max(i.shape[1] for i in index)
    index = torch.cat([F.pad(i, (0, taps - i.shape[1])) for i in index])
    weight = torch.cat([F.pad(w, (0, taps - w.shape[1])) for w in weight])
    count = (weight != 0).sum(1).to(torch.int32)
    return index, weight, count, torch.cat(dense).to(torch.float32), firsts


def pass_loads(y_count: torch.Tensor, x_count: torch.Tensor, y_row: torch.Tensor, x_row: torch.Tensor,
               source_size: GridSize) -> dict:
    """Host ints: the table rows (of D elements) each pass order gathers and writes besides the
    output, from the host tap counts and packed rows:

    - "joint": ``sum_r ny[r] * nx[r]`` gathers from the grid;
    - "x_first": ``Gh * sum_j nx[j]`` gathers for the ``(Gh, n_x)`` intermediate grid, its
      ``Gh * n_x`` rows written, then ``sum_r ny[r]`` gathers from it;
    - "y_first": ``Gw * sum_i ny[i] + Gw * n_y + sum_r nx[r]``.
    """
    ny, nx = y_count.to(torch.int64), x_count.to(torch.int64)
    ny_r, nx_r = ny[y_row.long()], nx[x_row.long()]
    gh, gw = source_size
    return {"joint": int((ny_r * nx_r).sum()),
            "x_first": gh * int(nx.sum()) + gh * nx.numel() + int(ny_r.sum()),
            "y_first": gw * int(ny.sum()) + gw * ny.numel() + int(nx_r.sum())}


#: The cost of the separable orders' second launch, in bytes of gathers: ~4 us of launch and
#: tail at an L2 gather rate of ~8 TB/s (H100 / H200).
SECOND_PASS_BYTES = 32 << 20
#: The separable orders' intermediate grid is addressed with int32 offsets.
MAX_INTERMEDIATE_ELEMENTS = (1 << 31) - 1


def pick_pass_order(loads: dict, source_size: GridSize, dim: int, n_x: int, n_y: int) -> str:
    """The order with the fewest gathered bytes (rows of ``dim`` float32 elements), the separable
    ones charged :data:`SECOND_PASS_BYTES` for their second launch: "joint" for a few small
    images, a separable one for a batch (the 128-image NaFlex batch: 17.1 gathered rows per
    output row joint, 5.2 separable). "joint" when ``loads`` is empty (factorized tables)."""
    if not loads:
        return "joint"
    row_bytes = 4 * max(dim, 1)
    width = -(-dim // 16) * 16
    costs = {"joint": loads["joint"] * row_bytes}
    gh, gw = source_size
    for order, mid_rows in (("x_first", gh * n_x), ("y_first", gw * n_y)):
        if mid_rows * width <= MAX_INTERMEDIATE_ELEMENTS:
            costs[order] = loads[order] * row_bytes + SECOND_PASS_BYTES
    return min(costs, key=lambda k: (costs[k], k != "joint"))


def build_plan(grid_sizes: Sequence[GridSize], source_size: GridSize, mode: str, antialias: bool,
               align_corners: bool, aspect_preserving: bool, device: torch.device,
               learned: bool = True) -> ResamplePlan:
    """The plan of the images ``grid_sizes`` (rows, cols of patches, packed in this order, each
    image's patches row-major) from a grid of ``source_size`` (``learned``: one 2-D table, whose
    own size timm takes as it is even when aspect-preserving; else the factorized tables): built
    on the host from host integers, then copied to ``device`` (no device-to-host read)."""
    source = tuple(source_size)
    sizes = [tuple(g) if learned and tuple(g) == source else interp_size(g, aspect_preserving) for g in grid_sizes]
    y_index, y_weight, y_count, y_dense, y_first = _axis_tables(source_size[0], [s[0] for s in sizes], mode, antialias,
                                                       align_corners)
    x_index, x_weight, x_count, x_dense, x_first = _axis_tables(source_size[1], [s[1] for s in sizes], mode, antialias,
                                                       align_corners)
    gh = np.array([g[0] for g in grid_sizes], dtype=np.int64)
    gw = np.array([g[1] for g in grid_sizes], dtype=np.int64)
    counts = gh * gw
    image = np.repeat(np.arange(len(grid_sizes)), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    local = np.arange(int(counts.sum())) - starts[image]
    y0 = np.array([y_first[s[0]] for s in sizes], dtype=np.int64)
    x0 = np.array([x_first[s[1]] for s in sizes], dtype=np.int64)
    rows = torch.from_numpy(np.stack((y0[image] + local // gw[image], x0[image] + local % gw[image])).astype(np.int32))
    loads = pass_loads(y_count, x_count, rows[0], rows[1], source) if learned else {}
    x_row = rows[1].numpy()
    x_perm = torch.from_numpy(np.argsort(x_row, kind="stable").astype(np.int32))
    x_seg = torch.from_numpy(np.concatenate(([0], np.cumsum(np.bincount(x_row, minlength=x_index.shape[0])))
                                            ).astype(np.int32))
    non_blocking = device.type == "cuda"
    y = [t.to(device, non_blocking=non_blocking) for t in (y_index, y_weight, y_count, y_dense)]
    x = [t.to(device, non_blocking=non_blocking) for t in (x_index, x_weight, x_count, x_dense)]
    rows, x_perm, x_seg = (t.to(device, non_blocking=non_blocking) for t in (rows, x_perm, x_seg))
    return ResamplePlan(*y, rows[0], *x, rows[1], x_perm=x_perm, x_seg=x_seg, loads=loads)


# --------------------------------------------------------------------------------------------
# Plans kept on the device, by batch layout
# --------------------------------------------------------------------------------------------

#: How many unpinned plans stay on their devices (least recently used first out). A plan is
#: a few bytes a packed row (8 a row plus each distinct length's small tables): a batch of
#: 128 images of 256 patches keeps 256 KiB.
PLAN_CACHE_SIZE = 32


@dataclass
class _Entry:
    plan: ResamplePlan
    stream: Optional[int]                        # the stream its tensors were allocated on
    streams: set = field(default_factory=set)    # the others it was used on (record_stream'ed)
    pinned: bool = False                         # used in a CUDA graph capture: never freed


_plans: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
_plans_lock = threading.Lock()   # autograd's device threads and user threads may share it


def _current_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _record_stream(t: torch.Tensor, stream) -> None:
    t.record_stream(stream)


def device_plan(grid_sizes: Sequence[GridSize], source_size: GridSize, mode: str, antialias: bool,
                align_corners: bool, aspect_preserving: bool, device: torch.device,
                learned: bool = True) -> Optional[ResamplePlan]:
    """:func:`build_plan`'s plan, kept on ``device`` for the next batch of the same layout (a
    serving loop's fixed batches, a training run's bucketed ones), so that a repeated layout
    copies nothing from the host; or None during a CUDA graph capture of a layout not built
    before it (a host-to-device copy cannot be captured: the caller takes a path of device
    ops). The rules that keep the cached tensors safe on a real GPU:

    - a plan read during a capture is pinned: the graph replays its addresses, so it is
      never evicted (as many as the distinct layouts captured);
    - a plan read on a stream other than the one it was built on records that stream on
      its tensors (once a stream), so that evicting it later waits for that stream's work
      before its memory is reused.
    """
    key = (tuple(map(tuple, grid_sizes)), tuple(source_size), mode, antialias, align_corners, aspect_preserving,
           learned, device)
    capturing = _capturing(device)
    stream = None if capturing else _current_stream(device)
    with _plans_lock:
        entry = _plans.get(key)
        if entry is not None:
            _plans.move_to_end(key)
    if entry is None:
        if capturing:
            return None
        plan = build_plan(grid_sizes, source_size, mode, antialias, align_corners, aspect_preserving, device, learned)
        entry = _Entry(plan, None if stream is None else stream.stream_id)
        with _plans_lock:
            entry = _plans.setdefault(key, entry)   # another thread may have built it meanwhile
            _plans.move_to_end(key)
            unpinned = [k for k, e in _plans.items() if not e.pinned]
            for k in unpinned[:max(0, len(unpinned) - PLAN_CACHE_SIZE)]:
                del _plans[k]
    with _plans_lock:
        if capturing:
            entry.pinned = True
        elif stream is not None and stream.stream_id != entry.stream and stream.stream_id not in entry.streams:
            for t in vars(entry.plan).values():
                if isinstance(t, torch.Tensor):
                    _record_stream(t, stream)
            entry.streams.add(stream.stream_id)
    return entry.plan


def clear_plan_cache() -> None:
    """Drop the plans kept on the devices (pinned ones too: only once no captured graph that
    read them is replayed any more)."""
    with _plans_lock:
        _plans.clear()
