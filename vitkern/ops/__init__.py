"""One module per op: Triton kernels, launchers, registered custom ops, autograd, the public
function and ``<op>_ref``, the differentiable pure-PyTorch reference."""
