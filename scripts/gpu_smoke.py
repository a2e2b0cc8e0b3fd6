"""The first minute of a GPU session: every public op, forward and backward, on the GPU.

One ViT-B/16 shape (batch 4, 197 tokens, width 768, 12 heads of 64, 224 px images, patch 16), in
bfloat16 and float32, for each backend that implements the op (triton, cuda, torch, reference), checked
against the reference backend in float32 with IEEE dots (``relative_error`` within
``RELATIVE_TOLERANCE``, vitkern.testing.numerics). Also: a forward and backward driven from
a worker thread (Triton's scratch allocator is per thread; on CUDA every backward runs on
autograd's own device thread), and, on a machine with two GPUs, ops on the second device while
the first is current (the launch device guard). Prints a one-screen pass/fail table with the max
errors and a closing "N passed, N failed" line; exits 1 when a row failed, so that
scripts/gpu_check.sh reports it and goes on with the long steps.

usage: python scripts/gpu_smoke.py [--json PATH] [--ops linear,mlp,...] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from typing import Callable, Optional

import torch

import vitkern
from vitkern.testing.numerics import RELATIVE_TOLERANCE, relative_error
from vitkern.testing.threads import run_in_thread

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

B, T, D, H, P, IMG = 4, 197, 768, 12, 16, 224

# The backends each op has ("auto" first: its first call of each shape class times the fast
# backends on the GPU; the reference and torch are every op's; cuda only where the extension
# has it; resample_pos_embed is a reference-only helper; the variants of an op, such as pre_norm,
# skip the reference row: the op's own row has run it).
BACKENDS = {
    "layer_norm": ("auto", "triton", "torch", "reference"),
    "pre_norm": ("auto", "triton", "torch"),
    "add_layer_norm": ("auto", "triton", "torch", "reference"),
    "add_pre_norm": ("auto", "triton", "torch"),
    "attention": ("auto", "triton", "torch", "reference"),
    "attention_qkvpacked": ("auto", "triton", "torch", "reference"),
    "attention_prologue": ("auto", "triton", "torch"),
    "attention_varlen": ("auto", "triton", "torch", "reference"),
    "attention_qkvpacked_varlen": ("auto", "triton", "torch", "reference"),
    "scaled_dot_product_attention": ("auto", "triton", "torch", "reference"),
    "linear": ("auto", "triton", "cuda", "torch", "reference"),
    "linear_branch": ("auto", "triton", "torch"),
    "mlp": ("auto", "triton", "cuda", "torch", "reference"),
    "swiglu": ("auto", "triton", "torch", "reference"),
    "swiglu_mlp": ("auto", "triton", "torch", "reference"),
    "patch_embed": ("auto", "triton", "cuda", "torch", "reference"),
    "resample_pos_embed": ("reference",),
    "resample_pos_embed_packed": ("auto", "triton", "torch"),
}


def _rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def _cases(device) -> dict[str, Callable]:
    """op name -> make(dtype) returning (fn(*tensors) -> output, tensors)."""
    hd = D // H

    def r(*shape, dtype, scale=1.0):
        return _rand(*shape, dtype=dtype, device=device, scale=scale)

    def layer_norm(dt):
        return (
            lambda x, w, b: vitkern.layer_norm(x, w, b, eps=1e-6),
            [r(B, T, D, dtype=dt), r(D, dtype=dt), r(D, dtype=dt)],
        )

    def add_layer_norm(dt):
        def fn(x, res, w, b):
            y, s = vitkern.add_layer_norm(x, res, w, b, eps=1e-6)
            return y.float() + s.float()
        return fn, [r(B, T, D, dtype=dt), r(B, T, D, dtype=torch.float32), r(D, dtype=dt), r(D, dtype=dt)]

    def pre_norm(dt):  # a pre-norm: the float32 stream normed straight into the compute dtype
        return (
            lambda x, w, b: vitkern.layer_norm(x, w, b, eps=1e-6, out_dtype=dt),
            [r(B, T, D, dtype=torch.float32), r(D, dtype=torch.float32), r(D, dtype=torch.float32)],
        )

    def add_pre_norm(dt):  # a deferred residual add: the branch added to the stream inside the next norm
        def fn(branch, stream, w, b):
            y, s = vitkern.add_layer_norm(branch, stream, w, b, eps=1e-6, out_dtype=dt)
            return y.float() + s
        return fn, [r(B, T, D, dtype=dt), r(B, T, D, dtype=torch.float32), r(D, dtype=torch.float32),
                    r(D, dtype=torch.float32)]

    def attention(dt):
        return (lambda q, k, v: vitkern.attention(q, k, v), [r(B, H, T, hd, dtype=dt) for _ in range(3)])

    def attention_qkvpacked(dt):
        return (lambda qkv: vitkern.attention_qkvpacked(qkv), [r(B, T, 3, H, hd, dtype=dt)])

    # EVA-02's q / k LayerNorms and 2-D RoPE (one prefix token), run inside the attention kernels
    angle = torch.rand(T - 1, hd // 2, device=device) * 2 * math.pi
    sin, cos = angle.sin().repeat_interleave(2, -1), angle.cos().repeat_interleave(2, -1)

    def attention_prologue(dt):
        def fn(q, k, v, qw, qb, kw, kb):
            return vitkern.attention(q, k, v, q_norm=vitkern.QKNorm("layer", qw, qb, 1e-6),
                                     k_norm=vitkern.QKNorm("layer", kw, kb, 1e-6),
                                     rope=vitkern.RopeTables(sin, cos), num_prefix_tokens=1)
        return fn, [r(B, H, T, hd, dtype=dt) for _ in range(3)] + [r(hd, dtype=dt) for _ in range(4)]

    # packed variable-length sequences: B images of 197, 1, 0 and 577 tokens
    lengths = (197, 1, 0, 577)
    cu = torch.tensor([sum(lengths[:i]) for i in range(len(lengths) + 1)], dtype=torch.int32, device=device)

    def attention_varlen(dt):
        return (lambda q, k, v: vitkern.attention_varlen(q, k, v, cu, cu, max_seqlen_q=577, max_seqlen_k=577),
                [r(sum(lengths), H, hd, dtype=dt) for _ in range(3)])

    def attention_qkvpacked_varlen(dt):
        return (lambda qkv: vitkern.attention_qkvpacked_varlen(qkv, cu), [r(sum(lengths), 3, H, hd, dtype=dt)])

    def sdpa_key_padding(dt):
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool, device=device)
        mask[0, ..., T // 2:] = False
        mask[1] = False  # a fully masked sequence: output 0 (torch's SDPA kernels may give NaN rows)
        return (lambda q, k, v: vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                [r(B, H, T, hd, dtype=dt) for _ in range(3)])

    def linear(dt):
        return (lambda x, w, b, res, g: vitkern.linear(x, w, b, activation="gelu", residual=res, residual_scale=g),
                [r(B, T, D, dtype=dt), r(D, D, dtype=dt, scale=D ** -0.5), r(D, dtype=dt),
                 r(B, T, D, dtype=torch.float32), r(D, dtype=dt, scale=0.1)])

    def linear_branch(dt):  # proj / fc2 of a deferred block: the layer-scaled branch, no residual read
        return (lambda x, w, b, g: vitkern.linear(x, w, b, residual_scale=g),
                [r(B, T, D, dtype=dt), r(D, D, dtype=dt, scale=D ** -0.5), r(D, dtype=dt), r(D, dtype=dt, scale=0.1)])

    def mlp(dt):
        return (lambda x, w1, b1, w2, b2, res: vitkern.mlp(x, w1, b1, w2, b2, residual=res),
                [r(B, T, D, dtype=dt), r(4 * D, D, dtype=dt, scale=D ** -0.5), r(4 * D, dtype=dt),
                 r(D, 4 * D, dtype=dt, scale=(4 * D) ** -0.5), r(D, dtype=dt), r(B, T, D, dtype=torch.float32)])

    def swiglu(dt):  # timm's SwiGLU: two fc1 weights (EVA-02's sub-LN layout: the gate alone)
        hid = 8 * D // 3
        return (lambda x, wg, bg, wv, bv: vitkern.swiglu(x, wg, bg, value_weight=wv, value_bias=bv),
                [r(B, T, D, dtype=dt), r(hid, D, dtype=dt, scale=D ** -0.5), r(hid, dtype=dt),
                 r(hid, D, dtype=dt, scale=D ** -0.5), r(hid, dtype=dt)])

    def swiglu_mlp(dt):  # timm's SwiGLUPacked (DINOv2 giant): the packed fc1, gate rows first
        hid = 8 * D // 3
        return (lambda x, w1, b1, w2, b2, res: vitkern.swiglu_mlp(x, w1, b1, w2, b2, residual=res),
                [r(B, T, D, dtype=dt), r(2 * hid, D, dtype=dt, scale=D ** -0.5), r(2 * hid, dtype=dt),
                 r(D, hid, dtype=dt, scale=hid ** -0.5), r(D, dtype=dt), r(B, T, D, dtype=torch.float32)])

    def patch_embed(dt):
        n = (IMG // P) ** 2
        return (lambda im, w, b, pos, cls: vitkern.patch_embed(im, w, b, pos_embed=pos, prefix_tokens=cls),
                [r(B, 3, IMG, IMG, dtype=dt), r(D, 3, P, P, dtype=dt, scale=0.05), r(D, dtype=dt),
                 r(1, n + 1, D, dtype=dt, scale=0.02), r(1, 1, D, dtype=dt)])

    def resample_pos_embed(dt):
        return (
            lambda pos: vitkern.resample_pos_embed(pos, (16, 16), num_prefix_tokens=1),
            [r(1, 1 + 14 * 14, D, dtype=dt)],
        )

    def resample_pos_embed_packed(dt):
        # NaFlex: a learned 16 x 16 grid to four image grids (the kernel's one-pass order) and to
        # sixteen (its separable order: x first, through the fp32 intermediate grid)
        few = [(14, 14), (8, 20), (1, 1), (27, 9)]
        many = [(h, w) for h in (3, 10, 24, 31) for w in (2, 12, 17, 30)]
        return (lambda pos: torch.cat([vitkern.resample_pos_embed_packed(pos, g) for g in (few, many)]),
                [r(1, 16, 16, D, dtype=dt, scale=0.02)])

    return {
        "layer_norm": layer_norm, "pre_norm": pre_norm, "add_layer_norm": add_layer_norm,
        "add_pre_norm": add_pre_norm, "attention": attention, "attention_prologue": attention_prologue,
        "attention_qkvpacked": attention_qkvpacked, "linear_branch": linear_branch,
        "resample_pos_embed_packed": resample_pos_embed_packed, "scaled_dot_product_attention": sdpa_key_padding,
        "attention_varlen": attention_varlen, "attention_qkvpacked_varlen": attention_qkvpacked_varlen,
        "linear": linear, "mlp": mlp, "swiglu": swiglu, "swiglu_mlp": swiglu_mlp, "patch_embed": patch_embed,
        "resample_pos_embed": resample_pos_embed,
    }


def _run(fn, tensors, backend: str, seed_grad: Optional[torch.Tensor] = None):
    """(output, input grads, the output grad used) of ``fn`` under ``backend``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with vitkern.use_backend(backend):
        out = fn(*leaves)
        g = torch.randn(out.shape, device=out.device) if seed_grad is None else seed_grad
        (out.float() * g).sum().backward()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out.detach(), [t.grad for t in leaves], g


def check(op: str, make: Callable, backend: str, dtype, where: str = "main thread") -> dict:
    row = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "where": where}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        fn, tensors = make(dtype)
        previous = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "ieee"   # the reference: fp32, IEEE dots
        try:
            ref_out, ref_grads, g = _run(fn, [t.detach().float() for t in tensors], "reference")
        finally:
            torch.backends.cuda.matmul.fp32_precision = previous
        if where == "worker thread":
            out, grads, _ = run_in_thread(lambda: _run(fn, tensors, backend, g))
        else:
            out, grads, _ = _run(fn, tensors, backend, g)
        row["fwd_err"] = relative_error(out, ref_out)
        row["bwd_err"] = max((relative_error(a, b) for a, b in zip(grads, ref_grads)), default=0.0)
        tol = RELATIVE_TOLERANCE[dtype]
        row["ok"] = row["fwd_err"] <= tol and row["bwd_err"] <= tol
        row["error"] = None if row["ok"] else f"error above {tol:g}"
    except Exception as exc:  # noqa: BLE001  (this row fails; the others still run)
        first = str(exc).splitlines()[0] if str(exc) else ""
        row.update(ok=False, fwd_err=None, bwd_err=None, error=f"{type(exc).__name__}: {first}"[:160],
                   traceback=traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="every public op, forward and backward, on the GPU")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--ops", help="comma-separated subset of: " + ", ".join(BACKENDS))
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"gpu_smoke: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, vitkern {vitkern.__version__}, "
          f"extension {'loaded' if vitkern.cuda_extension_available() else 'NOT loaded'}")
    cases = _cases(device)
    ops = args.ops.split(",") if args.ops else list(cases)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    rows = [check(op, cases[op], backend, dtype) for op in ops for backend in BACKENDS[op] for dtype in dtypes]
    for op in ("linear", "attention", "layer_norm"):           # the scratch allocator per thread
        rows.append(check(op, cases[op], "triton", torch.bfloat16, where="worker thread"))
    if torch.cuda.device_count() > 1:                          # the launch device guard
        other = torch.device("cuda", 1 if device.index != 1 else 0)
        other_cases = _cases(other)
        for op in ("linear", "attention", "layer_norm", "patch_embed"):
            rows.append(check(op, other_cases[op], "triton", torch.bfloat16, where=f"{other} (current {device})"))
    else:
        print("gpu_smoke: one GPU here: the second-device rows do not run")

    def fmt(v):
        return "-" if v is None else ("inf" if v == math.inf else f"{v:.1e}")

    print(f"\n{'op':28s} {'backend':9s} {'dtype':8s} {'where':22s} {'fwd err':>8s} {'bwd err':>8s} {'s':>6s}  result")
    for r in rows:
        result = "ok" if r["ok"] else "FAIL: " + (r["error"] or "")
        print(f"{r['op']:28s} {r['backend']:9s} {r['dtype']:8s} {r['where'][:22]:22s} {fmt(r['fwd_err']):>8s} "
              f"{fmt(r['bwd_err']):>8s} {r['seconds']:6.1f}  {result}")
    print("\nwhat auto chose (vitkern._tuning):")
    print(vitkern._tuning.decisions())
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        if r.get("traceback"):
            print(f"\n--- {r['op']} / {r['backend']} / {r['dtype']} / {r['where']}:\n{r['traceback']}")
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
