"""The definition: rotary position encodings as the paper writes them, in plain PyTorch.

LieRE (Ostmeier et al., ICML 2025) rotates every query and key by

    ``R(p) = exp(sum_a p_a A_a)``,   ``A_a`` skew-symmetric (``A = U - U^T``),

with ``p`` the token's position (one coordinate per axis ``a``) and ``A_a`` learned, block
diagonal with ``m`` blocks of size ``s`` (``s = d`` is "dense"). Attention then compares
``R(p_i) q_i`` with ``R(p_j) k_j``. RoPE is the case ``s = 2``: each channel pair turns by an
angle ``sum_a p_a f_a``. This file is that maths and nothing else, one function per step:

1. ``skew_symmetric``: the generator blocks from their upper triangles;
2. ``block_generators``: ``G(p) = sum_a p_a A_a`` per token and block;
3. ``expm_skew_reference``: ``R = exp(G)`` by ``torch.linalg.matrix_exp`` (the reference);
4. ``apply_blockwise_reference``: ``x' = R x`` block by block;
5. ``rope_angles`` and ``apply_rope``: the 2x2 case in closed form (cos, sin).

``rotations_reference`` chains 2 and 3. The fast path (``liere.functional``, ``liere.ops``,
``liere.kernels``) computes the same thing faster; it imports this module, never the other way
round, and every fast function is tested against these.

Axis letters used in every ``Shape:`` section: ``b`` batch, ``h`` heads, ``n`` tokens,
``d`` head_dim, ``a`` position axes, ``m`` blocks per head (``d // s``), ``s`` block size,
``k`` rotary pairs (``d // 2``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "upper_triangle_index",
    "skew_symmetric",
    "block_generators",
    "expm_skew_reference",
    "rotations_reference",
    "apply_blockwise_reference",
    "apply_blockwise_exact",
    "rope_angles",
    "apply_rope",
]


def upper_triangle_index(size: int, device: Optional[torch.device] = None) -> Tensor:
    """Flat positions ``row * size + col`` of the strictly upper triangle, row-major (the
    order of ``skew_symmetric``'s parameters).

    Shape:
        ``(size * (size - 1) // 2,)`` (int64)
    """
    rows, cols = torch.triu_indices(size, size, offset=1, device=device)
    return rows * size + cols


def skew_symmetric(params: Tensor, size: int, *, index: Optional[Tensor] = None) -> Tensor:
    """``A = U - U^T`` from the strictly upper-triangular entries of ``U`` (row-major).

    The result is exactly skew-symmetric (``A == -A.mT`` bit for bit). ``index``:
    ``upper_triangle_index(size)`` on ``params``' device, when the caller keeps one.

    Shape:
        params ``(..., size * (size - 1) // 2)`` -> ``(..., size, size)``
    """
    expected = size * (size - 1) // 2
    if params.shape[-1] != expected:
        raise ValueError(
            f"params must end in size*(size-1)/2 = {expected} entries for size {size}; "
            f"got shape {tuple(params.shape)}."
        )
    if index is None:
        index = upper_triangle_index(size, params.device)
    upper = params.new_zeros(*params.shape[:-1], size * size)
    upper.index_copy_(-1, index, params)  # one copy into the flat upper triangle
    square = upper.unflatten(-1, (size, size))
    return square - square.mT


def block_generators(positions: Tensor, bases: Tensor) -> Tensor:
    """``G[.., h, n, m] = sum_a p[.., n, a] * B[h, a, m]``, elementwise over the few axes.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)``
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    h, a, m, s, _ = bases.shape
    flat = bases.reshape(h, 1, a, m * s * s)
    p = positions.unsqueeze(-3)  # (.., 1, n, a)
    # elementwise, axis by axis (Note [matmul precision]: no reduced-precision matmul)
    gen = p[..., 0:1] * flat[:, :, 0]
    for axis in range(1, a):
        gen = gen + p[..., axis : axis + 1] * flat[:, :, axis]
    return gen.unflatten(-1, (m, s, s))


def expm_skew_reference(gen: Tensor) -> Tensor:
    """``torch.linalg.matrix_exp`` over a flattened batch (the reference path).

    Flattening first avoids matrix_exp's "view size is not compatible" failure on batches
    whose dims cannot be merged (permuted or einsum outputs).

    Shape:
        ``(..., s, s)`` -> ``(..., s, s)``
    """
    size = gen.shape[-1]
    return torch.linalg.matrix_exp(gen.reshape(-1, size, size)).reshape(gen.shape)


def rotations_reference(positions: Tensor, bases: Tensor) -> Tensor:
    """``R[.., h, n, m] = exp(sum_a p[.., n, a] B[h, a, m])`` by ``torch.linalg.matrix_exp``.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)``
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    return expm_skew_reference(block_generators(positions, bases))


def apply_blockwise_reference(x: Tensor, rotations: Tensor) -> Tensor:
    """``x'[.., m*s:(m+1)*s] = R[.., m] @ x[.., m*s:(m+1)*s]`` for every block ``m``.

    Shape:
        x ``(b, h, n, d)``; rotations ``(h | 1, n, m, s, s)`` (shared by the batch) or
        ``(b, h | 1, n, m, s, s)`` (per sample), with ``m * s == d`` -> ``(b, h, n, d)``
    """
    m, s = rotations.shape[-3], rotations.shape[-1]
    rot = rotations if rotations.dim() == 6 else rotations.unsqueeze(0)
    out = torch.einsum(
        "bhnmij,bhnmj->bhnmi",
        rot.expand(x.shape[0], x.shape[1], *rot.shape[2:]),
        x.unflatten(-1, (m, s)),
    )
    return out.flatten(-2)


def apply_blockwise_exact(x: Tensor, rotations: Tensor) -> Tensor:
    """``apply_blockwise`` as elementwise products and a sum: no matmul, so no
    matmul-precision setting rounds it (Note [matmul precision]), and an exported graph holds
    only Mul and ReduceSum. Materialises ``(.., d, s)`` products unless compiled (inductor
    fuses them); used for frozen rotations inside traced graphs.

    Shape:
        as ``apply_blockwise``
    """
    m, s = rotations.shape[-3], rotations.shape[-1]
    xb = x.unflatten(-1, (m, s)).unsqueeze(-2)  # (b, h, n, m, 1, s)
    rot = rotations if rotations.dim() == 6 else rotations.unsqueeze(0)
    return (rot * xb).sum(dim=-1).flatten(-2)


def rope_angles(positions: Tensor, freqs: Tensor) -> Tensor:
    """``theta[.., h, n, k] = sum_a p[.., n, a] * f[h, a, k]``.

    Elementwise, axis by axis: no matmul, so no matmul-precision setting can round the angles
    (Note [matmul precision] in ``liere.precision``).

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; freqs ``(h, a, k)``
        -> ``(h, n, k)`` or ``(b, h, n, k)``
    """
    p = positions.unsqueeze(-3)  # (.., 1, n, a)
    f = freqs.unsqueeze(-3)  # (h, 1, a, k)
    angles = p[..., 0:1] * f[..., 0, :]
    for axis in range(1, freqs.shape[-2]):
        angles = angles + p[..., axis : axis + 1] * f[..., axis, :]
    return angles


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent channel pair ``(x[2k], x[2k+1])`` by its angle.

    ``x'[2k] = x[2k] cos - x[2k+1] sin``, ``x'[2k+1] = x[2k] sin + x[2k+1] cos``: the rotation
    ``exp(theta [[0, -1], [1, 0]])``, i.e. a 2x2 LieRE block whose upper entry is ``-theta``.

    Shape:
        x ``(b, h, n, 2k)``; cos, sin broadcastable to ``(b, h, n, k)`` -> ``(b, h, n, 2k)``
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
