"""The QK-norm / RoPE prologue inside the attention kernels: applied to the tile a program keeps,
and its inverse applied to that tile's gradient before it is stored.

The math is :mod:`vitkern.ops.qk_prologue`'s (``n = norm(x)``, ``y[c] = n[c] cos[c] + sign(c)
n[p(c)] sin[c]`` with ``p`` the rotation partner; fp32 inside, the input's dtype out), here on the
two head-dim pieces of :func:`~vitkern.ops.attention.configs._attn_pieces`:

- Forward: the q tile of the forward kernels (plain and split-KV) is loaded raw, normalised and
  rotated (:func:`_attn_prologue_tile`; the partner columns come from a second, column-permuted
  load, an L1 hit, so any head dim and layout works), and rounded to q's dtype for the dots; the
  plain kernel also stores it (``q_rot``) when a backward will need it. k is the streamed operand:
  every query block's loop reads every key tile, so rotating it there would redo the prologue
  ``ceil(Tq / BLOCK_M)`` times and pull the fp32 tables (4x a 16-bit key tile's bytes) through L2
  per key tile; it runs once per token in the prologue's own pass (``k_rot``) instead.
- Backward: the dQ kernel and the dK/dV kernel read ``q_rot`` / ``k_rot`` as their q / k and turn
  the gradient of the tile they keep (dq' of a query block, dk' of a key block, complete in the
  program) into dq / dk in the epilogue (:func:`_attn_prologue_grad`): the transposed rotation
  ``dn = dy cos + p(dy sign sin)``, the partner permutation a register shuffle
  (:func:`_attn_partner`: pairs are adjacent, or, "half", the two halves of one piece), then the
  norm's backward on the raw rows reloaded once. The norm's weight / bias gradients leave as one
  fp32 partial row per program and the tables' as one row per (batch, head, token), each written
  by one program: deterministic sums on the host side.

The register shuffle needs each rotation pair inside one piece: always so for interleaved pairs
(the pieces have even widths), for "half" only when the head dim is one power-of-two piece; and
the prologue's registers fit the tiles up to a padded width of 96 (80 with a masked tail: D = 72
but not 88). The launcher fuses those (:func:`prologue_fusable`: EVA-02, DINOv3, the RoPE ViTs
at 64, SigLIP's 72, 80 interleaved); other calls compose the prologue's own kernels with the
attention kernels.

NORM: 0 none, 1 LayerNorm, 2 RMSNorm. ROPE: 0 none, 1 interleaved pairs, 2 halves.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import register_helper

#: The ROPE constexpr of each RopeTables layout (0: no rotation).
ROPE_CODES = {None: 0, "interleaved": 1, "half": 2}


#: The widest padded head dim (both pieces) the fused kernels take, and the widest with a masked
#: tail: beyond them the prologue's registers spill in the forward / dQ tiles (Triton 3.8, bf16,
#: LayerNorm + RoPE: 88 = 64 + 32 masked 8 bytes in the sm_80 dQ kernel, 104 36-128 bytes, 128
#: 76-104 bytes in the sm_80 / sm_90 forward and dQ, 160..256 84-2060 bytes), which would need
#: tiles of their own.
PROLOGUE_MAX_WIDTH = 96
PROLOGUE_MAX_MASKED_WIDTH = 80


def prologue_fusable(head_dim: int, pieces: tuple[int, int], rope_layout) -> bool:
    """Whether the attention kernels apply this prologue and its inverse themselves (see the
    module docstring): padded head widths up to :data:`PROLOGUE_MAX_WIDTH` (with a masked tail
    up to :data:`PROLOGUE_MAX_MASKED_WIDTH`: 72, not 88); there, no rotation or interleaved pairs,
    and halves when the head dim is exactly one power-of-two piece."""
    width = pieces[0] + pieces[1]
    if width > PROLOGUE_MAX_WIDTH or (width != head_dim and width > PROLOGUE_MAX_MASKED_WIDTH):
        return False
    if rope_layout != "half":
        return True
    return pieces[1] == 0 and pieces[0] == head_dim


@register_helper
@triton.jit
def _attn_rope_partner(offs, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """The rotation partner of each column in ``offs`` (clamped inside the head dim, for the
    masked columns past it) and the sign of its term (-1 on a pair's first column)."""
    if ROPE == 2:
        first = offs < HEAD_DIM // 2
        partner = tl.where(first, offs + HEAD_DIM // 2, offs - HEAD_DIM // 2)
    else:
        first = (offs % 2) == 0
        partner = offs ^ 1
    return tl.minimum(partner, HEAD_DIM - 1), tl.where(first, -1.0, 1.0)


@register_helper
@triton.jit
def _attn_partner(x, ROWS: tl.constexpr, WIDTH: tl.constexpr, ROPE: tl.constexpr):
    """``x[:, p(c)]`` of a ``(ROWS, WIDTH)`` piece holding whole rotation pairs, in registers:
    ROPE 1 swaps adjacent columns, ROPE 2 the two halves (the piece is the whole head dim)."""
    if ROPE == 2:
        pairs = tl.permute(tl.reshape(x, (ROWS, 2, WIDTH // 2)), (0, 2, 1))
    else:
        pairs = tl.reshape(x, (ROWS, WIDTH // 2, 2))
    lo, hi = tl.split(pairs)
    swapped = tl.join(hi, lo)
    if ROPE == 2:
        swapped = tl.permute(swapped, (0, 2, 1))
    return tl.reshape(swapped, (ROWS, WIDTH))


@register_helper
@triton.jit
def _attn_prologue_stats(x_a, x_b, mask_a, mask_b, eps,
                         HEAD_DIM: tl.constexpr, BLOCK_DB: tl.constexpr, NORM: tl.constexpr):
    """Row ``(mean, rstd)`` over the valid columns of the two fp32 pieces (mean 0 for RMSNorm);
    columns past the head dim are zero in ``x_*``."""
    if NORM == 1:
        total = tl.sum(x_a, 1)
        if BLOCK_DB > 0:
            total += tl.sum(x_b, 1)
        mean = total / HEAD_DIM
        c_a = tl.where(mask_a[None, :], x_a - mean[:, None], 0.0)
        var = tl.sum(c_a * c_a, 1)
        if BLOCK_DB > 0:
            c_b = tl.where(mask_b[None, :], x_b - mean[:, None], 0.0)
            var += tl.sum(c_b * c_b, 1)
    else:
        mean = tl.sum(x_a, 1) * 0.0
        var = tl.sum(x_a * x_a, 1)
        if BLOCK_DB > 0:
            var += tl.sum(x_b * x_b, 1)
    return mean, 1.0 / tl.sqrt(var / HEAD_DIM + eps)


@register_helper
@triton.jit
def _attn_prologue_norm(x, cols, mean, rstd, W, BN, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """The normalised, affine values of fp32 columns ``cols`` (``x``: their raw values)."""
    if NORM != 0:
        x = (x - mean[:, None]) * rstd[:, None]
        if W is not None:
            x = x * tl.load(W + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        if BN is not None:
            x = x + tl.load(BN + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
    return x


@register_helper
@triton.jit
def _attn_rope_tables(SIN, COS, cols, table_rows, rotated, HEAD_DIM: tl.constexpr):
    """``(sin, cos)`` fp32 at columns ``cols`` of the rows ``table_rows`` (offsets); rows not
    ``rotated`` (prefix tokens, rows past T) read sin 0, cos 1."""
    tmask = rotated[:, None] & (cols[None, :] < HEAD_DIM)
    sin = tl.load(SIN + table_rows[:, None] + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    cos = tl.load(COS + table_rows[:, None] + cols[None, :], mask=tmask, other=1.0).to(tl.float32)
    return sin, cos


@register_helper
@triton.jit
def _attn_prologue_piece(rows_ptr, x, cols, row_mask, mean, rstd, W, BN, SIN, COS, table_rows, rotated,
                         HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    """One piece of the prologue's output (fp32, zero past the rows and the head dim): ``x`` the
    raw values of columns ``cols`` of the rows at ``rows_ptr``; the partners reloaded raw."""
    y = _attn_prologue_norm(x, cols, mean, rstd, W, BN, HEAD_DIM, NORM)
    if ROPE != 0:
        partner, sign = _attn_rope_partner(cols, HEAD_DIM, ROPE)
        mask = row_mask[:, None] & (cols[None, :] < HEAD_DIM)
        xp = tl.load(rows_ptr + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        yp = _attn_prologue_norm(xp, partner, mean, rstd, W, BN, HEAD_DIM, NORM)
        sin, cos = _attn_rope_tables(SIN, COS, cols, table_rows, rotated, HEAD_DIM)
        y = y * cos + sign[None, :] * yp * sin
    return tl.where(row_mask[:, None] & (cols[None, :] < HEAD_DIM), y, 0.0)


@register_helper
@triton.jit
def _attn_prologue_rows(base, stride_t, offs_t, n_t, h, PREFIX, stride_rh, stride_rt):
    """Pointers of rows ``offs_t`` of a ``(T, D)`` slice, their mask, and for the rotation the
    tables' row offsets of head ``h`` and which rows are rotated (those from ``PREFIX`` on)."""
    row_mask = offs_t < n_t
    r = offs_t - PREFIX
    rotated = row_mask & (r >= 0)
    table_rows = h * stride_rh + tl.maximum(r, 0) * stride_rt
    return base + offs_t[:, None] * stride_t, row_mask, table_rows, rotated


@register_helper
@triton.jit
def _attn_prologue_tile(base, stride_t, offs_t, n_t, offs_da, offs_db, W, BN, SIN, COS, stride_rh, stride_rt, h,
                        PREFIX, eps, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DB: tl.constexpr,
                        NORM: tl.constexpr, ROPE: tl.constexpr):
    """The prologue's output (fp32 pieces, zero past ``n_t`` and the head dim) of rows ``offs_t``
    of the raw ``(T, HEAD_DIM)`` slice at ``base``; the tables' rows are per token after
    ``PREFIX`` (head stride ``stride_rh``, 0 when shared). Without a second piece the second
    output is the first (a placeholder)."""
    rows_ptr, row_mask, table_rows, rotated = _attn_prologue_rows(base, stride_t, offs_t, n_t, h, PREFIX, stride_rh,
                                                                  stride_rt)
    x_a, x_b, mean, rstd = _attn_prologue_raw(rows_ptr, row_mask, offs_da, offs_db, eps, BLOCK_T, HEAD_DIM, BLOCK_DB,
                                              NORM)
    y_a = _attn_prologue_piece(rows_ptr, x_a, offs_da, row_mask, mean, rstd, W, BN, SIN, COS, table_rows, rotated,
                               HEAD_DIM, NORM, ROPE)
    if BLOCK_DB > 0:
        y_b = _attn_prologue_piece(rows_ptr, x_b, offs_db, row_mask, mean, rstd, W, BN, SIN, COS, table_rows,
                                   rotated, HEAD_DIM, NORM, ROPE)
    else:
        y_b = y_a
    return y_a, y_b


@register_helper
@triton.jit
def _attn_prologue_grad_piece(dy, x, cols, row_mask, mean, rstd, W, BN, SIN, COS, table_rows, rotated,
                              dtable_rows, DSIN_PART, DCOS_PART,
                              ROWS: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                              NORM: tl.constexpr, ROPE: tl.constexpr):
    """One piece's gradient at the norm's output, ``dn`` (fp32, zero past the rows), from ``dy``,
    the gradient at the rotation's output; stores the tables' gradient rows where asked."""
    if ROPE != 0:
        _, sign = _attn_rope_partner(cols, HEAD_DIM, ROPE)
        sin, cos = _attn_rope_tables(SIN, COS, cols, table_rows, rotated, HEAD_DIM)
        dn = dy * cos + _attn_partner(dy * sign[None, :] * sin, ROWS, WIDTH, ROPE)
        if DSIN_PART is not None:
            n = _attn_prologue_norm(x, cols, mean, rstd, W, BN, HEAD_DIM, NORM)
            tmask = rotated[:, None] & (cols[None, :] < HEAD_DIM)
            ptrs = dtable_rows[:, None] + cols[None, :]
            tl.store(DCOS_PART + ptrs, dy * n, mask=tmask)
            tl.store(DSIN_PART + ptrs, dy * sign[None, :] * _attn_partner(n, ROWS, WIDTH, ROPE), mask=tmask)
    else:
        dn = dy
    return tl.where(row_mask[:, None] & (cols[None, :] < HEAD_DIM), dn, 0.0)


@register_helper
@triton.jit
def _attn_prologue_raw(rows_ptr, row_mask, offs_da, offs_db, eps, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_DB: tl.constexpr, NORM: tl.constexpr):
    """The raw rows' fp32 pieces (zero past the rows and the head dim) and their ``(mean, rstd)``
    (placeholders without a norm)."""
    mask_a = offs_da < HEAD_DIM
    x_a = tl.load(rows_ptr + offs_da[None, :], mask=row_mask[:, None] & mask_a[None, :], other=0.0).to(tl.float32)
    mask_b = offs_db < HEAD_DIM
    if BLOCK_DB > 0:
        x_b = tl.load(rows_ptr + offs_db[None, :], mask=row_mask[:, None] & mask_b[None, :], other=0.0)
        x_b = x_b.to(tl.float32)
    else:
        x_b = x_a
    if NORM != 0:
        mean, rstd = _attn_prologue_stats(x_a, x_b, mask_a, mask_b, eps, HEAD_DIM, BLOCK_DB, NORM)
    else:
        mean = tl.zeros([ROWS], dtype=tl.float32)  # unused: no normalisation
        rstd = mean
    return x_a, x_b, mean, rstd


@register_helper
@triton.jit
def _attn_prologue_grad(dy_a, dy_b, base, stride_t, offs_t, n_t, offs_da, offs_db, W, BN, SIN, COS,
                        stride_rh, stride_rt, h, PREFIX, eps, DW_PART, DB_PART, part_row,
                        DSIN_PART, DCOS_PART, dtable_base,
                        ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr,
                        BLOCK_DB: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    """dx (fp32 pieces) of rows ``offs_t`` of the raw slice at ``base`` from ``dy_*``, the gradient
    at the prologue's output (the dQ / dK kernels' scaled accumulators). The norm's weight / bias
    gradients: this program's fp32 partial row ``part_row`` (offset, columns of both pieces) of
    ``DW_PART`` / ``DB_PART``; the tables': rows ``dtable_base + token * HEAD_DIM`` of
    ``DSIN_PART`` / ``DCOS_PART`` (this program's tokens of its (batch, head)). A ``None``
    buffer is a gradient not asked for.

    Order, for the registers: the transposed rotation first (the tables die with it), then the
    raw rows reloaded for the norm's backward; only the tables' gradients, which need the
    normalised rows inside the rotation, reload them before it."""
    rows_ptr, row_mask, table_rows, rotated = _attn_prologue_rows(base, stride_t, offs_t, n_t, h, PREFIX, stride_rh,
                                                                  stride_rt)
    dtable_rows = dtable_base + tl.maximum(offs_t - PREFIX, 0) * HEAD_DIM
    early: tl.constexpr = (ROPE != 0) & (DSIN_PART is not None)
    if early:
        x_a, x_b, mean, rstd = _attn_prologue_raw(rows_ptr, row_mask, offs_da, offs_db, eps, ROWS, HEAD_DIM,
                                                  BLOCK_DB, NORM)
    else:
        x_a, x_b, mean, rstd = dy_a, dy_b, offs_t, offs_t  # placeholders: the tables' gradients are not asked
    dn_a = _attn_prologue_grad_piece(dy_a, x_a, offs_da, row_mask, mean, rstd, W, BN, SIN, COS, table_rows, rotated,
                                     dtable_rows, DSIN_PART, DCOS_PART, ROWS, BLOCK_DA, HEAD_DIM, NORM, ROPE)
    if BLOCK_DB > 0:
        dn_b = _attn_prologue_grad_piece(dy_b, x_b, offs_db, row_mask, mean, rstd, W, BN, SIN, COS, table_rows,
                                         rotated, dtable_rows, DSIN_PART, DCOS_PART, ROWS, BLOCK_DB, HEAD_DIM,
                                         NORM, ROPE)
    else:
        dn_b = dn_a
    if NORM == 0:
        return dn_a, dn_b
    if not early:
        x_a, x_b, mean, rstd = _attn_prologue_raw(rows_ptr, row_mask, offs_da, offs_db, eps, ROWS, HEAD_DIM,
                                                  BLOCK_DB, NORM)
    mask_a = offs_da < HEAD_DIM
    mask_b = offs_db < HEAD_DIM
    # the norm's backward: xhat = (x - mean) * rstd (zero past the rows and the head dim)
    xh_a = tl.where(row_mask[:, None] & mask_a[None, :], (x_a - mean[:, None]) * rstd[:, None], 0.0)
    xh_b = tl.where(row_mask[:, None] & mask_b[None, :], (x_b - mean[:, None]) * rstd[:, None], 0.0)
    if DW_PART is not None:
        tl.store(DW_PART + part_row + offs_da, tl.sum(dn_a * xh_a, 0))
        if BLOCK_DB > 0:
            tl.store(DW_PART + part_row + offs_db, tl.sum(dn_b * xh_b, 0))
    if DB_PART is not None:
        tl.store(DB_PART + part_row + offs_da, tl.sum(dn_a, 0))
        if BLOCK_DB > 0:
            tl.store(DB_PART + part_row + offs_db, tl.sum(dn_b, 0))
    if W is not None:
        dn_a = dn_a * tl.load(W + offs_da, mask=mask_a, other=0.0).to(tl.float32)[None, :]
        if BLOCK_DB > 0:
            dn_b = dn_b * tl.load(W + offs_db, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    c2 = tl.sum(dn_a * xh_a, 1)
    if BLOCK_DB > 0:
        c2 += tl.sum(dn_b * xh_b, 1)
    c2 = c2 / HEAD_DIM
    if NORM == 1:
        c1 = tl.sum(dn_a, 1)
        if BLOCK_DB > 0:
            c1 += tl.sum(dn_b, 1)
        c1 = c1 / HEAD_DIM
    else:
        c1 = c2 * 0.0
    dx_a = (dn_a - c1[:, None] - xh_a * c2[:, None]) * rstd[:, None]
    if BLOCK_DB > 0:
        dx_b = (dn_b - c1[:, None] - xh_b * c2[:, None]) * rstd[:, None]
    else:
        dx_b = dx_a
    return dx_a, dx_b
