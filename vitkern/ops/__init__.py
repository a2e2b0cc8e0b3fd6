"""One package per op (``attention``, ``layer_norm``, ``linear``, ``mlp``, ``patch_embed``,
``pos_resample``, ``qk_prologue``, ``swiglu``), its
layers as files: ``reference.py`` (``<op>_ref``, the differentiable pure-PyTorch reference),
``native.py`` (the "torch" backend: the PyTorch-native fast path in the compute dtype),
``configs.py``, the ``@triton.jit`` kernels, ``launch.py``, ``op.py`` (registered custom ops,
fakes, autograd), ``cuda.py`` (the extension's backend) and ``compile_cases.py``; the public
function is in the package's ``__init__``. ``gemm`` is the GEMM core four of them share; the
modules with a leading underscore are the machinery every op uses (docs/design.md, "Layout")."""
