"""The GEMM core's static compile cases: every config, every epilogue variant once, the benchmark
shapes (``python -m vitkern.testing.compile_check vitkern.ops.gemm``)."""

import torch

from vitkern.ops._config import device_arch
from vitkern.testing.compile_check import compile_cases
from vitkern.ops.activation import Activation
from vitkern.ops.gemm.configs import GEMM_CONFIGS, SWIGLU_CONFIGS, config_kinds
from vitkern.ops.gemm.epilogue import Epilogue
from vitkern.ops.gemm.launch import act_bwd, gemm, swiglu_bwd, swiglu_gemm

GELU, GELU_TANH, QUICK_GELU = Activation.GELU, Activation.GELU_TANH, Activation.QUICK_GELU


def _case_tensors(M, N, K, dtype, out_dtype=None):
    a = torch.empty(M, K, dtype=dtype)
    b = torch.empty(N, K, dtype=dtype)
    out = torch.empty(M, N, dtype=out_dtype or dtype)
    return a, b, out


def _config_case(kind: str, cfg, dtype) -> None:
    """One launch of ``cfg`` with an epilogue of ``kind`` at a ViT-B-like shape (M = 4096)."""
    f32 = torch.float32
    if kind == "act":  # fc1: bias + GELU + pre store
        a, b, out = _case_tensors(4096, 3072, 768, dtype)
        gemm(a, b, out, Epilogue(bias=torch.empty(3072, dtype=dtype), activation=GELU, pre=torch.empty_like(out)),
             config=cfg)
    elif kind == "residual":  # fc2 / proj: bias, LayerScale, drop path, fp32 residual
        a, b, out = _case_tensors(4096, 768, 3072, dtype, f32)
        fc2 = Epilogue(bias=torch.empty(768, dtype=dtype), col_scale=torch.empty(768, dtype=dtype),
                       row_scale=torch.empty(4096, dtype=f32), residual=torch.empty(4096, 768, dtype=f32))
        gemm(a, b, out, fc2, config=cfg)
    elif kind == "scale":  # dW with split-K, row sums, row dots and a reduction-axis scale: A = dY^T, B = x^T
        g = torch.empty(8192, 768, dtype=f32 if dtype == torch.bfloat16 else dtype)
        x = torch.empty(8192, 3072, dtype=dtype)
        gemm(g.t(), x.t(), torch.empty(768, 3072, dtype=f32),
             Epilogue(row_scale=torch.empty(768, dtype=dtype), row_dot=torch.empty(768, 3072, dtype=dtype)),
             red_scale=torch.empty(8192, dtype=f32), row_sum=True, split_k=4, config=cfg)
    elif kind == "branch":  # a deferred block's proj / fc2: bias, LayerScale, drop path, no residual
        a, b, out = _case_tensors(4096, 768, 3072, dtype)
        gemm(a, b, out, Epilogue(bias=torch.empty(768, dtype=dtype), col_scale=torch.empty(768, dtype=dtype),
                                 row_scale=torch.empty(4096, dtype=f32)), config=cfg)
    elif kind == "bias":  # qkv: bias only
        a, b, out = _case_tensors(4096, 2304, 768, dtype)
        gemm(a, b, out, Epilogue(bias=torch.empty(2304, dtype=dtype)), config=cfg)
    elif kind == "none":  # dX: a bare product, dY @ W
        a, b, out = _case_tensors(4096, 768, 3072, dtype)
        gemm(a, torch.empty(3072, 768, dtype=dtype).t(), out, config=cfg)
    elif kind == "act_grad":  # the MLP's dU GEMM
        a, b, out = _case_tensors(4096, 3072, 768, dtype)
        gemm(a, torch.empty(768, 3072, dtype=dtype).t(), out,
             Epilogue(row_scale=torch.empty(4096, dtype=f32), act_grad=GELU, aux=torch.empty_like(out)), config=cfg)
    elif kind == "glu_grad":  # the SwiGLU MLP's dH GEMM, with drop path's row-scale grad
        _swiglu_dh_case(dtype, cfg, drop_path=True)
    else:
        raise ValueError(kind)


def _swiglu_dh_case(dtype, cfg=None, grad_dtype=None, drop_path=False) -> None:
    """The SwiGLU MLP's dH GEMM (ViT-g: D = 1536, H = 4096): dH = rs * (dY @ W2) with the
    SwiGLU-gradient epilogue writing the packed (dg, dv); with ``drop_path`` also the row-scale
    grad's row dots with h and weighted row sums; a float32 dY writes its 16-bit copy."""
    f32 = torch.float32
    m, d, hidden = 4096, 1536, 4096
    g = torch.empty(m, d, dtype=grad_dtype or dtype)
    ep = Epilogue(row_scale=torch.empty(m, dtype=f32), glu_grad=True, aux=torch.empty(m, 2 * hidden, dtype=dtype),
                  row_dot=torch.empty(m, hidden, dtype=dtype) if drop_path else None)
    narrow = g.dtype == f32 and dtype != f32
    gemm(g, torch.empty(d, hidden, dtype=dtype).t(), torch.empty(m, 2 * hidden, dtype=dtype), ep,
         row_sum=drop_path, row_sum_weight=torch.empty(d, dtype=f32) if drop_path else None,
         a_copy=torch.empty(m, d, dtype=dtype) if narrow else None, config=cfg)


def _swiglu_cases(full: bool) -> None:
    """The SwiGLU forward GEMM: every config of this arch family at ViT-g's fc1 (M = 4096, K =
    1536, H = 4096, the pre-activation stored; packed weight halves), plus (default set) ragged
    and unaligned shapes: K = 72 / 80 (masked K tail), H = 200, M = 197 / 1, two separate weights,
    no bias, no pre store."""
    arch = device_arch()
    for name, cfg in SWIGLU_CONFIGS.items():
        if not name.startswith("h100" if arch >= 90 else "a100"):
            continue
        dtype = torch.bfloat16 if "_16_" in name else torch.float32
        prev = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32" if "tf32" in name else "ieee"
        try:
            m = 32 if name.endswith("_small") else 4096
            shapes = [(m, 4096, 1536)] + ([(m, 200, 72), (m, 1000, 80)] if full else [])
            for M, H, K in shapes:
                x = torch.empty(M, K, dtype=dtype)
                w = torch.empty(2 * H, K, dtype=dtype)
                swiglu_gemm(x, w[:H], w[H:], torch.empty(M, H, dtype=dtype), torch.empty(H, dtype=dtype),
                            torch.empty(H, dtype=dtype), torch.empty(M, 2 * H, dtype=dtype), config=cfg)
        finally:
            torch.backends.cuda.matmul.fp32_precision = prev


def _config_cases(kinds) -> None:
    """Every config of this arch family with each epilogue kind in ``kinds`` the table selects it
    for (``config_kinds``)."""
    arch = device_arch()
    for name, cfg in GEMM_CONFIGS.items():
        if not name.startswith("h100" if arch >= 90 else "a100"):
            continue
        dtype = torch.bfloat16 if "_16_" in name else torch.float32
        prev = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32" if "tf32" in name else "ieee"
        try:
            for kind in config_kinds(name):
                if kind in kinds:
                    _config_case(kind, cfg, dtype)
        finally:
            torch.backends.cuda.matmul.fp32_precision = prev


@compile_cases
def _gemm_cases():
    bf16, f32 = torch.bfloat16, torch.float32
    # every config with the fc1, fc2 / proj, dW, qkv and SwiGLU dH epilogues it serves
    _config_cases(("act", "residual", "scale", "bias", "glu_grad", "branch"))
    # the MLP's dU GEMM: dPre = rs * (dY @ W2g) * gelu'(pre); ragged / unaligned shapes (K = 588,
    # N = 1000 / 100 / 21843: plain loads where TMA cannot address the rows)
    for dtype in (bf16, torch.float16):
        a, b, out = _case_tensors(4096, 3072, 768, dtype)
        gemm(a, torch.empty(768, 3072, dtype=dtype).t(), out,
             Epilogue(row_scale=torch.empty(4096, dtype=f32), act_grad=GELU, aux=torch.empty_like(out)))
    # the fp32 residual stream's backward: the MLP's dP and linear's dX GEMMs read the float32 dY
    # and write it in bf16 (a_copy) for the dW GEMM that follows
    g = torch.empty(4096, 768, dtype=f32)
    gemm(g, torch.empty(768, 3072, dtype=bf16).t(), torch.empty(4096, 3072, dtype=bf16),
         Epilogue(row_scale=torch.empty(4096, dtype=f32), act_grad=GELU, aux=torch.empty(4096, 3072, dtype=bf16)),
         a_copy=torch.empty(4096, 768, dtype=bf16))
    gemm(g, torch.empty(768, 768, dtype=bf16).t(), torch.empty(4096, 768, dtype=bf16),
         Epilogue(row_scale=torch.empty(4096, dtype=f32)), a_copy=torch.empty(4096, 768, dtype=bf16))
    # with drop path's row-scale grad: row dots with x and the weighted row sums (g @ gamma * b)
    gemm(g, torch.empty(768, 768, dtype=bf16).t(), torch.empty(4096, 768, dtype=bf16),
         Epilogue(row_scale=torch.empty(4096, dtype=f32), row_dot=torch.empty(4096, 768, dtype=bf16)),
         row_sum=True, row_sum_weight=torch.empty(768, dtype=f32), a_copy=torch.empty(4096, 768, dtype=bf16))
    gemm(g, torch.empty(768, 3072, dtype=bf16).t(), torch.empty(4096, 3072, dtype=bf16),
         Epilogue(row_scale=torch.empty(4096, dtype=f32), act_grad=GELU, aux=torch.empty(4096, 3072, dtype=bf16),
                  row_dot=torch.empty(4096, 3072, dtype=bf16)),
         row_sum=True, row_sum_weight=torch.empty(768, dtype=f32), a_copy=torch.empty(4096, 768, dtype=bf16))
    for M, N, K in ((197, 1000, 768), (8, 21843, 768), (3152, 768, 588), (197, 100, 192), (1, 1000, 768)):
        a, b, out = _case_tensors(M, N, K, bf16)
        gemm(a, b, out, Epilogue(bias=torch.empty(N, dtype=bf16), activation=GELU_TANH))
    a, b, out = _case_tensors(197, 192, 192, f32)
    gemm(a, b, out, Epilogue(bias=torch.empty(192, dtype=f32)))
    # OpenAI CLIP's fc1 (QuickGELU, its pre-activation stored) and its dU GEMM
    a, b, out = _case_tensors(4096, 3072, 768, bf16)
    gemm(a, b, out, Epilogue(bias=torch.empty(3072, dtype=bf16), activation=QUICK_GELU, pre=torch.empty_like(out)))
    gemm(a, torch.empty(768, 3072, dtype=bf16).t(), out,
         Epilogue(row_scale=torch.empty(4096, dtype=f32), act_grad=QUICK_GELU, aux=torch.empty_like(out)))
    # the SwiGLU MLP: the forward GEMM (every config), ragged shapes through the table's choice, the
    # dH GEMM's gradient epilogue (16-bit, the fp32 residual stream with drop path), the elementwise
    # gate backward
    _swiglu_cases(full=False)
    for M, H, K, dtype in ((197, 200, 72, bf16), (1, 1000, 80, bf16), (197, 200, 72, f32), (4096, 1365, 80, f32)):
        x = torch.empty(M, K, dtype=dtype)
        swiglu_gemm(x, torch.empty(H, K, dtype=dtype), torch.empty(H, K, dtype=dtype), torch.empty(M, H, dtype=dtype))
    for dtype in (bf16, torch.float16):
        _swiglu_dh_case(dtype)
    _swiglu_dh_case(bf16, grad_dtype=f32, drop_path=True)
    _swiglu_dh_case(f32, drop_path=True)
    for dtype in (bf16, f32):
        swiglu_bwd(torch.empty(4096, 4096, dtype=dtype), torch.empty(4096, 8192, dtype=bf16), bf16)
    for act in (GELU, GELU_TANH, QUICK_GELU):
        for dtype in (bf16, f32):
            g = torch.empty(4096, 3072, dtype=dtype)
            act_bwd(g, torch.empty(4096, 3072, dtype=bf16), act, bf16, col_scale=torch.empty(3072, dtype=bf16),
                    row_scale=torch.empty(4096, dtype=f32), want_dscale=True, want_drow=True)
    act_bwd(torch.empty(4096, 3072, dtype=bf16), torch.empty(4096, 3072, dtype=bf16), GELU, bf16)


@compile_cases(slow=True)
def _gemm_all_config_kinds():
    """The rest of the table: every config with the bare-product and dU / dH epilogues it serves,
    every SwiGLU forward config at the ragged shapes."""
    _config_cases(("none", "act_grad"))
    _swiglu_cases(full=True)


@compile_cases(slow=True)
def _gemm_bench_cases():
    """Benchmark shapes: ViT-B / ViT-L blocks at batch 64 (M = 12608), forward and backward."""
    bf16 = torch.bfloat16
    for D in (768, 1024):
        M, H = 197 * 64, 4 * D
        for N, K in ((3 * D, D), (D, D), (H, D), (D, H)):
            a, b, out = _case_tensors(M, N, K, bf16)
            gemm(a, b, out, Epilogue(bias=torch.empty(N, dtype=bf16)))
            gemm(out, b.t(), torch.empty(M, K, dtype=bf16))                         # dX
            gemm(out.t(), a.t(), torch.empty(N, K, dtype=bf16), row_sum=True)       # dW
