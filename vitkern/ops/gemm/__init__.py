"""The GEMM core that linear, mlp and patch_embed share: one Triton kernel with a composable fp32
epilogue, its configs and its launcher.

- ``configs.py``: the named tiles, the table that picks one (:func:`select_config`) and the
  launch plan (:func:`plan_gemm`: split-K choice, persistent grid, predicted SM use);
- ``epilogue.py``: :class:`Epilogue`, a GEMM's choice of epilogue steps (no Triton import);
- ``epilogue_steps.py``: the steps themselves (``@triton.jit``);
- ``kernels.py``: the GEMM kernel, the elementwise activation backward, the SwiGLU GEMM (gate
  and value accumulators a tile) and the SwiGLU gate's elementwise backward;
- ``launch.py``: :func:`gemm`, :func:`act_bwd`, :func:`swiglu_gemm` and :func:`swiglu_bwd`;
- ``compile_cases.py``: the static compile cases.

No public function: the ops' launchers build an :class:`Epilogue` and call
:func:`vitkern.ops.gemm.launch.gemm`. Importing this package does not import Triton.
"""

from vitkern.ops.gemm.configs import (
    EPILOGUE_KINDS,
    GEMM_CONFIGS,
    GEMM_RULES,
    WIDE_FALLBACK,
    GemmConfig,
    GemmPlan,
    choose_split_k,
    config_kinds,
    dot_precision,
    plan_gemm,
    select_config,
    wide_stand_in,
    select_swiglu_config,
    sm_use,
    SWIGLU_CONFIGS,
)
from vitkern.ops.gemm.epilogue import Epilogue

__all__ = [
    "EPILOGUE_KINDS",
    "Epilogue",
    "GemmConfig",
    "GemmPlan",
    "GEMM_CONFIGS",
    "GEMM_RULES",
    "WIDE_FALLBACK",
    "choose_split_k",
    "config_kinds",
    "dot_precision",
    "plan_gemm",
    "select_config",
    "wide_stand_in",
    "select_swiglu_config",
    "sm_use",
    "SWIGLU_CONFIGS",
]
