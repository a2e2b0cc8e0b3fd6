"""One autograd plumbing for the registered ops of every backend (Triton and the CUDA extension).

A backend's forward op is a registered ``torch.library`` op (``vitkern::`` or ``vitkern_cuda::``);
its gradient formula is two plain functions, the protocol here:

    save(inputs, outputs) -> (tensors, state)
        what backward needs: tensors (kept with ``save_for_backward``) and any other state
        (activation, precision flags), from the forward op's inputs and outputs.
    backward(state, tensors, grads, need) -> one gradient (or None) per forward input
        ``need[i]``: input ``i`` is a tensor that needs its gradient (``ctx.needs_input_grad``
        and "was given": never true for a None optional input).

:func:`autograd_hooks` turns the two into ``setup_context`` / ``backward``: it computes ``need``,
skips ``backward`` when nothing needs a gradient and drops the gradients not asked for, once for
every op. :func:`kernel_op` registers a Triton backend's op with its fake and that autograd (the
forward op; its backward op without autograd), :func:`register_autograd` adds it to an op declared
elsewhere (the extension's ops, declared in :mod:`vitkern._extension`). Each ``backward`` should
itself call a registered op, so that torch.compile sees one opaque kernel in the backward graph
too.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch


__all__ = ["Save", "Backward", "autograd_hooks", "kernel_op", "register_autograd", "fill_outputs", "requires_grad"]

Save = Callable[[tuple, Any], tuple[tuple[Optional[torch.Tensor], ...], Any]]
Backward = Callable[[Any, tuple, tuple, tuple[bool, ...]], Sequence[Optional[torch.Tensor]]]


def autograd_hooks(save: Save, backward: Backward, non_differentiable: Sequence[int] = ()
                   ) -> tuple[Callable, Callable]:
    """``(setup_context, backward)`` for ``register_autograd`` from the protocol's two functions;
    ``non_differentiable``: indices of outputs that are marked so (saved statistics)."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.given = tuple(isinstance(x, torch.Tensor) for x in inputs)
        tensors, ctx.state = save(inputs, output)
        ctx.save_for_backward(*tensors)
        if non_differentiable:
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))

    def _backward(ctx, *grads):
        need = tuple(bool(n) and g for n, g in zip(ctx.needs_input_grad, ctx.given))
        if not any(need):
            return (None,) * len(need)
        out = backward(ctx.state, ctx.saved_tensors, grads, need)
        return tuple(g if n else None for g, n in zip(out, need))

    return setup_context, _backward


def kernel_op(qualname: str, *, fake: Callable, save: Optional[Save] = None,
              backward: Optional[Backward] = None, non_differentiable: Sequence[int] = ()) -> Callable:
    """Register the decorated function as the ``torch.library`` custom op ``qualname`` with its
    fake, and, given ``save`` / ``backward``, its autograd (:func:`autograd_hooks`)::

        @kernel_op("vitkern::layer_norm_fwd", fake=_fwd_fake, save=_save, backward=_backward,
                   non_differentiable=(1, 2))
        def _layer_norm_fwd_op(x: Tensor, weight: Optional[Tensor], ...) -> tuple[Tensor, Tensor, Tensor]:
            ...

    Rules (``torch.library.custom_op``): outputs never alias inputs, and an op returns a tuple
    rather than an Optional tensor. ``custom_op`` is used rather than ``triton_op`` because the
    latter's fake tracing runs the kernel under TRITON_INTERPRET=1 and breaks torch.compile on the
    CPU. A backward op is registered with this too, without ``save`` / ``backward``.
    """
    if "::" not in qualname:
        raise ValueError(f"kernel_op needs a namespaced name like 'vitkern::op', got {qualname!r}")
    if (save is None) != (backward is None):
        raise ValueError("kernel_op: give both save and backward, or neither")

    def decorate(fn: Callable):
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fake)
        if save is not None:
            setup_context, _backward = autograd_hooks(save, backward, non_differentiable)
            op.register_autograd(_backward, setup_context=setup_context)
        return op

    return decorate


def register_autograd(qualname: str, *, save: Save, backward: Backward) -> None:
    """Register the autograd formula of the already defined op ``qualname`` (see the module docstring)."""
    setup_context, _backward = autograd_hooks(save, backward)
    torch.library.register_autograd(qualname, _backward, setup_context=setup_context)


def fill_outputs(outputs: Sequence[Optional[torch.Tensor]], fakes: Sequence[torch.Tensor]) -> tuple:
    """A backward op's results with an empty tensor (its fake's) for each gradient not computed:
    registered ops return tensors, never None."""
    return tuple(o if o is not None else torch.empty_like(f) for o, f in zip(outputs, fakes))


def requires_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a call on ``tensors``: what decides if a forward saves for backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
