"""The speed layer's tensor maths: fast ``x' = exp(sum_a p_a A_a) x`` (the definition, the
reference path and the notation are in ``liere.definition``, re-exported here).

Axis letters used in every ``Shape:`` section: ``b`` batch, ``h`` heads, ``n`` tokens,
``d`` head_dim, ``a`` position axes, ``m`` blocks per head (``d // s``), ``s`` block size,
``k`` rotary pairs (``d // 2``).

Nothing here owns parameters; the modules in ``liere.encodings`` call these functions. The
techniques behind them (``liere.speed``: one module each) keep their own names there, which
their tests import.
"""

from __future__ import annotations

from .definition import (
    apply_blockwise_exact,
    apply_rope,
    block_generators,
    expm_skew_reference,
    rope_angles,
    skew_symmetric,
    upper_triangle_index,
)

__all__ = [
    "skew_symmetric",
    "upper_triangle_index",
    "block_generators",
    "expm_skew",
    "expm_skew_reference",
    "lie_rotations",
    "lie_rotations_generic",
    "squarings_for",
    "reorthogonalize",
    "rotation_error_bound",
    "apply_blockwise",
    "apply_blockwise_pair",
    "rope_angles",
    "apply_rope",
    "compute_dtype",
    "apply_blockwise_exact",
    "is_tracing",
    "max_levels",
    "FEW_TOKENS",
    "LARGE_NORM",
    "REORTHOGONALIZE_ABOVE",
]


from .speed.blockwise import apply_blockwise, apply_blockwise_pair
from .speed.device import lie_rotations_generic, max_levels
from .speed.extrapolation import (
    LARGE_NORM,
    REORTHOGONALIZE_ABOVE,
    expm_skew,
    reorthogonalize,
    rotation_error_bound,
    squarings_for,
)
from .speed.rotations import FEW_TOKENS, lie_rotations
from .speed.taylor import compute_dtype
from .speed.tracing import is_tracing
