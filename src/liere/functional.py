"""The speed layer's tensor maths: fast ``x' = exp(sum_a p_a A_a) x`` (the definition, the
reference path and the notation are in ``liere.definition``, re-exported here).

Axis letters used in every ``Shape:`` section: ``b`` batch, ``h`` heads, ``n`` tokens,
``d`` head_dim, ``a`` position axes, ``m`` blocks per head (``d // s``), ``s`` block size,
``k`` rotary pairs (``d // 2``).

Nothing here owns parameters; the modules in ``liere.encodings`` call these functions.
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
]


from .speed.blockwise import (  # noqa: F401
    _apply_few,
    _blockwise_pair_plain,
    _BlockwisePair,
    _gather_blocks,
    _scatter_blocks,
    apply_blockwise,
    apply_blockwise_pair,
)
from .speed.device import lie_rotations_generic, max_levels  # noqa: F401
from .speed.extrapolation import (  # noqa: F401
    _REORTHOGONALIZE_CHUNK,
    LARGE_NORM,
    REORTHOGONALIZE_ABOVE,
    _squarings_for,
    _warn_if_inaccurate,
    expm_skew,
    reorthogonalize,
    rotation_error_bound,
    squarings_for,
)
from .speed.polynomial import (  # noqa: F401
    _POLY,
    _POLY_MAX_AXES,
    _level_offsets,
    _monomial_table,
    _poly_coefficients,
    _poly_coefficients_plain,
    _poly_weights,
    _PolyCoefficients,
    _series_product_plain,
    _SeriesProduct,
    _stack_axes,
    _uses_polynomial,
)
from .speed.rays import (  # noqa: F401
    _RAY_MAX_INDEX,
    _RAY_PLAN_CACHE,
    _RAY_PLAN_CACHE_SIZE,
    _RAY_PLAN_LOCK,
    _build_ray_plan,
    _KernelRotations,
    _ray_plan,
    _ray_products_plain,
    _RayPlan,
    _RayProducts,
)
from .speed.rotations import (  # noqa: F401
    FEW_TOKENS,
    _direct_rotations,
    _fast_rotations,
    _few_token_rotations,
    lie_rotations,
)
from .speed.taylor import (  # noqa: F401
    _ENTRY_MAJOR_CHUNK,
    _ENTRY_MAJOR_MAX_BLOCK,
    _PS_TABLES,
    _TAYLOR,
    _as_batch_major,
    _batch_mm,
    _entry_major_mm,
    _exp_by_squaring,
    _layout,
    _Squarings,
    _squarings_plain,
    _taylor_autograd,
    _taylor_expm_squared,
    _taylor_series,
    _TaylorSeries,
    _token_slicer,
    compute_dtype,
)
from .speed.token_squarings import (  # noqa: F401
    _KernelSquarings,
    _spectral_norms,
    _squaring_levels,
    _TakeTokens,
    _token_squarings,
    _token_squarings_plain,
)
from .speed.tracing import (  # noqa: F401
    _TRACING_CHECKS,
    _tracing_checks,
    is_tracing,
)
