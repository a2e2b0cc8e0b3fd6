"""The GEMM core's static compile cases: every config, every epilogue variant once, the benchmark
shapes (``python -m vitkern.testing.compile_check vitkern.ops.gemm``)."""

import torch

from vitkern.ops._config import device_arch
from vitkern.testing.compile_check import compile_cases
from vitkern.ops.activation import Activation
from vitkern.ops.gemm.configs import GEMM_CONFIGS, config_kinds
from vitkern.ops.gemm.epilogue import Epilogue
from vitkern.ops.gemm.launch import act_bwd, gemm

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
    else:
        raise ValueError(kind)


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
    # every config with the fc1, fc2 / proj, dW and qkv epilogues it serves
    _config_cases(("act", "residual", "scale", "bias"))
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
    for act in (GELU, GELU_TANH, QUICK_GELU):
        for dtype in (bf16, f32):
            g = torch.empty(4096, 3072, dtype=dtype)
            act_bwd(g, torch.empty(4096, 3072, dtype=bf16), act, bf16, col_scale=torch.empty(3072, dtype=bf16),
                    row_scale=torch.empty(4096, dtype=f32), want_dscale=True, want_drow=True)
    act_bwd(torch.empty(4096, 3072, dtype=bf16), torch.empty(4096, 3072, dtype=bf16), GELU, bf16)


@compile_cases(slow=True)
def _gemm_all_config_kinds():
    """The rest of the table: every config with the bare-product and dU epilogues it serves."""
    _config_cases(("none", "act_grad"))


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
