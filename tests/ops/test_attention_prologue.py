"""Attention with the QK-norm / RoPE prologue fused into the Triton kernels (op
"attention_prologue"): q normalised and rotated as the forward kernels load it, k in one pass of
the prologue's kernel, both inverses in the dQ / dK/dV kernels' epilogues.

Every output and gradient (q, k, v, the norms' weights and biases, the rotation tables) against
the float64 composition of the reference prologue and reference attention, under the flash rule
(at most twice the error of the PyTorch composition in the run's dtype, plus that dtype's rounding
noise). Buffers the ops allocate are NaN-poisoned, so an element a kernel never writes fails.
"""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern.ops.attention import op as attn_op
from vitkern.ops.attention.launch import _attention_bwd
from vitkern.ops.attention.prologue import prologue_fusable
from vitkern.ops.attention.configs import _attn_pieces
from vitkern.ops._config import INTERPRETING
from vitkern.ops.attention import attention_ref
from vitkern.ops.qk_prologue import QKNorm, RopeTables, apply_qk_prologue_ref
from vitkern.testing.numerics import assert_flash_rule, poisoned

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETING), reason="Triton kernels need a GPU or TRITON_INTERPRET=1"
)


class _TorchWithPoisonedEmpty:
    """``torch`` for the op module, with ``empty`` filling NaN (everything else torch's)."""

    def __getattr__(self, name):
        if name == "empty":
            return lambda shape, dtype=None, device=None, **kw: poisoned(shape, dtype, device)
        return getattr(torch, name)


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    vitkern.use_backend("triton")  # the conftest restores the previous choice
    monkeypatch.setattr(attn_op, "torch", _TorchWithPoisonedEmpty())


def _case_inputs(b, h, hkv, t, d, dtype, device, *, norm, affine, rope, per_head, prefix, packed, q_norm_only,
                 seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    if packed:
        qkv = rnd(b, t, 3, h, d, scale=1.5, shift=0.3).to(dtype)
        q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
    else:
        q = rnd(b, h, t, d, scale=1.5, shift=0.3).to(dtype)
        k = rnd(b, hkv, t, d, scale=1.5, shift=0.3).to(dtype)
        v = rnd(b, hkv, t, d).to(dtype)
    params = {}
    for side in ("q", "k"):
        if norm and not (q_norm_only and side == "k"):
            params[f"{side}_w"] = rnd(d, scale=0.3, shift=1.0) if affine else None
            params[f"{side}_b"] = rnd(d, scale=0.3) if affine and norm == "layer" else None
    if rope:
        shape = (h, t - prefix, d // 2) if per_head else (t - prefix, d // 2)
        angles = rnd(*shape, scale=3.0)
        lay = (lambda a: torch.cat([a, a], -1)) if rope == "half" else (lambda a: a.repeat_interleave(2, -1))
        params["sin"], params["cos"] = lay(angles.sin()), lay(angles.cos())
    dout = rnd(b, h, t, d).to(dtype)
    return (q, k, v), params, dout


def _call(q, k, v, params, *, norm, rope, prefix, causal, mask, attention=None):
    def qk(side):
        if f"{side}_w" not in params:
            return None
        return QKNorm(norm, params[f"{side}_w"], params[f"{side}_b"], 1e-6)

    tables = RopeTables(params["sin"], params["cos"], rope) if rope else None
    return (attention or vitkern.attention)(q, k, v, causal=causal, q_norm=qk("q"), k_norm=qk("k"), rope=tables,
                                            num_prefix_tokens=prefix, key_padding_mask=mask)


def _reference(q, k, v, *, causal, q_norm, k_norm, rope, num_prefix_tokens, key_padding_mask):
    """The float64 composition: the reference prologue on q and k, then reference attention."""
    bias = None
    if key_padding_mask is not None:
        bias = torch.where(key_padding_mask, 0.0, float("-inf")).to(q.dtype).unsqueeze(1)
    q = apply_qk_prologue_ref(q, q_norm, rope, num_prefix_tokens)
    k = apply_qk_prologue_ref(k, k_norm, rope, num_prefix_tokens)
    return attention_ref(q, k, v, causal=causal, key_padding_bias=bias)


CASES = [
    # (B, H, Hkv, T, D, norm, affine, rope, per_head, prefix, causal, packed, key padding, q-norm only)
    (2, 3, 3, 197, 64, "layer", True, "interleaved", False, 1, False, True, False, False),  # EVA-02, packed qkv
    (1, 2, 2, 37, 64, None, False, "half", False, 5, False, False, False, False),      # DINOv3: halves, 5 prefix
    (1, 2, 1, 33, 72, "layer", False, "interleaved", False, 1, True, False, False, False),  # 72 = 64 + 8, GQA
    (1, 4, 4, 17, 16, None, False, "interleaved", True, 0, False, False, False, False),  # mixed RoPE: per head
    (1, 2, 2, 9, 96, "rms", True, None, False, 0, False, False, True, False),         # QK-norm, key padding
    (1, 2, 2, 9, 128, "layer", True, "interleaved", False, 1, False, False, False, False),  # 128: composed
    (2, 2, 2, 20, 32, "layer", True, "interleaved", False, 2, False, False, False, True),  # only q normalised
    (1, 2, 2, 50, 80, "rms", True, "half", False, 0, False, False, False, False),     # 80 halves: composed
]


def _case_id(c):
    return f"T{c[3]}-D{c[4]}-{c[5]}-{c[7]}{'-heads' if c[8] else ''}{'-causal' if c[10] else ''}"


def _check(case, dtype, device):
    b, h, hkv, t, d, norm, affine, rope, per_head, prefix, causal, packed, kpm, q_only = case
    (q, k, v), params, dout = _case_inputs(b, h, hkv, t, d, dtype, device, norm=norm, affine=affine, rope=rope,
                                           per_head=per_head, prefix=prefix, packed=packed, q_norm_only=q_only)
    mask = None
    if kpm:
        mask = torch.ones(b, t, dtype=torch.bool, device=device)
        mask[:, t // 2:] = False
    names = ["q", "k", "v"] + [n for n, p in params.items() if p is not None]

    def leaves_of(convert):
        tensors = [convert(x) for x in (q, k, v)]
        ps = {n: (convert(p) if p is not None else None) for n, p in params.items()}
        return tensors, ps

    def run(convert, attention=None):
        (lq, lk, lv), ps = leaves_of(convert)
        out = _call(lq, lk, lv, ps, norm=norm, rope=rope, prefix=prefix, causal=causal, mask=mask,
                    attention=attention)
        leaves = [lq, lk, lv] + [p for p in ps.values() if p is not None]
        return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))

    def leaf(x):
        return x.detach().clone().requires_grad_()

    out, grads = run(leaf)
    out64, grads64 = run(lambda x: x.detach().double().requires_grad_(), attention=_reference)
    with vitkern.use_backend("torch"):
        out_lp, grads_lp = run(leaf)
    scale = max(1.0, out64.abs().max().item())
    assert_flash_rule("out", out, out64, out_lp, dtype)
    for name, g, g64, glp in zip(names, grads, grads64, grads_lp):
        assert g.dtype == glp.dtype, name
        assert_flash_rule(f"d{name}", g, g64, glp, dtype, scale=scale * max(1.0, g64.abs().max().item()))


@pytest.mark.parametrize("case", CASES[1:], ids=_case_id)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_prologue_matches_reference(case, dtype, device):
    _check(case, dtype, device)


def test_eva02_block_shape_bf16(device):
    """EVA-02's shape class: 197 tokens (a class token), D = 64, LayerNorm QK-norm, interleaved
    RoPE, read from the packed qkv."""
    _check(CASES[0], BF16, device)


def test_which_layouts_fuse():
    assert prologue_fusable(64, _attn_pieces(64, split=True), "half")
    assert prologue_fusable(72, _attn_pieces(72, split=True), "interleaved")
    assert prologue_fusable(80, _attn_pieces(80, split=True), None)
    assert not prologue_fusable(80, _attn_pieces(80, split=True), "half")
    assert not prologue_fusable(48, (64, 0), "half")  # a padded tile: the halves are not its halves
    assert prologue_fusable(96, _attn_pieces(96, split=True), "interleaved")
    assert not prologue_fusable(88, _attn_pieces(88, split=True), "interleaved")  # a masked 96
    assert not prologue_fusable(128, _attn_pieces(128, split=True), None)  # its tiles would spill
    assert not prologue_fusable(72, _attn_pieces(72, split=False), "interleaved")  # fp32 pads to 128


def test_variant_config_table():
    """The variant tiles (the prologue's, packed sequences' forward and backward, the dQ-kernel
    mode's, the non-causal atomic mode's) replace the plain ones only for their variant, each
    entry is for its arch, and the prologue's are looked up no wider than the fused prologue goes
    (wider calls compose)."""
    from vitkern.ops.attention import configs as C
    from vitkern.ops.attention.prologue import PROLOGUE_MAX_WIDTH

    for (variant, kernel, arch, precision, masked), table in C._ATTN_VARIANT_CONFIGS.items():
        assert variant in ("prologue", "packed", "dq_kernel", "atomic_noncausal")
        assert kernel in (("fwd", "dkdv", "dq") if variant == "packed" else ("dkdv", "dq"))
        assert precision in ("16bit", "tf32", "ieee")
        assert [w for w, _ in table] == sorted(w for w, _ in table)
        for max_width, config in table:
            width = min(max_width, PROLOGUE_MAX_WIDTH) if variant == "prologue" else max_width
            got = C._attn_config(kernel, arch, precision, width, masked, variant=variant)
            if config is None:  # these widths read the plain tables
                assert got is C._attn_config(kernel, arch, precision, width, masked)
                continue
            assert config.archs == (arch,) and set(config.meta) == {"BLOCK_M", "BLOCK_N"}
            assert got is config
    # the dQ-kernel mode's dK/dV kernel at head width 128 on sm_90 (no atomic dQ in its loop:
    # 64-row tiles); the atomic mode and the narrower widths keep the plain tiles
    atomic = C._attn_bwd_plan(90, "16bit", 128, False, 1, 2, 2, 4096, 4096, 132, False)
    separate = C._attn_bwd_plan(90, "16bit", 128, False, 1, 2, 2, 4096, 4096, 132, True)
    assert atomic.mode == "atomic" and separate.mode == "dq_kernel"
    assert (separate.config.meta["BLOCK_M"], separate.config.meta["BLOCK_N"]) == (64, 64)
    assert atomic.config is C._attn_config("dkdv", 90, "16bit", 128)
    assert separate.programs == 4096 // 64 * 2
    # ... and so does the atomic mode without the causal mask; packed launches keep their tables
    noncausal = C._attn_bwd_plan(90, "16bit", 128, False, 1, 2, 2, 4096, 4096, 132, False, causal=False)
    assert noncausal.mode == "atomic" and noncausal.config == separate.config
    assert noncausal.programs == 4096 // 64 * 2
    packed = C._attn_bwd_plan(90, "16bit", 128, False, 1, 2, 2, 4096, 4096, None, False, variant="packed",
                              causal=False)
    assert packed.config is C._attn_config("dkdv", 90, "16bit", 128)
    assert C._attn_bwd_plan(80, "16bit", 128, False, 1, 2, 2, 4096, 4096, 108, False, causal=False).config is \
        C._attn_config("dkdv", 80, "16bit", 128)
    narrow = C._attn_bwd_plan(90, "16bit", 64, False, 1, 2, 2, 4096, 4096, 132, True)
    assert narrow.config is C._attn_config("dkdv", 90, "16bit", 64)
    plain = C._attn_bwd_plan(90, "16bit", 64, True, 2, 4, 2, 197, 197, 132, False)
    fused = C._attn_bwd_plan(90, "16bit", 64, True, 2, 4, 2, 197, 197, 132, False, variant="prologue")
    assert fused.mode == "dq_kernel" and plain.config is not fused.config
    assert fused.dq_config is C._ATTN_VARIANT_CONFIGS[("prologue", "dq", 90, "16bit", True)][0][1]


class _Spy:
    def __init__(self, real, calls, name):
        self.real, self.calls, self.name = real, calls, name

    def __call__(self, *args):
        self.calls.append((self.name, args))
        return self.real(*args)


@pytest.fixture
def op_calls(monkeypatch):
    """The registered prologue / attention ops each call reaches, with their arguments."""
    calls = []
    monkeypatch.setattr(torch.ops.vitkern, "qk_prologue_fwd", _Spy(torch.ops.vitkern.qk_prologue_fwd, calls,
                                                                   "qk_prologue_fwd"), raising=False)
    monkeypatch.setattr(attn_op, "_attention_prologue_fwd_op", _Spy(attn_op._attention_prologue_fwd_op, calls,
                                                                    "attention_prologue_fwd"))
    monkeypatch.setattr(attn_op, "_attention_fwd_op", _Spy(attn_op._attention_fwd_op, calls, "attention_fwd"))
    return calls


def test_fused_path_and_composed_fallback(op_calls, device):
    """A fusable prologue runs one fused op (no prologue op); "half" pairs of D = 80 compose the
    prologue op (q and k) with the plain attention op; no grad: q' is not stored."""
    q = torch.randn(1, 2, 5, 16, device=device)
    t = vitkern.Rope2D(16, grid_size=(2, 2)).tables()
    with torch.no_grad():
        vitkern.attention(q, q, q, q_norm=QKNorm("rms", torch.ones(16, device=device)), rope=t, num_prefix_tokens=1)
    assert [c[0] for c in op_calls] == ["attention_prologue_fwd"]
    assert op_calls[0][1][-1] is False  # save_rot
    op_calls.clear()
    qg = q.clone().requires_grad_()
    vitkern.attention(qg, q, q, rope=t, num_prefix_tokens=1)
    assert [c[0] for c in op_calls] == ["attention_prologue_fwd"] and op_calls[0][1][-1] is True
    op_calls.clear()
    q80 = torch.randn(1, 2, 4, 80, device=device)
    half = RopeTables(torch.zeros(4, 80, device=device), torch.ones(4, 80, device=device), "half")
    vitkern.attention(q80, q80, q80, rope=half)
    assert sorted(c[0] for c in op_calls) == ["attention_fwd", "qk_prologue_fwd", "qk_prologue_fwd"]


def test_deterministic_run_to_run(device):
    case = (1, 2, 2, 40, 64, "layer", True, "half", False, 1, True, False, False, False)
    (q, k, v), params, dout = _case_inputs(1, 2, 2, 40, 64, BF16, device, norm="layer", affine=True, rope="half",
                                           per_head=False, prefix=1, packed=False, q_norm_only=False)
    runs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ps = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        out = _call(*leaves, ps, norm="layer", rope="half", prefix=1, causal=case[10], mask=None)
        runs.append((out, *torch.autograd.grad(out, leaves + list(ps.values()), dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch_gives_zero_parameter_gradients(device):
    q = torch.zeros(0, 2, 5, 32, device=device, requires_grad=True)
    w = torch.ones(32, device=device, requires_grad=True)
    sin = torch.zeros(4, 32, device=device, requires_grad=True)
    cos = torch.ones(4, 32, device=device, requires_grad=True)
    out = vitkern.attention(q, q, q, q_norm=QKNorm("layer", w), rope=RopeTables(sin, cos), num_prefix_tokens=1)
    gw, gs, gc = torch.autograd.grad(out.sum(), (w, sin, cos))
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gs, torch.zeros_like(sin))
    assert torch.equal(gc, torch.zeros_like(cos))


def test_backward_launcher_refuses_what_it_cannot_fuse(device):
    from vitkern.ops.attention.launch import PackedSeqs, TilePrologue

    q = torch.randn(1, 1, 4, 16, device=device)
    p = TilePrologue(2, None, None, 1e-6, None, None, 0, 0)
    with pytest.raises(ValueError, match="dQ kernel"):
        _attention_bwd(q, q, q, q, q, q[..., 0], None, None, False, 0.25, False, q.clone(), q.clone(), q.clone(),
                       mode="atomic", q_prologue=p, q_raw=q)
    with pytest.raises(ValueError, match="raw input"):
        _attention_bwd(q, q, q, q, q, q[..., 0], None, None, False, 0.25, False, q.clone(), q.clone(), q.clone(),
                       q_prologue=p)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="dense"):
        _attention_bwd(q, q, q, q, q, q[..., 0], None, None, False, 0.25, False, q.clone(), q.clone(), q.clone(),
                       seqs=PackedSeqs(cu, cu), q_prologue=p, q_raw=q)


def test_negative_scale_composes(device):
    """A negative scale runs the prologue's kernels first (the forward negates q, which must be q')."""
    (q, k, v), params, _ = _case_inputs(1, 2, 2, 12, 32, F32, device, norm="rms", affine=True, rope="interleaved",
                                        per_head=False, prefix=1, packed=False, q_norm_only=False)
    qn, kn = QKNorm("rms", params["q_w"]), QKNorm("rms", params["k_w"])
    tab = RopeTables(params["sin"], params["cos"])
    out = vitkern.attention(q, k, v, scale=-0.3, q_norm=qn, k_norm=kn, rope=tab, num_prefix_tokens=1)
    with vitkern.use_backend("reference"):
        ref = vitkern.attention(q, k, v, scale=-0.3, q_norm=qn, k_norm=kn, rope=tab, num_prefix_tokens=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_opcheck_prologue_ops(device):
    (q, k, v), params, dout = _case_inputs(1, 2, 2, 9, 48, F16, device, norm="layer", affine=True,
                                           rope="interleaved", per_head=False, prefix=1, packed=False,
                                           q_norm_only=False)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, None, params["q_w"], params["q_b"], params["k_w"], params["k_b"], params["sin"], params["cos"],
            1, 1, 1e-6, 1e-6, 1, 1, False, 0.125, True, True)
    torch.library.opcheck(torch.ops.vitkern.attention_prologue_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out, lse, q_rot, k_rot = attn_op._attention_prologue_fwd_op(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                                  for a in args))
    torch.library.opcheck(torch.ops.vitkern.attention_prologue_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, None, q_rot, k_rot, None,
                           params["q_w"], params["q_b"], params["k_w"], params["k_b"], params["sin"], params["cos"],
                           1, 1, 1e-6, 1e-6, 1, 1, False, 0.125, True, [True, True, True, True, True]))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    (q, k, v), params, _ = _case_inputs(1, 2, 2, 17, 64, BF16, device, norm="layer", affine=True,
                                        rope="interleaved", per_head=False, prefix=1, packed=False,
                                        q_norm_only=False)

    def step(q, k, v, qw, qb, kw, kb, sin, cos):
        out = vitkern.attention(q, k, v, q_norm=QKNorm("layer", qw, qb), k_norm=QKNorm("layer", kw, kb),
                                rope=RopeTables(sin, cos), num_prefix_tokens=1)
        return out.float().square().sum()

    inputs = (q, k, v, params["q_w"], params["q_b"], params["k_w"], params["k_b"], params["sin"], params["cos"])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = [t.detach().clone().requires_grad_() for t in inputs]
    eager_loss = step(*eager)
    for g, e in zip(grads, torch.autograd.grad(eager_loss, eager)):
        torch.testing.assert_close(g, e)
