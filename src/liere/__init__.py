"""liere: LieRE and rotary position encodings as drop-in PyTorch modules.

q, k = encoding(q, k, positions)   # q, k: (b, h, n, d); positions: (n, a) or (b, n, a)
"""

import importlib
from typing import Any

from . import functional
from .attention import RotaryAttention
from .commuting import CayleySTRING, ComRoPE
from .encodings import AxialRoPE, LieRE, MixedRoPE, RotaryEncoding
from .positions import augment_positions, grid_positions

__version__ = "0.1.0"

# Submodules reachable as attributes after ``import liere``, imported on first use: models and
# testing pull in more of the library, viz plots with matplotlib (imported only inside its plot
# functions), integrations need their frameworks.
_LAZY_SUBMODULES = ("models", "testing", "viz", "integrations", "kernels", "tasks", "experiments")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "AxialRoPE",
    "CayleySTRING",
    "ComRoPE",
    "LieRE",
    "MixedRoPE",
    "RotaryAttention",
    "RotaryEncoding",
    "functional",
    "augment_positions",
    "grid_positions",
]
