"""Attention's "torch" backend: torch's own ``scaled_dot_product_attention``, the PyTorch-native fast
path that "auto" measures the kernels against.

It computes in the inputs' dtype with whichever SDPA kernel torch picks (flash, memory-efficient,
cuDNN or math on CUDA; flash or math on the CPU), differentiable through torch's autograd. The
function called is ``_torch_sdpa`` of :mod:`vitkern.ops.attention.sdpa`, the builtin saved at
import, never ``F.scaled_dot_product_attention``: that one may be patched to vitkern's drop-in,
which would route the call back here.

How the op's arguments map onto SDPA:

- grouped-query attention (``Hkv < H``): ``enable_gqa=True``; ``causal``: ``is_causal`` (top-left
  aligned, as the op's convention).
- ``key_padding_bias`` (float32, ``(B or 1, H or 1, Tk)``): an additive ``attn_mask`` of shape
  ``(B or 1, H or 1, 1, Tk)`` in the query dtype, broadcast by SDPA over the queries (a float mask
  keeps the memory-efficient and cuDNN kernels eligible; a bool mask could not carry finite
  biases). Rows whose keys are all masked (-inf after the cast) get output 0, as the op's
  convention, on every SDPA kernel: their mask entries are replaced by 0 before the call (so no
  kernel sees an all -inf row, which some turn into NaN) and their output is zeroed after it,
  which also makes their gradients exactly 0. With ``causal`` too, the causal mask is folded into
  the bias as a ``(Tq, Tk)`` mask per (batch, head) of the bias (SDPA takes one or the other).
- ``return_lse``: torch's public SDPA does not return the logsumexp, so the ``supports``
  predicates refuse it: "auto" skips this backend, an explicit ``use_backend("torch")`` raises
  :class:`vitkern.BackendUnavailableError`.
- ``deterministic``: not passed on (SDPA has no such argument); the reproducibility of the
  backward is torch's, under ``torch.use_deterministic_algorithms``.

:data:`SDPA_BACKENDS` pins which of torch's SDPA kernels may run.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitkern.ops.attention.sdpa import _torch_sdpa

__all__ = [
    "SDPA_BACKENDS",
    "attention_torch",
    "attention_qkvpacked_torch",
    "attention_torch_supports",
    "attention_qkvpacked_torch_supports",
    "attention_varlen_torch",
    "attention_qkvpacked_varlen_torch",
    "attention_varlen_torch_supports",
    "attention_qkvpacked_varlen_torch_supports",
]

# None: torch picks the SDPA kernel. Otherwise a sequence of torch.nn.attention.SDPBackend members
# (e.g. [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]): each call runs inside
# torch.nn.attention.sdpa_kernel(SDPA_BACKENDS), so only those kernels are eligible (torch raises
# when none of them can serve a call). A module global: set it as
# ``vitkern.ops.attention.native.SDPA_BACKENDS = [...]``.
SDPA_BACKENDS: Optional[Sequence[SDPBackend]] = None

_LSE_REASON = (
    "return_lse needs the logsumexp, which torch's scaled_dot_product_attention does not return "
    "(use the 'triton' or 'reference' backend)"
)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
          scale: Optional[float]) -> torch.Tensor:
    """torch's SDPA on ``(B, H, T, D)`` inputs, GQA through ``enable_gqa``, under :data:`SDPA_BACKENDS`."""
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    if SDPA_BACKENDS is None:
        return _torch_sdpa(q, k, v, **kwargs)
    with sdpa_kernel(list(SDPA_BACKENDS)):
        return _torch_sdpa(q, k, v, **kwargs)


def _padding_mask(key_padding_bias: torch.Tensor, q: torch.Tensor, tk: int, causal: bool):
    """``(attn_mask, empty)``: the SDPA mask in the query dtype with every fully masked row set to
    0, and the bool ``(B or 1, H or 1, Tq or 1, 1)`` marking those rows."""
    mask = key_padding_bias.to(q.dtype).unsqueeze(-2)  # (B or 1, H or 1, 1, Tk)
    if causal:
        visible = torch.ones(q.shape[2], tk, dtype=torch.bool, device=q.device).tril()
        mask = mask.masked_fill(~visible, float("-inf"))  # (B or 1, H or 1, Tq, Tk)
    empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
    return mask.masked_fill(empty, 0.0), empty


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    key_padding_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Op ``"attention"`` on torch's SDPA: ``(B, H, Tq, D)`` out in q's dtype (``return_lse`` is
    refused by :func:`attention_torch_supports`; ``deterministic`` is torch's business)."""
    if return_lse:
        raise ValueError(_LSE_REASON)
    if key_padding_bias is None:
        return _sdpa(q, k, v, None, causal, scale)
    mask, empty = _padding_mask(key_padding_bias, q, k.shape[2], causal)
    out = _sdpa(q, k, v, mask, False, scale)
    return out.masked_fill(empty, 0.0)


def attention_qkvpacked_torch(
    qkv: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> torch.Tensor:
    """Op ``"attention_qkvpacked"`` on torch's SDPA: ``(B, T, 3, H, D)`` in, ``(B, T, H, D)``
    (contiguous) out, as timm runs it (unbind, transpose to ``(B, H, T, D)``, SDPA, transpose back)."""
    if return_lse:
        raise ValueError(_LSE_REASON)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return _sdpa(q, k, v, None, causal, scale).transpose(1, 2).contiguous()


def attention_torch_supports(q, k, v, *, return_lse=False, **_) -> Optional[str]:
    return _LSE_REASON if return_lse else None


def attention_qkvpacked_torch_supports(qkv, *, return_lse=False, **_) -> Optional[str]:
    return _LSE_REASON if return_lse else None


# --------------------------------------------------------------------------------------------
# Packed (variable-length) sequences
# --------------------------------------------------------------------------------------------
# torch's own varlen path, torch.nn.attention.varlen.varlen_attn (torch >= 2.10; flash / cuDNN,
# CUDA, fp16 / bf16), needs max_seqlen as python ints and aligns a causal mask bottom-right when a
# sequence has fewer queries than keys: it runs where max_seqlen is given, the inputs are CUDA
# fp16 / bf16, and either not causal or q and k share one cu_seqlens (equal lengths, where the two
# alignments agree). Elsewhere each sequence runs through SDPA, which reads cu_seqlens on the host
# (a device sync, and a graph break under torch.compile: the supports predicate refuses that
# while compiling, so "auto" takes the kernels there).

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # torch < 2.10
    _torch_varlen_attn = None
# Its keywords changed between versions: a causal mask is ``window_size=(-1, 0)`` in newer ones,
# ``is_causal=True`` in the first; grouped-query attention needs ``enable_gqa``.
_TORCH_VARLEN_PARAMS = (frozenset(inspect.signature(_torch_varlen_attn).parameters)
                        if _torch_varlen_attn is not None else frozenset())


def _torch_varlen_kwargs(causal: bool, gqa: bool) -> dict:
    kwargs = ({"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in _TORCH_VARLEN_PARAMS
              else {"is_causal": causal})
    if gqa:
        kwargs["enable_gqa"] = True
    return kwargs

_SYNC_REASON = ("the per-sequence SDPA loop reads cu_seqlens on the host, a graph break under torch.compile "
                "(torch's varlen_attn needs CUDA fp16 / bf16 inputs and max_seqlen)")


def _torch_varlen_applies(q, k, cu_q, cu_k, max_q, max_k, causal) -> bool:
    return (_torch_varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and max_q is not None and max_k is not None and (not causal or cu_q is cu_k)
            and (k.shape[1] == q.shape[1] or "enable_gqa" in _TORCH_VARLEN_PARAMS))


def _varlen_sdpa_loop(q, k, v, cu_q, cu_k, causal, scale):
    """Each packed sequence through torch's SDPA, as a per-image loop over a mixed batch runs it."""
    outs = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if k1 == k0 or q1 == q0:
            outs.append(torch.zeros_like(q[q0:q1]))
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        outs.append(_sdpa(qs, ks, vs, None, causal, scale)[0].transpose(0, 1))
    return torch.cat(outs, 0) if outs else torch.empty_like(q)


def attention_varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
                           causal=False, scale=None, return_lse=False) -> torch.Tensor:
    """Op ``"attention_varlen"`` on torch: ``varlen_attn`` where it applies, else a per-sequence
    SDPA loop (see above); out ``(total_q, H, D)`` in q's dtype."""
    if return_lse:
        raise ValueError(_LSE_REASON)
    if _torch_varlen_applies(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        return _torch_varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                                  **_torch_varlen_kwargs(causal, k.shape[1] != q.shape[1]))
    return _varlen_sdpa_loop(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)


def attention_qkvpacked_varlen_torch(qkv, cu_seqlens, *, max_seqlen=None, causal=False, scale=None,
                                     return_lse=False) -> torch.Tensor:
    """Op ``"attention_qkvpacked_varlen"`` on torch: ``(total, 3, H, D)`` in, ``(total, H, D)`` out."""
    q, k, v = qkv.unbind(1)
    return attention_varlen_torch(q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                                  causal=causal, scale=scale, return_lse=return_lse)


def attention_varlen_torch_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
                                    causal=False, return_lse=False, **_) -> list[str]:
    reasons = [_LSE_REASON] if return_lse else []
    if torch.compiler.is_compiling() and not _torch_varlen_applies(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                   max_seqlen_k, causal):
        reasons.append(_SYNC_REASON)
    return reasons


def attention_qkvpacked_varlen_torch_supports(qkv, cu_seqlens, *, max_seqlen=None, causal=False, return_lse=False,
                                              **_) -> list[str]:
    return attention_varlen_torch_supports(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                           max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=causal,
                                           return_lse=return_lse)
