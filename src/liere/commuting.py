"""Commuting rotary encodings: ``R(p) = exp(sum_a p_a A_a)`` with ``A_a A_b = A_b A_a``, so
``R(p)^T R(p') = R(p' - p)`` and attention scores depend on ``p' - p`` only.

=============  ===============================================  ===============================
encoding       generators                                       learnable
=============  ===============================================  ===============================
ComRoPE "ap"   block ``j`` turns with axis ``axis(j)`` only:     heads x blocks x s(s-1)/2
               ``B[a, j] = S_j`` if ``a == axis(j)``, else 0
ComRoPE "ld"   ``B[a, j] = theta[a, j] S_j``                      the above + axes x blocks
CayleySTRING   ``A_a = P^T G_a P``: RoPE-Mixed generators        heads x d(d-1)/2 + RoPE-Mixed
               ``G_a`` in a learned orthogonal basis ``P``
=============  ===============================================  ===============================

ComRoPE: Yu et al., "ComRoPE: Scalable and Robust Rotary Position Embedding Parameterized by
Trainable Commuting Angle Matrices", CVPR 2025 (arXiv 2506.03737). STRING: Schenck et al.,
"Learning the RoPEs: Better 2D and 3D Position Encodings with STRING", ICML 2025.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import functional as F
from . import ops
from .encodings import (
    BlockRotaryEncoding,
    MixedRoPE,
    RotaryEncoding,
    Rotation,
    _as_dtype,
    _check_positive_int,
    _device_of,
    _rope_generators,
)
from .precision import exact_dtype

__all__ = ["ComRoPE", "CayleySTRING"]

VARIANTS = ("ap", "ld")


class ComRoPE(BlockRotaryEncoding):
    """ComRoPE (Yu et al., CVPR 2025): ``R(p) = exp(sum_a p_a B_a)`` with pairwise commuting,
    block-diagonal skew-symmetric ``B_a``, so scores depend on ``p' - p`` only.

    Block ``j`` of every head holds one learned skew matrix ``S_j = U_j - U_j^T``:

    - ``variant="ap"`` (axis-partitioned): the ``head_dim // block_size`` blocks are split into
      ``num_axes`` contiguous groups, and group ``a`` turns with axis ``a`` only:
      ``R_j(p) = exp(p_{axis(j)} S_j)``. ``head_dim`` must be divisible by
      ``num_axes * block_size``.
    - ``variant="ld"`` (linearly dependent): every axis scales the same block,
      ``R_j(p) = exp((sum_a theta[a, j] p_a) S_j)``, with one multiplier per axis and block
      shared by the heads (as in the official code: one ``theta`` per axis only would make
      every block see the same direction ``theta . p``).

    Both commute: within a block every axis uses a multiple of the same ``S_j``.

    Args:
        head_dim: channels per head.
        num_axes: coordinate axes.
        num_heads: one set of blocks per head; 1 shares one set across heads.
        block_size: size of the diagonal blocks; must divide ``head_dim`` (and for "ap",
            ``head_dim // num_axes``).
        variant: ``"ap"`` or ``"ld"``.
        init_std: ``S_j = P - P^T`` with ``P ~ N(0, init_std^2)`` entrywise (the official
            code's init, 1.0); ``theta ~ N(0, 1)``.

    Learned parameters:
        weight: ``(num_heads, head_dim // block_size, s * (s - 1) // 2)``, the strictly
        upper-triangular entries of every ``S_j``; ``theta`` (ld only): ``(num_axes, blocks)``.

    Shape:
        q, k ``(b, h, n, d)``, positions ``(n, a)`` or ``(b, n, a)`` -> ``(b, h, n, d)`` each
    """

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        *,
        num_heads: int = 1,
        block_size: int = 8,
        variant: str = "ap",
        init_std: float = 1.0,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(head_dim, num_axes, num_heads)
        _check_positive_int(block_size, "block_size", minimum=2)
        if variant not in VARIANTS:
            raise ValueError(f"ComRoPE variant must be 'ap' or 'ld'; got {variant!r}.")
        if head_dim % block_size:
            raise ValueError(
                f"ComRoPE: block_size must divide head_dim; got block_size={block_size} for "
                f"head_dim={head_dim}."
            )
        blocks = head_dim // block_size
        if variant == "ap" and blocks % num_axes:
            raise ValueError(
                f"ComRoPE(variant='ap') gives each of the {num_axes} axes its own group of "
                f"blocks, so head_dim must be divisible by num_axes * block_size = "
                f"{num_axes * block_size}; got head_dim={head_dim} ({blocks} blocks of "
                f"{block_size}). Use a block_size dividing {head_dim // num_axes}, or "
                f"variant='ld'."
                if head_dim % num_axes == 0
                else f"ComRoPE(variant='ap') needs head_dim divisible by num_axes * block_size "
                f"= {num_axes * block_size}; got head_dim={head_dim}."
            )
        self.block_size = block_size
        self.num_blocks = blocks
        self.variant = variant
        self.init_std = float(init_std)
        self.exp_method = "auto"
        self.reorthogonalize_above: Optional[float] = F.REORTHOGONALIZE_ABOVE
        entries = block_size * (block_size - 1) // 2
        self._upper_index = F.upper_triangle_index(block_size, _device_of(device))
        self.weight = nn.Parameter(
            torch.empty(num_heads, blocks, entries, device=device, dtype=dtype)
        )
        self.theta: Optional[nn.Parameter] = None
        if variant == "ld":
            self.theta = nn.Parameter(torch.empty(num_axes, blocks, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # entries of P - P^T with P ~ N(0, std^2) are N(0, 2 std^2)
            self.weight.normal_(0.0, self.init_std * math.sqrt(2.0))
            if self.theta is not None:
                self.theta.normal_(0.0, 1.0)

    def axis_of_block(self) -> list[int]:
        """For ``"ap"``: the axis each block turns with (contiguous groups, axis 0 first)."""
        per_axis = self.num_blocks // self.num_axes
        return [j // per_axis for j in range(self.num_blocks)]

    def _skews(self, weight: Tensor) -> Tensor:
        return F.skew_symmetric(weight, self.block_size, index=self._upper_index)  # (h, m, s, s)

    def bases(self) -> Tensor:
        """The blocks ``B[h, a, j]`` of every generator (zeros where an "ap" block ignores an
        axis).

        Shape:
            ``(num_heads, num_axes, head_dim // block_size, block_size, block_size)``
        """
        skews = self._skews(self.weight)
        return self._bases_from(skews, self.theta)

    def _bases_from(self, skews: Tensor, theta: Optional[Tensor]) -> Tensor:
        h, m, s, _ = skews.shape
        if theta is not None:  # ld: B[h, a, j] = theta[a, j] S[h, j]
            return theta.view(1, self.num_axes, m, 1, 1) * skews.unsqueeze(1)
        # built on the device from shapes alone (no list index: a host-to-device copy)
        per_axis = self.num_blocks // self.num_axes
        axes = torch.arange(self.num_axes, device=skews.device).unsqueeze(1)
        blocks = torch.arange(m, device=skews.device).unsqueeze(0)
        mask = (blocks // per_axis == axes).to(skews.dtype)  # (a, m): the axis of each block
        return mask.view(1, self.num_axes, m, 1, 1) * skews.unsqueeze(1)

    def _rotations(self, positions: Tensor) -> Rotation:
        # LieRE's fast path on the structured bases. Measured, not kept: an eigenbasis path
        # (RoPE in the basis of each S_j, no per-token exponential) ran 1.41x AxialRoPE against
        # 1.12x, and one one-axis call per "ap" group 39.7 against 38.8 ms (docs/encodings.md).
        skews = self._skews(_as_dtype(self.weight, positions.dtype))
        theta = None if self.theta is None else _as_dtype(self.theta, positions.dtype)
        return ops.block_rotations(
            positions,
            self._bases_from(skews, theta),
            method=self.exp_method,
            reorthogonalize_above=self.reorthogonalize_above,
            check_finite=self.check_finite,
        )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "weight")
        if isinstance(saved, Tensor) and saved.shape != self.weight.shape:
            args[-1].append(
                f"ComRoPE checkpoint {prefix + 'weight'!r} has shape {tuple(saved.shape)} "
                f"(num_heads, blocks, entries), but this module has {tuple(self.weight.shape)} "
                f"(num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}): build it with the checkpoint's configuration."
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> ComRoPE:
        out = super()._apply(fn, *args, **kwargs)
        self._upper_index = F.upper_triangle_index(self.block_size, self.weight.device)
        return out  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_axes={self.num_axes}, num_heads={self.num_heads}, "
            f"block_size={self.block_size}, variant={self.variant!r}"
        )


class CayleySTRING(MixedRoPE):
    """Cayley-STRING (Schenck et al., ICML 2025): ``R(p) = P^T RoPE(p) P``.

    ``RoPE(p)`` is RoPE-Mixed (``MixedRoPE``: pair ``k`` turns by ``sum_a p_a f[h, a, k]``) and
    ``P = (I - S)(I + S)^-1`` the Cayley transform of a learned skew-symmetric ``S``, an
    orthogonal matrix (per head, or shared). The generators ``A_a = P^T G_a P`` commute, so
    scores depend on ``p' - p`` only; no per-token exponential is needed: each token is
    rotated into the basis ``P``, turned pairwise, and rotated back.

    Args:
        head_dim: even channel count per head.
        num_axes: coordinate axes.
        num_heads: one ``S`` and one frequency table per head; 1 shares them across heads.
        max_freq, base: initial frequency range (see ``AxialRoPE``).
        init_std: ``S``'s upper entries ~ ``N(0, init_std^2)``; 0 starts at ``P = I``
            (RoPE-Mixed).

    Learned parameters:
        freqs: ``(num_heads, num_axes, head_dim // 2)`` (RoPE-Mixed's); weight:
        ``(num_heads, d * (d - 1) // 2)``, the strictly upper-triangular entries of ``S``.

    Shape:
        q, k ``(b, h, n, d)``, positions ``(n, a)`` or ``(b, n, a)`` -> ``(b, h, n, d)`` each
    """

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        *,
        num_heads: int = 1,
        max_freq: float = 16.0,
        base: float = 100.0,
        init_std: float = 0.1,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            head_dim,
            num_axes,
            num_heads=num_heads,
            max_freq=max_freq,
            base=base,
            device=device,
            dtype=dtype,
        )
        self.init_std = float(init_std)
        self._upper_index = F.upper_triangle_index(head_dim, _device_of(device))
        self.weight = nn.Parameter(
            torch.empty(num_heads, head_dim * (head_dim - 1) // 2, device=device, dtype=dtype)
        )
        self._reset_basis()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "weight" in self._parameters:  # not yet while MixedRoPE's __init__ runs
            self._reset_basis()

    def _reset_basis(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)

    def basis(self) -> Tensor:
        """``P = (I - S)(I + S)^-1``, orthogonal (the Cayley transform of skew ``S``).

        Shape:
            ``(num_heads, head_dim, head_dim)``
        """
        return self._basis(self.weight)

    def _basis(self, weight: Tensor) -> Tensor:
        # Note [matmul precision]: solve's backward multiplies matrices; float64 where float32
        # matmuls are reduced (or while tracing)
        work = exact_dtype(weight.dtype, weight.device, tracing=F.is_tracing())
        skew = F.skew_symmetric(weight.to(work), self.head_dim, index=self._upper_index)
        eye = torch.eye(self.head_dim, dtype=skew.dtype, device=skew.device)
        # (I + S)^-1 (I - S) = (I - S)(I + S)^-1: both are polynomials in S
        return torch.linalg.solve(eye + skew, eye - skew).to(weight.dtype)

    def generators(self) -> Tensor:
        """``A_a = P^T G_a P`` with ``G_a`` RoPE-Mixed's dense generators.

        Shape:
            ``(num_heads, num_axes, head_dim, head_dim)``
        """
        basis = self.basis().unsqueeze(1)  # (h, 1, d, d)
        dense = basis.mT @ _rope_generators(self.freqs) @ basis
        return (dense - dense.mT) / 2  # the same matrix, exactly skew-symmetric in floats

    def _rotations(self, positions: Tensor) -> Rotation:
        cos, sin = super()._rotations(positions)
        return cos, sin, self._basis(_as_dtype(self.weight, positions.dtype))

    def _rotate(self, x: Tensor, rotation: Rotation) -> Tensor:
        cos, sin, basis = rotation  # basis (h | 1, d, d) broadcasts over x's (b, h) dims
        # Note [matmul precision]: the products with P in float64 where float32 matmuls are
        # reduced (or cannot be checked, while tracing); RoPE itself is elementwise
        work = exact_dtype(x.dtype, x.device, tracing=F.is_tracing())
        xw, pw = x.to(work), basis.to(work)
        # x' = P^T RoPE(p) P x, row vectors: ((x P^T) turned) P
        turned = ops.rope(torch.matmul(xw, pw.mT), cos.to(work), sin.to(work))
        return torch.matmul(turned, pw).to(x.dtype)

    def _rotate_pair(
        self, q: Tensor, k: Tensor, rotation: Rotation, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        # the basis change comes first: rotate q and k one by one (RotaryEncoding's way), not
        # RoPE's fused pair
        return RotaryEncoding._rotate_pair(self, q, k, rotation, num_prefix_tokens)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CayleySTRING:
        out = super()._apply(fn, *args, **kwargs)
        self._upper_index = F.upper_triangle_index(self.head_dim, self.weight.device)
        return out  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init_std={self.init_std}"
