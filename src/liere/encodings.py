"""Rotary position encodings behind one protocol: ``q, k = encoding(q, k, positions)``.

Every encoding rotates each query and key by an orthogonal matrix ``R(p)`` that depends on the
token's coordinates ``p`` only: ``q'_i = R(p_i) q_i``, ``k'_j = R(p_j) k_j``, so attention
scores become ``q_i^T R(p_i)^T R(p_j) k_j``. Rotations are built once per call (shared by the
batch when positions are) and applied to both q and k; values are never touched.

=============  ===========================================  ====================================
encoding       R(p)                                         learnable
=============  ===========================================  ====================================
AxialRoPE      2x2 rotations, each pair by one axis         none (fixed frequencies)
MixedRoPE      2x2 rotations by ``sum_a p_a f[h, a, k]``    ``f``: heads x axes x d/2
LieRE          ``exp(sum_a p_a A[h, a])``, A block-skew     heads x axes x (d/s) x s(s-1)/2
=============  ===========================================  ====================================
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import functional as F
from . import ops
from .precision import no_autocast

__all__ = ["RotaryEncoding", "BlockRotaryEncoding", "LieRE", "AxialRoPE", "MixedRoPE"]

Rotation = Union[Tensor, tuple[Tensor, ...]]


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def _rope_magnitudes(count: int, max_freq: float, base: float) -> Tensor:
    """Geometric frequencies ``max_freq * base ** (-i / count)``, i = 0..count-1 (float64)."""
    i = torch.arange(count, dtype=torch.float64)
    return max_freq * base ** (-i / max(count, 1))


def _as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _device_of(device: Optional[Union[torch.device, str]]) -> Optional[torch.device]:
    """The device a module built with ``device=`` lives on, honouring ``with torch.device(..)``."""
    return torch.empty(0, device=device).device


def _significant_bits(dtype: torch.dtype) -> int:
    return 1 - round(math.log2(torch.finfo(dtype).eps))


def _with_prefix(x: Tensor, rotated: Tensor, p: int) -> Tensor:
    """``rotated`` with ``x``'s first ``p`` tokens in front (dim 2)."""
    return rotated if p == 0 else torch.cat((x[:, :, :p], rotated), dim=2)


def _describe(module: nn.Module, shape: tuple[int, ...]) -> str:
    """The configuration a parameter shape implies."""
    if isinstance(module, LieRE):
        h, a, m, entries = shape
        s = int(round((1 + math.sqrt(1 + 8 * entries)) / 2))
        return f"num_heads={h}, num_axes={a}, block_size={s}, head_dim={m * s}"
    h, a, k = shape
    return f"num_heads={h}, num_axes={a}, head_dim={2 * k}"


def _check_checkpoint_shape(
    module: nn.Module, state_dict: Any, key: str, param: Tensor, error_msgs: list[str]
) -> None:
    """Say which configuration a mismatched checkpoint was saved with (PyTorch's own message
    only gives raw shapes)."""
    saved = state_dict.get(key)
    if isinstance(saved, Tensor) and saved.dim() == param.dim() and saved.shape != param.shape:
        error_msgs.append(
            f"{type(module).__name__} checkpoint {key!r} was saved with "
            f"{_describe(module, tuple(saved.shape))}, but this module has "
            f"{_describe(module, tuple(param.shape))}: build the module with the checkpoint's "
            f"configuration."
        )


class RotaryEncoding(nn.Module):
    """Base class: validates ``(q, k, positions)``, builds rotations once, rotates q and k.

    Subclasses implement ``_rotations(positions) -> Rotation`` (positions already in the
    compute dtype) and ``_rotate(x, rotation) -> Tensor``.

    Rotations are computed in float32 (float64 when q or k is float64) with autocast disabled,
    whatever dtype q and k come in; each output is cast back to its input's dtype.

    Shape:
        q, k: ``(b, h, n, d)``; positions: ``(n, a)`` (shared by the batch) or ``(b, n, a)``
        (per sample) -> ``(b, h, n, d)`` each.
    """

    head_dim: int
    num_axes: int
    num_heads: int  # 1: shared by every head of q/k

    def __init__(self, head_dim: int, num_axes: int, num_heads: int) -> None:
        super().__init__()
        self.head_dim = _check_positive_int(head_dim, "head_dim")
        self.num_axes = _check_positive_int(num_axes, "num_axes")
        self.num_heads = _check_positive_int(num_heads, "num_heads")
        # Note [no implicit cache]: rotations are recomputed on every call. An implicit cache
        # cannot see ``param.data.mul_()`` or ``.data.copy_()`` (they bump no version counter),
        # nor tell learned positions apart: ``freeze(positions)`` is the explicit snapshot, and
        # it is never pickled, saved or copied with the module (``__getstate__``).
        self._frozen: Optional[tuple[Tensor, Rotation]] = None
        self._frozen_dtype = torch.float32
        # Note [input checks]: NaN/Inf positions raise (one reduction over the positions, a
        # host sync on GPU); set False to skip where speed matters. Skipped while tracing.
        self.check_finite = True
        # Note [chunking]: rotate at most this many tokens at a time, so rotation storage stays
        # bounded for big grids; under autograd each chunk is checkpointed (recomputed in
        # backward). None: all tokens at once.
        self.max_tokens_per_chunk: Optional[int] = None

    # -- protocol ---------------------------------------------------------------------------
    def forward(
        self, q: Tensor, k: Tensor, positions: Tensor, *, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Rotate q and k by their tokens' positions.

        ``num_prefix_tokens``: the first tokens of q and k (class, register or distillation
        tokens) pass through unrotated and ``positions`` cover the rest; cheaper than slicing
        and concatenating around the call.
        """
        if k is None:
            raise ValueError(
                f"{type(self).__name__}.forward rotates a query-key pair, but k is None. To "
                f"rotate one tensor (new keys for a KV cache, or queries alone), call "
                f"encoding.rotate(x, positions)."
            )
        q_out, k_out = self._encode(q, k, positions, num_prefix_tokens)
        if k_out is None:  # pragma: no cover - k was given
            raise RuntimeError("internal error: k was dropped")
        return q_out, k_out

    def _encode(
        self, q: Tensor, k: Optional[Tensor], positions: Tensor, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Validate, build the rotations once, rotate q (and k unless None)."""
        p = num_prefix_tokens
        positions = self._check_inputs(q, q if k is None else k, positions, p)
        if (
            self.check_finite
            and not F.is_tracing()
            and not self._rotations_check_finite(positions)
            and not bool(torch.isfinite(positions).all())
        ):
            raise ValueError(
                f"{type(self).__name__}: positions contain NaN or Inf. Fix the data loader, or "
                f"set encoding.check_finite = False to skip this check."
            )
        dtype = F.compute_dtype(q.dtype, q.dtype if k is None else k.dtype)
        chunk = self.max_tokens_per_chunk
        q_in = _as_dtype(q, dtype)
        k_in = None if k is None else _as_dtype(k, dtype)
        if q.shape[0] == 0 or q.shape[2] == p:
            # nothing to rotate (empty batch, no tokens, or prefix tokens only)
            return q.clone(), None if k is None else k.clone()
        with no_autocast(q.device.type):
            if (
                chunk is not None
                and q.shape[2] - p > chunk
                and not self._has_frozen(positions, dtype)
            ):
                k_rest = None if k_in is None else k_in[:, :, p:]
                q_out, k_out = self._chunked(q_in[:, :, p:], k_rest, positions.to(dtype), chunk)
                q_out = _with_prefix(q_in, q_out, p)
                k_out = None if k_in is None or k_out is None else _with_prefix(k_in, k_out, p)
            else:
                rotation = self._rotations_for(positions, dtype)
                q_out, k_out = self._apply_rotation(q_in, k_in, rotation, p)
        q_out = _as_dtype(q_out, q.dtype)
        return q_out, None if k is None or k_out is None else _as_dtype(k_out, k.dtype)

    def _apply_rotation(
        self, q: Tensor, k: Optional[Tensor], rotation: Rotation, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Optional[Tensor]]:
        p = num_prefix_tokens
        if k is None:
            return _with_prefix(q, self._rotate(q[:, :, p:], rotation), p), None
        return self._rotate_pair(q, k, rotation, p)

    def _rotate_chunk(
        self, q: Tensor, k: Optional[Tensor], positions: Tensor
    ) -> tuple[Tensor, Optional[Tensor]]:
        return self._apply_rotation(q, k, self._rotations(positions))

    def _chunked(
        self, q: Tensor, k: Optional[Tensor], positions: Tensor, chunk: int
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Note [chunking]: token chunks, each rotated and applied on its own."""
        from torch.utils.checkpoint import checkpoint

        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad
            or (k is not None and k.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        q_parts, k_parts = [], []
        for start in range(0, q.shape[2], chunk):
            end = start + chunk
            q_c = q[:, :, start:end]
            k_c = None if k is None else k[:, :, start:end]
            pos = positions[..., start:end, :]
            if needs_grad:
                out = checkpoint(self._rotate_chunk, q_c, k_c, pos, use_reentrant=False)
            else:
                out = self._rotate_chunk(q_c, k_c, pos)
            q_parts.append(out[0])
            if out[1] is not None:
                k_parts.append(out[1])
        return torch.cat(q_parts, dim=2), torch.cat(k_parts, dim=2) if k_parts else None

    def _has_frozen(self, positions: Tensor, dtype: torch.dtype) -> bool:
        frozen = self._frozen
        return frozen is not None and self._matches_frozen(frozen[0], positions, dtype)

    # -- freezing ---------------------------------------------------------------------------
    def _rotations_for(self, positions: Tensor, dtype: torch.dtype) -> Rotation:
        frozen = self._frozen
        if frozen is not None and self._matches_frozen(frozen[0], positions, dtype):
            return frozen[1]
        return self._rotations(_as_dtype(positions, dtype))

    def _matches_frozen(
        self, frozen_positions: Tensor, positions: Tensor, dtype: torch.dtype
    ) -> bool:
        if frozen_positions.shape != positions.shape:
            return False
        if F.is_tracing():
            return True  # export: the frozen grid is the contract (checked when frozen)
        same = torch.equal(frozen_positions, positions.to(frozen_positions.dtype))
        return same and self._frozen_dtype == dtype

    @torch.no_grad()
    def freeze(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> RotaryEncoding:
        """Precompute the rotations for fixed ``positions`` (inference and export).

        Later calls with these positions (same values) use the stored rotations: no
        exponential runs, and ``torch.export`` / ONNX export see constants (there is no ONNX
        operator for the matrix exponential). Calls with other positions compute as usual.
        The rotations are a snapshot: call ``freeze`` again after changing parameters, or
        ``unfreeze()``. They are never pickled, saved with ``torch.save(module)`` or copied by
        ``copy.deepcopy``: freeze again after loading. While tracing for export, positions are
        matched by shape only.

        Shape:
            positions ``(n, a)``
        """
        positions = self._shared_positions(positions, "freeze")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"freeze computes in float32 or float64; got {dtype}.")
        positions = positions.detach().to(dtype)
        self._frozen = (positions.clone(), self._rotations(positions))
        self._frozen_dtype = dtype
        return self

    def unfreeze(self) -> RotaryEncoding:
        """Drop rotations stored by ``freeze``."""
        self._frozen = None
        return self

    @property
    def is_frozen(self) -> bool:
        return self._frozen is not None

    @property
    def frozen_rotations(self) -> Optional[Rotation]:
        """The rotations ``freeze`` stored (``None`` when not frozen): block rotations
        ``(h, n, m, s, s)``, or ``(cos, sin)`` for the RoPE family. Read-only: ``freeze`` and
        ``unfreeze`` change them."""
        return None if self._frozen is None else self._frozen[1]

    def __getstate__(self) -> dict[str, Any]:
        # Note [no implicit cache]: frozen rotations are derived data; a pickled, saved or
        # deep-copied module carries its parameters only.
        state = super().__getstate__()
        state["_frozen"] = None
        return state

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RotaryEncoding:
        out = super()._apply(fn, *args, **kwargs)
        frozen = self._frozen
        if frozen is not None:
            # follow device moves only: frozen rotations keep the precision they were built in
            device = fn(torch.zeros(1, device=frozen[0].device)).device
            positions, rotation = frozen
            moved: Rotation
            if isinstance(rotation, tuple):
                moved = tuple(part.to(device) for part in rotation)
            else:
                moved = rotation.to(device)
            self._frozen = (positions.to(device), moved)
        return out

    def rotate(self, x: Tensor, positions: Tensor, *, num_prefix_tokens: int = 0) -> Tensor:
        """Rotate one tensor exactly as ``forward`` rotates q (and k).

        For KV-cache decoding: rotate each step's new keys at their own positions with
        ``rotate`` and append them to the cache; cached keys are never rotated again (see
        docs/decoding.md). Queries of the step are rotated the same way.

        Shape:
            x ``(b, h, n, d)``, positions ``(n, a)``, ``(1 | b, n, a)`` or ``(n,)`` for one
            axis -> ``(b, h, n, d)``
        """
        return self._encode(x, None, positions, num_prefix_tokens)[0]

    def rotation_matrices(self, positions: Tensor) -> Tensor:
        """The dense rotations ``R(p)`` this encoding applies, for inspection and tests.

        Shape:
            positions ``(n, a)`` -> ``(h', n, d, d)`` with ``h'`` the encoding's ``num_heads``
            (1 when shared by all heads).
        """
        d, h = self.head_dim, self.num_heads
        positions = self._shared_positions(positions, "rotation_matrices")
        n = positions.shape[0]
        dtype = positions.dtype if positions.dtype == torch.float64 else torch.float32
        # Column j of R is R e_j: rotate the identity's rows as a batch of d queries.
        basis = torch.eye(d, dtype=dtype, device=positions.device)
        x = basis.view(d, 1, 1, d).expand(d, h, n, d)
        out = self.rotate(x, positions)
        return out.permute(1, 2, 3, 0)

    @torch.no_grad()
    def generator_norm(self, positions: Tensor) -> float:
        """Upper bound on ``||sum_a p_a A_a||_2`` over all tokens and heads.

        The exponential's rounding error grows with this norm (Note [position scale] in
        ``liere.positions``); ``liere.testing`` scales its default tolerances by it.

        Shape:
            positions ``(n, a)`` or ``(b, n, a)``
        """
        positions = self._canonical_positions(positions)
        if positions.numel() == 0:
            return 0.0
        return float(self._generator_norms(positions.detach().double().abs()).max())

    # -- subclass hooks ---------------------------------------------------------------------
    def _rotations_check_finite(self, positions: Tensor) -> bool:
        """Whether this call's rotations raise on NaN/Inf positions themselves, in the one host
        read they make anyway (Note [sync-free rotations]): ``_encode`` then skips its own
        check, so a call with ``check_finite`` synchronises once."""
        return False

    def _generator_norms(self, abs_positions: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _rotations(self, positions: Tensor) -> Rotation:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rotate(self, x: Tensor, rotation: Rotation) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rotate_pair(
        self, q: Tensor, k: Tensor, rotation: Rotation, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        p = num_prefix_tokens
        q_rot, k_rot = self._rotate(q[:, :, p:], rotation), self._rotate(k[:, :, p:], rotation)
        return _with_prefix(q, q_rot, p), _with_prefix(k, k_rot, p)

    # -- validation -------------------------------------------------------------------------
    def _canonical_positions(self, positions: Tensor) -> Tensor:
        """``(n,)`` -> ``(n, 1)`` for one axis; ``(1, n, a)`` -> ``(n, a)`` (shared by the
        batch, so the rotations are built once); anything else as it came."""
        if not isinstance(positions, Tensor):
            raise TypeError(
                f"{type(self).__name__}: positions must be a Tensor of coordinates, e.g. "
                f"liere.grid_positions(...); got {type(positions).__name__}."
            )
        if positions.dim() == 1 and self.num_axes == 1:
            return positions.unsqueeze(-1)
        if positions.dim() == 3 and positions.shape[0] == 1:
            return positions[0]
        return positions

    def _shared_positions(self, positions: Tensor, where: str) -> Tensor:
        positions = self._canonical_positions(positions)
        if positions.dim() != 2 or positions.shape[-1] != self.num_axes:
            one_axis = " or (tokens,)" if self.num_axes == 1 else ""
            raise ValueError(
                f"{where} takes shared positions of shape (tokens, {self.num_axes}){one_axis}; "
                f"got {tuple(positions.shape)}."
            )
        return positions

    def _check_inputs(
        self, q: Tensor, k: Tensor, positions: Tensor, num_prefix_tokens: int = 0
    ) -> Tensor:
        name = type(self).__name__
        d = self.head_dim
        p = num_prefix_tokens
        for label, t in (("q", q), ("k", k)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: {label} must be a Tensor; got {type(t).__name__}.")
            if t.dim() != 4 or t.shape[-1] != d:
                raise ValueError(
                    f"{name}: {label} must have shape (batch, heads, tokens, {d}); "
                    f"got {tuple(t.shape)}."
                )
            if not t.is_floating_point():
                raise ValueError(f"{name}: {label} must be floating point; got {t.dtype}.")
            if self.num_heads > 1 and t.shape[1] != self.num_heads:
                raise ValueError(
                    f"{name} was built with num_heads={self.num_heads} (one rotation per head); "
                    f"{label} of shape {tuple(t.shape)} has {t.shape[1]} heads in dim 1. "
                    f"{label} must be laid out (batch, heads, tokens, head_dim): if yours is "
                    f"(batch, tokens, heads, head_dim), pass {label}.transpose(1, 2). "
                    f"Otherwise build the encoding with num_heads={t.shape[1]}"
                    f"{'' if t.shape[1] == 1 else ', or num_heads=1 to share one rotation'}."
                )
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(
                f"{name}: q and k must agree in batch and tokens; got q {tuple(q.shape)} "
                f"and k {tuple(k.shape)}."
            )
        positions = self._canonical_positions(positions)
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= q.shape[2]:
            raise ValueError(
                f"{name}: num_prefix_tokens must be an integer in [0, {q.shape[2]}] (the tokens "
                f"of q); got {p!r}."
            )
        b, n, a = q.shape[0], q.shape[2] - p, self.num_axes
        shared = positions.dim() == 2 and tuple(positions.shape) == (n, a)
        per_sample = positions.dim() == 3 and tuple(positions.shape) == (b, n, a)
        if not (shared or per_sample):
            tokens = f"tokens - num_prefix_tokens = {q.shape[2]} - {p}" if p else "tokens"
            hint = ""
            if positions.dim() >= 2 and positions.shape[-2] == q.shape[1] != n:
                hint = (
                    f" positions cover {q.shape[1]} tokens, the size of q's dim 1: is q laid "
                    f"out (batch, tokens, heads, head_dim)? Pass q.transpose(1, 2) to get "
                    f"(batch, heads, tokens, head_dim)."
                )
            raise ValueError(
                f"{name}: positions must have shape ({tokens}, num_axes) = ({n}, {a}) or "
                f"(batch, {tokens}, num_axes) = ({b}, {n}, {a}) (batch 1 broadcasts"
                f"{'; (tokens,) is one axis' if a == 1 else ''}) for q of shape "
                f"{tuple(q.shape)}; got {tuple(positions.shape)}.{hint}"
            )
        if positions.dtype == torch.bool or positions.is_complex():
            raise ValueError(
                f"{name}: positions must be real coordinates; got dtype {positions.dtype}."
            )
        if positions.dtype in (torch.float16, torch.bfloat16) and not F.is_tracing():
            warnings.warn(
                f"{name}: positions are {positions.dtype}, which keeps only "
                f"{_significant_bits(positions.dtype)} significant bits: each coordinate is "
                f"off by up to {torch.finfo(positions.dtype).eps / 2:.1e} of its size, so each "
                f"rotation angle by up to that fraction of ||A(p)|| "
                f"(encoding.generator_norm(positions)). Rotations are computed in float32 "
                f"anyway: pass float32 positions (grid_positions' default) and keep them out of "
                f".half() and autocast.",
                UserWarning,
                stacklevel=4,
            )
        if positions.device != q.device:
            raise ValueError(
                f"{name}: positions are on {positions.device} but q is on {q.device}; "
                f"move them with positions.to(q.device)."
            )
        return positions


def _rope_generators(freqs: Tensor) -> Tensor:
    """Dense generators of pairwise RoPE: pair k of axis a is ``[[0, -f], [f, 0]]``.

    Shape:
        freqs ``(h, a, k)`` -> ``(h, a, 2k, 2k)``
    """
    h, a, k = freqs.shape
    blocks = freqs.new_zeros(h, a, k, 2, 2)
    blocks[..., 1, 0] = freqs
    blocks[..., 0, 1] = -freqs
    eye = torch.eye(k, dtype=freqs.dtype, device=freqs.device)
    return torch.einsum("hamij,mn->haminj", blocks, eye).reshape(h, a, 2 * k, 2 * k)


class _PairwiseRoPE(RotaryEncoding):
    """RoPE family: pair ``k`` of head ``h`` turns by ``sum_a p_a f[h, a, k]``; subclasses
    say where the ``(h, a, d/2)`` table ``f`` comes from (``_frequency_table``)."""

    def __init__(self, head_dim: int, num_axes: int, num_heads: int) -> None:
        super().__init__(head_dim, num_axes, num_heads)
        if head_dim % 2:
            raise ValueError(
                f"{type(self).__name__} needs an even head_dim (channel pairs); got {head_dim}."
            )

    def _frequency_table(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def generators(self) -> Tensor:
        """Dense skew-symmetric generators: ``R(p) = exp(sum_a p_a A_a)``, pair ``k`` of axis
        ``a`` contributing the block ``[[0, -f], [f, 0]]``.

        Shape:
            ``(num_heads, num_axes, head_dim, head_dim)``
        """
        return _rope_generators(self._frequency_table())

    def _generator_norms(self, abs_positions: Tensor) -> Tensor:
        freqs = self._frequency_table().detach().to(abs_positions.device, torch.float64)
        return F.rope_angles(abs_positions, freqs.abs())

    def _rotations(self, positions: Tensor) -> Rotation:
        freqs = self._frequency_table().to(device=positions.device, dtype=positions.dtype)
        angles = F.rope_angles(positions, freqs)
        return torch.cos(angles), torch.sin(angles)

    def _rotate(self, x: Tensor, rotation: Rotation) -> Tensor:
        cos, sin = rotation
        return ops.rope(x, cos, sin)

    def _rotate_pair(
        self, q: Tensor, k: Tensor, rotation: Rotation, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        cos, sin = rotation
        return ops.rope_pair(q, k, cos, sin, num_prefix_tokens)


class AxialRoPE(_PairwiseRoPE):
    """Fixed axial RoPE: pair ``k`` of axis ``a`` turns by ``p_a * f_k``.

    ``R(p) = blockdiag_k rot(p_{axis(k)} f_k)`` with ``rot(t) = [[cos t, -sin t], [sin t, cos t]]``
    acting on channel pairs ``(2k, 2k+1)``.

    Pair layout: the ``d/2`` pairs are split into ``num_axes`` contiguous groups of
    ``(d/2) // num_axes`` pairs (axis 0 first). When that does not divide evenly the last
    ``(d/2) % num_axes`` pairs are left unrotated, as in the paper's VisionLlama baseline (e.g.
    ``head_dim=64`` with 3 axes: 10 pairs per axis, 2 pairs unrotated). Within each group the
    frequencies are ``max_freq * base ** (-i / group)``, ``i = 0..group-1``.
    With ``num_axes=1`` this is plain 1D RoPE (``max_freq=1, base=10000`` on integer token
    indices is the language-model convention).

    The defaults suit liere's coordinates (each axis on [0, 1] over the training grid): the
    fastest pair turns about 1.2 rad per patch on a 14-patch axis, the slowest about a quarter
    turn over the whole axis.

    Args:
        head_dim: even channel count per head.
        num_axes: coordinate axes (1 text/audio, 2 images, 3 volumes/clips).
        max_freq: fastest angular frequency, in radians per unit of position.
        base: ratio between the fastest and (nearly) the slowest frequency of an axis.

    Shape:
        q, k ``(b, h, n, d)``, positions ``(n, a)`` or ``(b, n, a)`` -> ``(b, h, n, d)`` each
    """

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        *,
        max_freq: float = 16.0,
        base: float = 100.0,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(head_dim, num_axes, num_heads=1)
        if not (max_freq > 0 and base > 0):
            raise ValueError(f"max_freq and base must be positive; got {max_freq}, {base}.")
        self.max_freq = float(max_freq)
        self.base = float(base)
        self.pairs_per_axis = (head_dim // 2) // num_axes
        if self.pairs_per_axis == 0:
            raise ValueError(
                f"AxialRoPE: head_dim={head_dim} has {head_dim // 2} channel pairs, fewer than "
                f"num_axes={num_axes}; every axis needs at least one pair."
            )
        # The frequency table is derived from the configuration: a plain float64 attribute
        # (not a buffer) that follows device moves but is never rounded by module.to(bfloat16).
        del dtype
        self._table = self._build_table().to(device)

    def _build_table(self) -> Tensor:
        a, per = self.num_axes, self.pairs_per_axis
        mags = _rope_magnitudes(per, self.max_freq, self.base)
        table = torch.zeros(a, self.head_dim // 2, dtype=torch.float64)
        for axis in range(a):
            table[axis, axis * per : (axis + 1) * per] = mags
        return table.unsqueeze(0)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RotaryEncoding:
        out = super()._apply(fn, *args, **kwargs)
        device = fn(torch.zeros(1, device=self._table.device)).device
        self._table = self._build_table().to(device)  # rebuilt: a meta table holds no data
        return out

    def reset_parameters(self) -> None:
        """No parameters; rebuilds the frequency table (e.g. after meta-device init)."""
        self._table = self._build_table().to(self._table.device)

    def frequencies(self, device: Optional[torch.device] = None) -> Tensor:
        """The ``(1, a, k)`` frequency table: column ``k`` is nonzero only on its own axis.

        Shape:
            ``(1, num_axes, head_dim // 2)`` (float64)
        """
        return self._table if device is None else self._table.to(device)

    def _frequency_table(self) -> Tensor:
        return self._table

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_axes={self.num_axes}, "
            f"max_freq={self.max_freq}, base={self.base}, "
            f"unrotated_pairs={self.head_dim // 2 - self.num_axes * self.pairs_per_axis}"
        )


class MixedRoPE(_PairwiseRoPE):
    """RoPE-Mixed (Heo et al. 2024): pair ``k`` of head ``h`` turns by ``sum_a p_a f[h, a, k]``.

    Learnable frequencies mix every axis in every pair. Initialisation: pair ``k`` has
    magnitude ``max_freq * base ** (-k / (d/2))`` pointing in a random direction of the
    ``num_axes``-dimensional position space (per head), so the encoding starts as a randomly
    oriented multi-frequency RoPE. Equals ``LieRE(block_size=2)`` with ``f = -theta``
    (the 2x2 block's upper entry).

    Args:
        head_dim: even channel count per head.
        num_axes: coordinate axes.
        num_heads: one frequency table per head; 1 shares one table across heads.
        max_freq, base: initial frequency range (see ``AxialRoPE``).

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
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(head_dim, num_axes, num_heads)
        self.max_freq = float(max_freq)
        self.base = float(base)
        self.freqs = nn.Parameter(
            torch.empty(num_heads, num_axes, head_dim // 2, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h, a, k = self.freqs.shape
        if self.freqs.is_meta:
            return
        mags = _rope_magnitudes(k, self.max_freq, self.base)
        directions = torch.randn(h, a, k, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            self.freqs.copy_(directions * mags)

    def _frequency_table(self) -> Tensor:
        return self.freqs

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        _check_checkpoint_shape(self, state_dict, prefix + "freqs", self.freqs, args[-1])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_axes={self.num_axes}, num_heads={self.num_heads}, "
            f"max_freq={self.max_freq}, base={self.base}"
        )


class BlockRotaryEncoding(RotaryEncoding):
    """Base of the encodings whose generators are block-diagonal skew matrices
    ``B[h, a, m]`` (LieRE, ComRoPE): rotations ``exp(sum_a p_a B[h, a, m])`` per block,
    applied blockwise. Subclasses implement ``bases()``.
    """

    block_size: int
    exp_method: str  # "auto" (the fast path) or "matrix_exp" (the reference)

    def _rotations_check_finite(self, positions: Tensor) -> bool:
        # off the CPU the device-generic exponential's one host read raises on NaN/Inf
        # positions (Note [sync-free rotations]); 2x2 blocks run on the RoPE path instead
        return (
            positions.device.type != "cpu"
            and self.exp_method == "auto"
            and self.block_size > 2
            and self._frozen is None
        )

    def bases(self) -> Tensor:  # pragma: no cover - abstract
        """The skew-symmetric blocks of every generator.

        Shape:
            ``(num_heads, num_axes, head_dim // block_size, block_size, block_size)``
        """
        raise NotImplementedError

    def generators(self) -> Tensor:
        """Dense, exactly skew-symmetric generators ``A`` (zeros off the diagonal blocks).

        Shape:
            ``(num_heads, num_axes, head_dim, head_dim)``
        """
        blocks = self.bases()
        h, a, m, s, _ = blocks.shape
        # (h, a, s, s, m, m) with the blocks on the (m, m) diagonal: exact, no matmul
        dense = torch.diag_embed(blocks.permute(0, 1, 3, 4, 2))
        return dense.permute(0, 1, 4, 2, 5, 3).reshape(h, a, m * s, m * s)

    def _generator_norms(self, abs_positions: Tensor) -> Tensor:
        # ||sum_a p_a A_a||_2 <= sum_a |p_a| max_m ||A[h, a, m]||_2 (block-diagonal A).
        blocks = self.bases().detach().double()
        per_axis = torch.linalg.matrix_norm(blocks, ord=2).amax(dim=-1)  # (h, a)
        return torch.matmul(abs_positions, per_axis.mT)  # (.., n, h)

    def _rotate(self, x: Tensor, rotation: Rotation) -> Tensor:
        if isinstance(rotation, tuple):
            return ops.rope(x, *rotation)
        if self._is_frozen_while_tracing(rotation):
            return F.apply_blockwise_exact(x, rotation)
        return ops.blockwise(x, rotation)

    def _is_frozen_while_tracing(self, rotation: Tensor) -> bool:
        # frozen rotations are plain tensors: an exported graph (ONNX) applies them with plain
        # elementwise ops, never a liere op (Note [registered operators] in liere.ops)
        frozen = self._frozen
        return frozen is not None and rotation is frozen[1] and F.is_tracing()

    def _rotate_pair(
        self, q: Tensor, k: Tensor, rotation: Rotation, num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        if isinstance(rotation, tuple):  # 2x2 blocks: the RoPE path
            cos, sin = rotation
            return ops.rope_pair(q, k, cos, sin, num_prefix_tokens)
        if self._is_frozen_while_tracing(rotation):
            return super()._rotate_pair(q, k, rotation, num_prefix_tokens)
        return ops.blockwise_pair(q, k, rotation, num_prefix_tokens=num_prefix_tokens)


class LieRE(BlockRotaryEncoding):
    """LieRE: ``R(p) = exp(sum_a p_a A_a)`` with learned block-diagonal skew-symmetric ``A_a``.

    One generator per axis (per head when ``num_heads > 1``), block-diagonal with
    ``head_dim // block_size`` blocks of ``block_size x block_size``; each block is
    ``U - U^T`` from its learned strictly upper-triangular entries, so ``A == -A.mT`` exactly and
    every ``R(p)`` is a rotation. ``block_size == head_dim`` is dense LieRE (LieRE_64 at
    head_dim 64); ``block_size=2`` is RoPE-Mixed and runs on the RoPE path (closed form).
    The exponential of each block is taken on its own (``liere.functional.expm_skew``).

    Args:
        head_dim: channels per head.
        num_axes: coordinate axes (2 images, 3 volumes/clips).
        num_heads: one set of generators per head; 1 shares one set across heads.
        block_size: size of the diagonal blocks; must divide ``head_dim``.
        init: ``"uniform"`` (the paper: upper entries ~ U[0, init_scale)), ``"normal"``
            (N(0, init_scale^2)) or ``"zeros"`` (start at the identity).
        init_scale: 2*pi by default (the paper's range).

    Attributes:
        exp_method: ``"auto"`` (the fast path) or ``"matrix_exp"`` (the reference path).
        reorthogonalize_above: float32 blocks whose generator norm bound exceeds this get one
            Newton-Schulz step (default 1024, about 4x the training range of dense blocks at
            the paper's init; ``None`` turns it off). See Note [re-orthogonalisation].

    Learned parameters:
        weight: ``(num_heads, num_axes, head_dim // block_size, s * (s - 1) // 2)``, the
        strictly upper-triangular entries of every block, row-major.

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
        init: str = "uniform",
        init_scale: float = 2 * math.pi,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(head_dim, num_axes, num_heads)
        _check_positive_int(block_size, "block_size", minimum=2)
        if head_dim % block_size:
            raise ValueError(
                f"block_size must divide head_dim; got block_size={block_size} for "
                f"head_dim={head_dim}. Use one of "
                f"{[s for s in range(2, head_dim + 1) if head_dim % s == 0]}."
            )
        if init not in ("uniform", "normal", "zeros"):
            raise ValueError(f"init must be 'uniform', 'normal' or 'zeros'; got {init!r}.")
        self.block_size = block_size
        self.num_blocks = head_dim // block_size
        # "auto" (fast path) or "matrix_exp" (torch.linalg.matrix_exp, the reference path)
        self.exp_method = "auto"
        # Note [re-orthogonalisation] in liere.speed.extrapolation: float32 blocks whose
        # generator-norm bound exceeds this (far past the training range) get one Newton-Schulz
        # step; None: off
        self.reorthogonalize_above: Optional[float] = F.REORTHOGONALIZE_ABOVE
        self.init = init
        self.init_scale = float(init_scale)
        entries = block_size * (block_size - 1) // 2
        # a constant of the block size, rebuilt on every device move (``_apply``)
        self._upper_index = F.upper_triangle_index(block_size, _device_of(device))
        self.weight = nn.Parameter(
            torch.empty(num_heads, num_axes, self.num_blocks, entries, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "uniform":
                self.weight.uniform_(0.0, self.init_scale)
            elif self.init == "normal":
                self.weight.normal_(0.0, self.init_scale)
            else:
                self.weight.zero_()

    def bases(self) -> Tensor:
        """The skew-symmetric blocks of every generator.

        Shape:
            ``(num_heads, num_axes, head_dim // block_size, block_size, block_size)``
        """
        return F.skew_symmetric(self.weight, self.block_size, index=self._upper_index)

    def _rotations(self, positions: Tensor) -> Rotation:
        weight = _as_dtype(self.weight, positions.dtype)
        if self.block_size == 2:
            # 2x2 block [[0, t], [-t, 0]] turns pair (x0, x1) by -t: RoPE with frequency -theta.
            angles = F.rope_angles(positions, -weight[..., 0])
            return torch.cos(angles), torch.sin(angles)
        bases = F.skew_symmetric(weight, self.block_size, index=self._upper_index)
        return ops.block_rotations(
            positions,
            bases,
            method=self.exp_method,
            reorthogonalize_above=self.reorthogonalize_above,
            check_finite=self.check_finite,
        )

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RotaryEncoding:
        out = super()._apply(fn, *args, **kwargs)
        self._upper_index = F.upper_triangle_index(self.block_size, self.weight.device)
        return out

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        _check_checkpoint_shape(self, state_dict, prefix + "weight", self.weight, args[-1])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_axes={self.num_axes}, num_heads={self.num_heads}, "
            f"block_size={self.block_size}, init={self.init!r}"
        )
