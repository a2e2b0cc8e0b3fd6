"""Packed variable-length attention (``attention_varlen`` / ``attention_qkvpacked_varlen``) and the
key-padding mask of ``attention``.

The Triton kernels run on CPU tensors through the interpreter (the conftest sets
TRITON_INTERPRET=1) into NaN-poisoned outputs, and are held to the flash-attention rule against
the float64 per-sequence reference, with per-sequence SDPA in the inputs' dtype as the PyTorch
term. Sequence lengths are the awkward ones of mixed-resolution batches (1, 17, 196, 197, 577,
empty sequences), head dims 64 / 72 / 80, GQA, causal, every dtype, forward and every gradient.
The op never reads a device value on the host: a dispatch mode that fails on
``aten._local_scalar_dense`` (what ``.item()`` / ``.tolist()`` / ``int(t)`` reach), fake tensors
with those methods patched to raise, and torch.compile(fullgraph=True) check it.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import vitkern
from vitkern.ops import attention as A
from vitkern.ops.attention import launch as attn_launch, native, op as attn_op
from vitkern.ops._config import INTERPRETING
from vitkern.testing.numerics import assert_flash_rule, poisoned

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETING), reason="Triton kernels need a GPU or TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def _triton_backend():
    vitkern.use_backend("triton")  # the conftest restores the previous choice


def _cu(lens, device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=F32).to(device=device, dtype=dtype)


def _inputs(lens_q, lens_k, h, hkv, d, dtype, device, packed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    if packed:
        qkv = _rand((tq, 3, h, d), dtype, device, gen)
        q, k, v = qkv.unbind(1)
    else:
        q = _rand((tq, h, d), dtype, device, gen)
        k, v = (_rand((tk, hkv, d), dtype, device, gen) for _ in range(2))
    return q, k, v, _rand((tq, h, d), dtype, device, gen)


def _run_kernels(q, k, v, dout, seqs, causal, scale, deterministic):
    """The launchers as the varlen ops call them, into NaN-poisoned outputs and gradients."""
    view = attn_op._seq_view
    tq, h, _ = q.shape
    out = poisoned(q.shape, q.dtype, q.device)
    lse = poisoned((h, tq), F32, q.device)
    attn_launch._attention_fwd(view(q), view(k), view(v), None, causal, scale, view(out), lse.unsqueeze(0),
                               seqs=seqs)
    dq, dk, dv = (poisoned(t.shape, t.dtype, t.device) for t in (q, k, v))
    attn_launch._attention_bwd(view(dout), view(q), view(k), view(v), view(out), lse.unsqueeze(0), None, None,
                               causal, scale, deterministic, view(dq), view(dk), view(dv), seqs=seqs)
    return out, lse, dq, dk, dv


def _references(q, k, v, dout, cu_q, cu_k, causal, scale):
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = A.attention_varlen_ref(*leaves64, cu_q, cu_k, causal=causal, scale=scale, return_lse=True)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double(), allow_unused=True)
    grads64 = [torch.zeros_like(t) if g is None else g for g, t in zip(grads64, leaves64)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_lp = native._varlen_sdpa_loop(*leaves, cu_q, cu_k, causal, scale)
    grads_lp = torch.autograd.grad(out_lp, leaves, dout, allow_unused=True)
    grads_lp = [torch.zeros_like(t) if g is None else g for g, t in zip(grads_lp, leaves)]
    return (out64, lse64, *grads64), (out_lp.detach(), *grads_lp)


def _check(lens_q, lens_k, h, hkv, d, dtype, device, *, causal=False, max_known=False, packed=False,
           deterministic=False, seed=0):
    q, k, v, dout = _inputs(lens_q, lens_k, h, hkv, d, dtype, device, packed, seed)
    cu_q = _cu(lens_q, device)
    cu_k = cu_q if packed else _cu(lens_k, device)
    seqs = attn_launch.PackedSeqs(cu_q, cu_k, max(lens_q) if max_known else None,
                                  max(lens_k) if max_known else None)
    scale = d ** -0.5
    out, lse, dq, dk, dv = _run_kernels(q, k, v, dout, seqs, causal, scale, deterministic)
    ref64, ref_lp = _references(q, k, v, dout, cu_q, cu_k, causal, scale)
    assert_flash_rule("out", out, ref64[0], ref_lp[0], dtype)
    lse_ref = ref64[1]
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)) and torch.isfinite(lse[fin]).all()
    if fin.any():
        assert (lse[fin].double() - lse_ref[fin]).abs().max().item() <= 1e-4 * max(1.0, lse_ref[fin].abs().max().item())
    magnitude = max(r.abs().max().item() for r in ref64[2:] if r.numel())
    for name, g, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], ref_lp[1:]):
        assert_flash_rule(name, g, r64, rlp, dtype, magnitude)
    return out, lse, dq, dk, dv


# --------------------------------------------------------------------------------------------
# Kernels against the per-sequence reference
# --------------------------------------------------------------------------------------------

CASES = [
    # dtype, q lengths, k lengths (None: the same cu_seqlens), h, hkv, d, causal, max known, packed qkv, det.
    (BF16, (197, 0, 17, 1, 196), None, 3, 3, 64, False, False, True, False),   # a mixed batch, packed qkv
    (BF16, (197, 0, 17, 1, 196), None, 3, 3, 64, True, True, True, True),      # the per-sequence grid
    (F16, (577, 50), None, 2, 1, 80, True, True, False, False),                # 577 tokens, MQA, 80 = 64 + 16
    (F32, (17, 0, 33), None, 2, 2, 72, True, False, False, True),              # fp32, 72 padded, causal
    (BF16, (40, 5, 30), (60, 0, 45), 4, 2, 72, False, False, False, True),     # cross lengths, keyless seq
    (F16, (30, 97), (20, 50), 2, 2, 64, True, False, False, False),            # causal Tq > Tk, Tq < Tk
    (F16, (1, 1, 1), None, 2, 2, 32, False, True, False, False),               # one-token sequences
]


@pytest.mark.parametrize("dtype,lens_q,lens_k,h,hkv,d,causal,max_known,packed,deterministic", CASES)
def test_varlen_kernels_match_per_sequence_reference(device, dtype, lens_q, lens_k, h, hkv, d, causal, max_known,
                                                     packed, deterministic):
    _check(lens_q, lens_q if lens_k is None else lens_k, h, hkv, d, dtype, device, causal=causal,
           max_known=max_known, packed=packed, deterministic=deterministic)


def test_varlen_grids_agree(device):
    # the per-sequence grid (max_seqlen known) and the token-count grid with the on-device block
    # search compute the same programs: bit-identical results
    lens = (130, 1, 0, 257, 64)
    q, k, v, dout = _inputs(lens, lens, 2, 2, 64, F16, device, False)
    cu = _cu(lens, device)
    searched = _run_kernels(q, k, v, dout, attn_launch.PackedSeqs(cu, cu), False, 0.125, True)
    per_seq = _run_kernels(q, k, v, dout, attn_launch.PackedSeqs(cu, cu, 257, 257), False, 0.125, True)
    for a, b in zip(searched, per_seq):
        assert torch.equal(a, b)


def _forward(q, k, v, seqs, causal, kv_splits):
    view = attn_op._seq_view
    out = poisoned(q.shape, q.dtype, q.device)
    lse = poisoned((q.shape[1], q.shape[0]), F32, q.device)
    attn_launch._attention_fwd(view(q), view(k), view(v), None, causal, q.shape[-1] ** -0.5, view(out),
                               lse.unsqueeze(0), seqs=seqs, kv_splits=kv_splits)
    return out, lse


@pytest.mark.parametrize("dtype,lens_q,lens_k,h,hkv,d,causal,max_known,splits", [
    (BF16, (197,), None, 2, 2, 64, False, True, 4),              # one image: the case split-KV is for
    (BF16, (197, 0, 1, 60), None, 3, 1, 72, True, False, 3),     # keys bounded by the total, MQA, causal
    (F16, (40, 5), (150, 0), 2, 2, 80, False, True, 2),          # a keyless sequence: out 0, lse -inf
    (BF16, (30, 97), (20, 150), 2, 1, 64, True, False, 3),       # causal Tq > Tk and Tq < Tk per sequence
])
def test_varlen_split_kv_matches_the_plain_forward(device, dtype, lens_q, lens_k, h, hkv, d, causal, max_known,
                                                   splits):
    lens_k = lens_q if lens_k is None else lens_k
    q, k, v, _ = _inputs(lens_q, lens_k, h, hkv, d, dtype, device, False, seed=4)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    seqs = attn_launch.PackedSeqs(cu_q, cu_k, max(lens_q) if max_known else None, max(lens_k) if max_known else None)
    out, lse = _forward(q, k, v, seqs, causal, splits)
    plain_out, plain_lse = _forward(q, k, v, seqs, causal, 1)
    out64, lse64 = A.attention_varlen_ref(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal,
                                          return_lse=True)
    assert_flash_rule("out", out, out64, plain_out, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(plain_lse))
    fin = torch.isfinite(plain_lse)
    torch.testing.assert_close(lse[fin], plain_lse[fin], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[fin].double(), lse64[fin], atol=1e-4, rtol=1e-4)


def test_varlen_forward_splits_where_the_grid_leaves_sms_idle(device, monkeypatch):
    """One short image on many SMs takes the split-KV pair on its own; the backward reads its lse."""
    from vitkern.ops import _config

    seen = []
    real = attn_launch.launch
    monkeypatch.setattr(attn_launch, "launch", lambda kernel, grid, *a, **kw: seen.append((kernel, grid)) or
                        real(kernel, grid, *a, **kw))
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 16)
    if torch.cuda.is_available():
        pytest.skip("the interpreter's SM count decides the split here")
    lens = (197,)
    q, k, v, dout = _inputs(lens, lens, 2, 2, 64, BF16, device, True, seed=6)
    seqs = attn_launch.PackedSeqs(_cu(lens, device), _cu(lens, device), 197, 197)
    out, lse, dq, dk, dv = _run_kernels(q, k, v, dout, seqs, False, 0.125, False)
    kernels = [kernel for kernel, _ in seen]
    assert attn_launch._attention_fwd_split_kernel in kernels and attn_launch._attention_fwd_kernel not in kernels
    split_grid = next(grid for kernel, grid in seen if kernel is attn_launch._attention_fwd_split_kernel)
    assert split_grid[1] > 1
    ref64, ref_lp = _references(q, k, v, dout, _cu(lens, device), _cu(lens, device), False, 0.125)
    assert_flash_rule("out", out, ref64[0], ref_lp[0], BF16)
    for name, g, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], ref_lp[1:]):
        assert_flash_rule(name, g, r64, rlp, BF16, max(r.abs().max().item() for r in ref64[2:]))


def test_deterministic_algorithms_take_the_dq_kernel(device, monkeypatch):
    # under torch.use_deterministic_algorithms the backward computes dQ in its own kernel (no
    # atomics): two runs give the same bits
    launched = []
    original = attn_launch.launch
    monkeypatch.setattr(attn_launch, "launch", lambda kernel, *a, **kw: launched.append(kernel) or
                        original(kernel, *a, **kw))
    lens = (33, 0, 70)
    q, k, v, dout = _inputs(lens, lens, 2, 2, 64, BF16, device, False, seed=9)
    cu = _cu(lens, device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            runs.append(torch.autograd.grad(vitkern.attention_varlen(*leaves, cu, cu), leaves, dout))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert attn_launch._attention_bwd_dq_kernel in launched
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_packed_backward_is_never_fused(device, monkeypatch):
    # the fused backward's persistent grid walks dense (batch, kv head) pairs: a packed launch is
    # planned without an SM count even where one SM would make the dense plan fuse, and asking
    # for the fused mode with packed sequences raises
    launched = []
    original = attn_launch.launch
    monkeypatch.setattr(attn_launch, "launch", lambda kernel, *a, **kw: launched.append(kernel) or
                        original(kernel, *a, **kw))
    monkeypatch.setattr(attn_launch, "num_sms", lambda device=None: 1)
    lens = (20, 37)
    q, k, v, dout = _inputs(lens, lens, 2, 2, 64, BF16, device, False, seed=4)
    cu = _cu(lens, device)
    seqs = attn_launch.PackedSeqs(cu, cu, max(lens), max(lens))
    out, lse, dq, dk, dv = _run_kernels(q, k, v, dout, seqs, False, 0.125, True)
    assert attn_launch._attention_bwd_fused_kernel not in launched
    assert attn_launch._attention_bwd_dq_kernel in launched
    view = attn_op._seq_view
    with pytest.raises(ValueError, match="fused.*packed"):
        attn_launch._attention_bwd(view(dout), view(q), view(k), view(v), view(out), lse.unsqueeze(0), None, None,
                                   False, 0.125, True, view(dq), view(dk), view(dv), mode="fused", seqs=seqs)


def test_packed_backward_takes_the_packed_tiles(device, monkeypatch):
    # the packed dK/dV kernel has tiles of its own where the plain one spilled (configs.py,
    # _ATTN_VARIANT_CONFIGS "packed"): the launcher plans a packed backward as that variant
    plans = []
    original = attn_launch._attn_bwd_plan
    monkeypatch.setattr(attn_launch, "_attn_bwd_plan",
                        lambda *a, **kw: plans.append(kw.get("variant")) or original(*a, **kw))
    lens = (20, 37)
    q, k, v, dout = _inputs(lens, lens, 2, 2, 64, BF16, device, False, seed=4)
    cu = _cu(lens, device)
    _run_kernels(q, k, v, dout, attn_launch.PackedSeqs(cu, cu, None, None), True, 0.125, False)
    assert plans == ["packed"]


def test_varlen_grid_choice():
    cu = torch.zeros(4, dtype=torch.int32)
    dummy = torch.empty(1)
    # without the longest length: total // block + num_seqs slots a head, the search in the kernel
    assert attn_launch._seq_grid(attn_launch.PackedSeqs(cu, cu), 1, 2, 600, 128, dummy) == \
        (2 * (600 // 128 + 3), (cu, cu, 3, 0), 2)
    # equal lengths 200: 3 x 2 blocks per sequence is fewer than 4 + 3 slots
    assert attn_launch._seq_grid(attn_launch.PackedSeqs(cu, cu, 200, 200), 1, 2, 600, 128, dummy) == \
        (2 * 6, (cu, cu, 3, 2), 1)
    # one long and two tiny sequences: the slots are fewer, the search runs
    assert attn_launch._seq_grid(attn_launch.PackedSeqs(cu, cu, 1000, 1000), 1, 2, 1002, 128, dummy)[2] == 2
    # dense launches
    assert attn_launch._seq_grid(None, 3, 2, 197, 128, dummy) == (12, (dummy, dummy, 0, 0), 0)


def test_public_varlen_equals_dense_attention_per_sequence(device):
    lens = (17, 197, 1)
    q, k, v, dout = _inputs(lens, lens, 4, 2, 64, BF16, device, False, seed=3)
    cu = _cu(lens, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = vitkern.attention_varlen(*leaves, cu, cu, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, sum(lens)) and lse.dtype == F32
    grads = torch.autograd.grad(out, leaves, dout)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        dense = [t[sl].detach().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v)]
        o, lse_seq = vitkern.attention(*dense, causal=True, return_lse=True)
        g = torch.autograd.grad(o, dense, dout[sl].transpose(0, 1).unsqueeze(0))
        torch.testing.assert_close(out[sl], o[0].transpose(0, 1), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(lse[:, sl], lse_seq[0], atol=1e-4, rtol=1e-4)
        for got, want in zip(grads, g):
            torch.testing.assert_close(got[sl], want[0].transpose(0, 1), atol=2e-2, rtol=2e-2)
        start += n


def test_qkvpacked_varlen_equals_unpacked(device):
    lens = (50, 0, 33)
    gen = torch.Generator().manual_seed(5)
    qkv = _rand((sum(lens), 3, 2, 80), F16, device, gen).requires_grad_()
    cu = _cu(lens, device)
    out, lse = vitkern.attention_qkvpacked_varlen(qkv, cu, max_seqlen=50, return_lse=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(1))
    out2, lse2 = vitkern.attention_varlen(q, k, v, cu, cu, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    for got, want in zip(dqkv.unbind(1), torch.autograd.grad(out2, (q, k, v), dout)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_varlen_backends_agree(device, backend):
    lens = (9, 0, 40)
    q, k, v, dout = _inputs(lens, lens, 4, 2, 64, F32, device, False, seed=7)
    cu = _cu(lens, device)
    want = vitkern.attention_varlen(q, k, v, cu, cu, causal=True)
    with vitkern.use_backend(backend):
        got = vitkern.attention_varlen(q, k, v, cu, cu, causal=True)
        qkv = torch.stack([q, q, q], 1)
        torch.testing.assert_close(vitkern.attention_qkvpacked_varlen(qkv, cu),
                                   vitkern.attention_varlen(q, q, q, cu, cu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_torch_backend_reasons(monkeypatch):
    q = torch.randn(5, 2, 32)
    cu = _cu((5,), "cpu")
    with vitkern.use_backend("torch"), pytest.raises(vitkern.BackendUnavailableError, match="return_lse"):
        vitkern.attention_varlen(q, q, q, cu, cu, return_lse=True)
    # while torch.compile traces, the per-sequence loop (a host read of cu_seqlens) is refused
    assert native.attention_varlen_torch_supports(q, q, q, cu, cu) == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert native.attention_varlen_torch_supports(q, q, q, cu, cu) == [native._SYNC_REASON]


def test_empty_batches(device):
    h, d = 2, 32
    # no sequences at all, and sequences that are all empty
    for lens in ((), (0, 0)):
        cu = _cu(lens, device)
        q = torch.zeros(0, h, d, device=device, dtype=F16, requires_grad=True)
        out, lse = vitkern.attention_varlen(q, q, q, cu, cu, return_lse=True)
        assert out.shape == (0, h, d) and lse.shape == (h, 0)
    # queries whose every key sequence is empty: out 0, lse -inf, zero gradients
    q = torch.randn(7, h, d, device=device, dtype=F16, requires_grad=True)
    k = torch.zeros(0, h, d, device=device, dtype=F16, requires_grad=True)
    out, lse = vitkern.attention_varlen(q, k, k, _cu((3, 4), device), _cu((0, 0), device), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    (gq,) = torch.autograd.grad(out.float().sum(), (q,))
    assert torch.equal(gq, torch.zeros_like(q))


# --------------------------------------------------------------------------------------------
# No host sync: torch.compile, the sync detector, fake tensors
# --------------------------------------------------------------------------------------------


def _refuse_host_read(*_args, **_kwargs):
    raise AssertionError("a tensor value was read on the host (a device sync)")


class _NoHostReads(TorchDispatchMode):
    """Fails on every host read of a tensor value: ``aten._local_scalar_dense`` (what ``.item()``,
    ``int(t)``, ``bool(t)`` reach on a device) and ``Tensor.item`` / ``tolist`` / ``cpu`` /
    ``numpy`` themselves (which CPU tensors serve without a dispatch)."""

    _METHODS = ("item", "tolist", "cpu", "numpy")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self._METHODS}
        for name in self._METHODS:
            setattr(torch.Tensor, name, _refuse_host_read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            _refuse_host_read()
        return func(*args, **(kwargs or {}))


def _varlen_step(q, k, v, qkv, cu):
    out = vitkern.attention_varlen(q, k, v, cu, cu, causal=True)
    packed = vitkern.attention_qkvpacked_varlen(qkv, cu)
    return out.float().square().sum() + packed.float().sum()


def _step_inputs(device):
    lens = (5, 0, 17)
    q, k, v, _ = _inputs(lens, lens, 2, 1, 64, BF16, device, False)
    gen = torch.Generator().manual_seed(1)
    qkv = _rand((sum(lens), 3, 2, 64), BF16, device, gen)
    return [t.requires_grad_() for t in (q, k, v, qkv)], _cu(lens, device)


def test_no_host_reads_forward_and_backward(device):
    leaves, cu = _step_inputs(device)
    with _NoHostReads():
        loss = _varlen_step(*leaves, cu)
        torch.autograd.grad(loss, leaves)
    # the detector fails where a value is read: the reference reads cu_seqlens
    with vitkern.use_backend("reference"), _NoHostReads(), pytest.raises(AssertionError, match="host"):
        _varlen_step(*leaves, cu)


def test_fake_tensors_never_read_values(device, monkeypatch):
    # the fake path (torch.compile's tracing) has no values at all: a read would raise
    for name in _NoHostReads._METHODS:
        monkeypatch.setattr(torch.Tensor, name, _refuse_host_read)
    with FakeTensorMode() as mode:
        leaves = [mode.from_tensor(t).requires_grad_() for t in
                  (torch.empty(22, 2, 64), torch.empty(22, 1, 64), torch.empty(22, 1, 64), torch.empty(22, 3, 2, 64))]
        cu = mode.from_tensor(torch.zeros(4, dtype=torch.int32))
        loss = _varlen_step(*leaves, cu)
        grads = torch.autograd.grad(loss, leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    with FakeTensorMode() as mode, vitkern.use_backend("reference"), pytest.raises(AssertionError, match="host"):
        _varlen_step(*[mode.from_tensor(t) for t in (torch.empty(22, 2, 64), torch.empty(22, 1, 64),
                                                     torch.empty(22, 1, 64), torch.empty(22, 3, 2, 64))],
                     mode.from_tensor(torch.zeros(4, dtype=torch.int32)))


def test_torch_compile_fullgraph_no_graph_break(device):
    torch._dynamo.reset()
    leaves, cu = _step_inputs(device)
    explanation = torch._dynamo.explain(_varlen_step)(*leaves, cu)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(_varlen_step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, cu)
    grads = torch.autograd.grad(loss, leaves)
    eager = [t.detach().clone().requires_grad_() for t in leaves]
    eager_loss = _varlen_step(*eager, cu)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, torch.autograd.grad(eager_loss, eager)):
        torch.testing.assert_close(g, e)


def test_opcheck_varlen_ops(device):
    lens = (5, 0, 9)
    q, k, v, dout = _inputs(lens, lens, 2, 1, 48, F16, device, False)
    cu = _cu(lens, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitkern.attention_varlen_fwd.default, (q, k, v, cu, cu, None, None, True, 0.125))
    torch.library.opcheck(torch.ops.vitkern.attention_varlen_fwd.default, (q, k, v, cu, cu, 9, 9, False, 0.125),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out, lse = attn_op._attention_varlen_fwd_op(q.detach(), k.detach(), v.detach(), cu, cu, None, None, False, 0.125)
    torch.library.opcheck(torch.ops.vitkern.attention_varlen_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, None, cu, cu, None, None, False, 0.125,
                           True))
    qkv = torch.randn(14, 3, 2, 32, dtype=BF16, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.vitkern.attention_qkvpacked_varlen_fwd.default, (qkv, cu, 9, True, 0.125))
    out, lse = attn_op._attention_qkvpacked_varlen_fwd_op(qkv.detach(), cu, None, False, 0.125)
    torch.library.opcheck(torch.ops.vitkern.attention_qkvpacked_varlen_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, None, cu, None, False, 0.125, False))


# --------------------------------------------------------------------------------------------
# Bad input: errors name the argument (shapes and dtypes only: values stay on the device)
# --------------------------------------------------------------------------------------------


def _bad_call(q=None, k=None, v=None, cu_q=None, cu_k=None, **kwargs):
    base_q = torch.randn(12, 4, 32)
    base_k = torch.randn(12, 2, 32)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    return vitkern.attention_varlen(base_q if q is None else q, base_k if k is None else k,
                                    base_k if v is None else v, cu if cu_q is None else cu_q,
                                    cu if cu_k is None else cu_k, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(cu_q=torch.tensor([0, 5, 12])), TypeError, "cu_seqlens_q must have dtype in \\(int32\\)"),
    (dict(cu_k=torch.tensor([0, 5, 12], dtype=torch.float32)), TypeError, "cu_seqlens_k"),
    (dict(cu_q=torch.zeros(1, 3, dtype=torch.int32)), ValueError, "cu_seqlens_q must have 1 dimensions"),
    (dict(cu_q=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens_q must hold num_seqs"),
    (dict(cu_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError, "cu_seqlens_k must have the shape"),
    (dict(cu_k=torch.tensor([0, 5, 12], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens_k is on meta"),
    (dict(q=torch.randn(1, 12, 4, 32)), ValueError, "q must have 3 dimensions"),
    (dict(k=torch.randn(12, 2, 16)), ValueError, "k must have shape \\(total_k, Hkv, 32\\)"),
    (dict(k=torch.randn(12, 3, 32), v=torch.randn(12, 3, 32)), ValueError, "k has 3 heads"),
    (dict(v=torch.randn(11, 2, 32)), ValueError, "v must have shape \\(12, 2, 32\\)"),
    (dict(v=torch.randn(12, 2, 32, dtype=F16)), TypeError, "dtype"),
    (dict(q=torch.randn(12, 4, 32).to(torch.int32)), TypeError, "q must have dtype"),
    (dict(max_seqlen_q=13), ValueError, "max_seqlen_q must be in \\[0, 12\\]"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    (dict(max_seqlen_q=7.0), TypeError, "max_seqlen_q must be None or a python int"),
    (dict(max_seqlen_q=True), TypeError, "max_seqlen_q"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale=float("nan")), ValueError, "scale must be None or a finite number"),
])
def test_varlen_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**kwargs)


def test_varlen_shared_cu_seqlens_need_equal_totals():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="share one cu_seqlens"):
        vitkern.attention_varlen(torch.randn(12, 2, 32), torch.randn(10, 2, 32), torch.randn(10, 2, 32), cu, cu)


def test_qkvpacked_varlen_bad_inputs():
    cu = torch.tensor([0, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="qkv must have shape \\(total, 3, H, D\\)"):
        vitkern.attention_qkvpacked_varlen(torch.randn(12, 2, 2, 32), cu)
    with pytest.raises(ValueError, match="qkv must have 4 dimensions"):
        vitkern.attention_qkvpacked_varlen(torch.randn(1, 12, 3, 2, 32), cu)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        vitkern.attention_qkvpacked_varlen(torch.randn(12, 3, 2, 32), cu.long())
    with pytest.raises(ValueError, match="max_seqlen must be in"):
        vitkern.attention_qkvpacked_varlen(torch.randn(12, 3, 2, 32), cu, max_seqlen=20)


def test_reference_checks_cu_seqlens_values():
    q = torch.randn(12, 2, 32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be nondecreasing from 0 to the total token count 12"):
        A.attention_varlen_ref(q, q, q, torch.tensor([0, 5, 11], dtype=torch.int32),
                               torch.tensor([0, 5, 12], dtype=torch.int32))


def test_malformed_cu_seqlens_stay_in_bounds(device):
    # values past the totals (not checked: that would need a host sync) are clamped in the kernels
    q = torch.randn(12, 2, 32, device=device, dtype=F16)
    cu = torch.tensor([0, 5, 40], dtype=torch.int32, device=device)
    out = vitkern.attention_varlen(q, q, q, cu, cu)
    want = vitkern.attention_varlen(q, q, q, _cu((5, 7), device), _cu((5, 7), device))
    torch.testing.assert_close(out, want)


# --------------------------------------------------------------------------------------------
# Key-padding masks of attention / attention_qkvpacked
# --------------------------------------------------------------------------------------------


def _dense_masked_reference(q, k, v, mask, causal):
    """The dense (B, 1, Tq, Tk) additive mask a padded batch would build, through the reference."""
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    return A.attention_ref(q, k, v, causal=causal, key_padding_bias=bias[:, None, :])


@pytest.mark.parametrize("dtype,h,hkv,t,d,causal", [
    (BF16, 2, 2, 50, 64, False),
    (F16, 4, 2, 33, 72, True),
    (F32, 2, 1, 20, 80, False),
])
def test_key_padding_mask_matches_dense_masked_reference(device, dtype, h, hkv, t, d, causal):
    gen = torch.Generator().manual_seed(11)
    b = 3
    q = _rand((b, h, t, d), dtype, device, gen)
    k, v = (_rand((b, hkv, t, d), dtype, device, gen) for _ in range(2))
    dout = _rand((b, h, t, d), dtype, device, gen)
    lengths = torch.tensor([t, t // 3, 0], device=device)  # the last element has no valid key
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = vitkern.attention(*leaves, causal=causal, key_padding_mask=mask)
    grads = torch.autograd.grad(out, leaves, dout)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _dense_masked_reference(*leaves64, mask.cpu(), causal)
    grads64 = torch.autograd.grad(ref, leaves64, dout.double())
    leaves_lp = [x.clone().requires_grad_() for x in (q, k, v)]
    with vitkern.use_backend("torch"):
        out_lp = vitkern.attention(*leaves_lp, causal=causal, key_padding_mask=mask)
    grads_lp = torch.autograd.grad(out_lp, leaves_lp, dout)
    assert_flash_rule("out", out, ref, out_lp, dtype)
    magnitude = max(g.abs().max().item() for g in grads64)
    for name, g, r64, rlp in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        assert_flash_rule(name, g, r64, rlp, dtype, magnitude)
        assert torch.equal(g[2], torch.zeros_like(g[2]))


def test_qkvpacked_key_padding_mask(device):
    gen = torch.Generator().manual_seed(2)
    qkv = _rand((2, 17, 3, 2, 32), F16, device, gen).requires_grad_()
    mask = torch.ones(2, 17, dtype=torch.bool, device=device)
    mask[1, 9:] = False
    out = vitkern.attention_qkvpacked(qkv, key_padding_mask=mask)
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
    want = vitkern.attention(q, k, v, key_padding_mask=mask).transpose(1, 2)
    assert out.shape == (2, 17, 2, 32)
    torch.testing.assert_close(out, want)
    # rows 0..8 of element 1 equal attention over its first 9 tokens alone
    alone = vitkern.attention_qkvpacked(qkv[1:, :9])
    torch.testing.assert_close(out[1:, :9], alone, atol=2e-3, rtol=2e-3)
    torch.autograd.grad(out.float().sum(), qkv)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_key_padding_mask_other_backends(device, backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_rand((2, 2, 9, 32), F32, device, gen) for _ in range(3))
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5], device=device)
    want = vitkern.attention(q, k, v, key_padding_mask=mask)
    with vitkern.use_backend(backend):
        torch.testing.assert_close(vitkern.attention(q, k, v, key_padding_mask=mask), want, atol=1e-5, rtol=1e-5)


def test_key_padding_mask_bad_inputs():
    q = torch.randn(2, 2, 9, 32)
    with pytest.raises(TypeError, match="key_padding_mask must have dtype in \\(bool\\)"):
        vitkern.attention(q, q, q, key_padding_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="key_padding_mask must have shape \\(2, 9\\)"):
        vitkern.attention(q, q, q, key_padding_mask=torch.ones(2, 1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        vitkern.attention(q, q, q, key_padding_mask=torch.ones(2, 9, dtype=torch.bool, device="meta"))
