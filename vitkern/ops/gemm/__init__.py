"""The GEMM core that linear, mlp and patch_embed share: one Triton kernel with a composable fp32
epilogue, its configs and its launcher.

- ``configs.py``: the named tiles and the rules that pick one (:func:`select_config`);
- ``epilogue.py``: :class:`Epilogue`, a GEMM's choice of epilogue steps (no Triton import);
- ``epilogue_steps.py``: the steps themselves (``@triton.jit``);
- ``kernels.py``: the GEMM kernel and the elementwise activation backward;
- ``launch.py``: :func:`gemm` and :func:`act_bwd`;
- ``compile_cases.py``: the static compile cases.

No public function: the ops' launchers build an :class:`Epilogue` and call
:func:`vitkern.ops.gemm.launch.gemm`. Importing this package does not import Triton.
"""

from vitkern.ops.gemm.configs import GEMM_CONFIGS, GEMM_RULES, GemmConfig, dot_precision, select_config
from vitkern.ops.gemm.epilogue import Epilogue

__all__ = [
    "Epilogue",
    "GemmConfig",
    "GEMM_CONFIGS",
    "GEMM_RULES",
    "select_config",
    "dot_precision",
]
