"""Multi-head self-attention with a pluggable rotary position encoding."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .encodings import RotaryEncoding

__all__ = ["RotaryAttention"]


def _takes_prefix_tokens(pos_enc: nn.Module) -> bool:
    """A liere encoding whose forward is liere's (not overridden or patched), so it accepts
    ``num_prefix_tokens``; anything else gets the sliced tokens only."""
    return (
        isinstance(pos_enc, RotaryEncoding)
        and type(pos_enc).forward is RotaryEncoding.forward
        and "forward" not in vars(pos_enc)
    )


class RotaryAttention(nn.Module):
    """``softmax((R q)(R k)^T / sqrt(d)) v`` over heads, with ``R`` from ``pos_enc``.

    The first ``num_prefix_tokens`` tokens (CLS, registers) are not rotated (identity rotation,
    and no exponential is computed for them); ``positions`` covers the remaining tokens only.
    The qkv projection uses timm's layout (``qkv.weight`` of shape ``(3 * dim, dim)``, q then k
    then v, heads inside each), so timm ``Attention`` weights load as they are.

    Args:
        dim: model width; must be divisible by ``num_heads``.
        num_heads: attention heads (head_dim = dim // num_heads).
        pos_enc: any ``RotaryEncoding`` (or module with ``forward(q, k, positions)``); ``None``
            gives plain multi-head attention (``positions`` is then ignored).
        num_prefix_tokens: leading tokens left unrotated.
        qkv_bias, attn_drop, proj_drop: as in timm.
        qk_norm: LayerNorm over head_dim on q and k before the rotation (as timm/Eva do);
            the attributes ``q_norm``, ``k_norm`` and ``norm`` (on the attention output, before
            ``proj``) are identities otherwise and may be replaced by any module.

    Shape:
        x ``(b, num_prefix_tokens + n, dim)``; positions ``(n, a)`` or ``(b, n, a)``;
        attn_mask: anything ``scaled_dot_product_attention`` accepts for
        ``(b, heads, tokens, tokens)`` (bool: True = attend) -> ``(b, num_prefix_tokens + n, dim)``
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        pos_enc: Optional[nn.Module] = None,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qk_norm: bool = False,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim!r}.")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer; got {num_heads!r}.")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0; got {num_prefix_tokens}.")
        head_dim = dim // num_heads
        if isinstance(pos_enc, RotaryEncoding):
            if pos_enc.head_dim != head_dim:
                raise ValueError(
                    f"pos_enc has head_dim={pos_enc.head_dim}, but dim={dim} with "
                    f"num_heads={num_heads} gives head_dim={head_dim}."
                )
            if pos_enc.num_heads not in (1, num_heads):
                raise ValueError(
                    f"pos_enc has num_heads={pos_enc.num_heads}; expected 1 (shared) or "
                    f"{num_heads} (one per attention head)."
                )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        norm = (
            (lambda: nn.LayerNorm(head_dim, device=device, dtype=dtype)) if qk_norm else nn.Identity
        )
        self.q_norm: nn.Module = norm()
        self.k_norm: nn.Module = norm()
        self.norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_enc = pos_enc

    def reset_parameters(self) -> None:
        """Re-initialise the projections, norms and encoding (e.g. after meta-device
        construction and ``to_empty``)."""
        for module in (self.qkv, self.proj, self.q_norm, self.k_norm, self.norm, self.pos_enc):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    def forward(
        self,
        x: Tensor,
        positions: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape (batch, tokens, {self.dim}); got {tuple(x.shape)}."
            )
        q, k, v = rearrange(
            self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        if self.pos_enc is not None:
            if positions is None:
                raise ValueError(
                    "this RotaryAttention has a pos_enc, so forward needs positions of shape "
                    f"(tokens - num_prefix_tokens, num_axes) for the {x.shape[1]} tokens."
                )
            q, k = self._rotate(q, k, positions)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal,
        )
        out = self.norm(rearrange(out, "b h n d -> b n (h d)"))
        return self.proj_drop(self.proj(out))

    def _rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        assert self.pos_enc is not None
        p = self.num_prefix_tokens
        n = q.shape[2] - p
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions must be a Tensor; got {type(positions).__name__}.")
        dims = positions.dim()
        covered = -1 if dims == 0 else positions.shape[0] if dims == 1 else positions.shape[-2]
        if n < 0 or covered != n:
            raise ValueError(
                f"positions must cover the {q.shape[2]} tokens minus {p} prefix tokens = "
                f"{n} tokens; got positions of shape {tuple(positions.shape)}."
            )
        if p == 0:
            return self.pos_enc(q, k, positions)
        if _takes_prefix_tokens(self.pos_enc):
            # rotates around the prefix tokens without slicing and concatenating q and k
            out: tuple[Tensor, Tensor] = self.pos_enc(q, k, positions, num_prefix_tokens=p)
            return out
        q_rot, k_rot = self.pos_enc(q[:, :, p:], k[:, :, p:], positions)
        return (
            torch.cat((q[:, :, :p], q_rot), dim=2),
            torch.cat((k[:, :, :p], k_rot), dim=2),
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
