"""liere: LieRE and rotary position encodings as drop-in PyTorch modules.

q, k = encoding(q, k, positions)   # q, k: (b, h, n, d); positions: (n, a) or (b, n, a)
"""

from . import functional
from .attention import RotaryAttention
from .encodings import AxialRoPE, LieRE, MixedRoPE, RotaryEncoding
from .positions import grid_positions

__version__ = "0.1.0"

__all__ = [
    "AxialRoPE",
    "LieRE",
    "MixedRoPE",
    "RotaryAttention",
    "RotaryEncoding",
    "functional",
    "grid_positions",
]
