"""Rotary encodings inside PyTorch's own layers: ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``, converted in place with their
weights kept.

    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 8, batch_first=True), 6)
    convert_transformer(model, "liere", context_length=1024)   # 1D LieRE in every layer
    out = model(tokens)                                        # positions: index / 1023

``TransformerEncoder.forward`` takes no positions, so the converted layers derive them for 1D
sequences: token ``i`` sits at ``i / (context_length - 1)`` (docs/decoding.md: [0, 1] over
the training context). Other positions (per sample, 2D, offsets in decoding) are passed with
``with using_positions(model, positions): model(src)``.

PyTorch's inference fast path (``torch._transformer_encoder_layer_fwd``) would call the
attention's weights directly, bypassing a replaced module: the converted attention reports
``_qkv_same_embed_dim = False``, which PyTorch's own eligibility check reads, so converted
layers always run the rotary attention, in eval and under ``no_grad`` too (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import RotaryAttention
from ..encodings import RotaryEncoding
from ..models import ROTARY, layer_encoding

__all__ = ["RotaryMultiheadAttention", "convert_mha", "convert_transformer", "using_positions"]


class _PositionSource:
    """Shared by a converted model's attentions: positions of the current call, or token
    indices on the documented scale."""

    def __init__(self, context_length: int, num_axes: int) -> None:
        self.context_length = context_length
        self.num_axes = num_axes
        self.override: Optional[Tensor] = None

    def positions(self, tokens: int, device: torch.device) -> Tensor:
        if self.override is not None:
            return self.override
        if self.num_axes != 1:
            raise ValueError(
                f"this model's encodings have {self.num_axes} axes, so token indices cannot "
                f"serve as positions: pass them with `with using_positions(model, positions):`."
            )
        index = torch.arange(tokens, device=device, dtype=torch.float32)
        return (index / max(self.context_length - 1, 1)).unsqueeze(-1)


class RotaryMultiheadAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s interface and a rotary encoding on q, k.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)`` as PyTorch's;
    ``query``, ``key`` and ``value`` must be the same tensor's sequence (self-attention:
    rotations need one position per token). Masks follow PyTorch: a bool mask marks what may
    NOT be attended (True = masked), a float mask is added to the scores. ``is_causal`` without
    ``attn_mask`` masks the future; with one, ``attn_mask`` is used, as PyTorch treats the flag
    as a hint.

    The wrapped ``RotaryAttention`` is ``self.attention`` (its ``qkv`` holds PyTorch's
    ``in_proj_weight``, q then k then v; its ``proj`` is ``out_proj``).

    Shape:
        query ``(batch, tokens, embed_dim)`` with ``batch_first``, else ``(tokens, batch,
        embed_dim)`` -> the same, and weights ``(batch, tokens, tokens)`` (averaged over heads)
        or ``(batch, heads, tokens, tokens)``
    """

    _qkv_same_embed_dim = False  # keeps PyTorch's fused fast path (which bypasses us) off

    def __init__(
        self,
        attention: RotaryAttention,
        *,
        batch_first: bool,
        source: _PositionSource,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.batch_first = batch_first
        self.embed_dim = attention.dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.dropout = float(dropout)
        self._source = source

    @property
    def in_proj_weight(self) -> Tensor:
        return self.attention.qkv.weight

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        bias: Optional[Tensor] = self.attention.qkv.bias
        return bias

    @property
    def out_proj(self) -> nn.Linear:
        return self.attention.proj

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if not (query.shape == key.shape == value.shape):
            raise ValueError(
                f"RotaryMultiheadAttention is self-attention: query, key and value must have "
                f"one shape (one position per token); got {tuple(query.shape)}, "
                f"{tuple(key.shape)}, {tuple(value.shape)}."
            )
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            layout = (
                "(batch, tokens, embed_dim)" if self.batch_first else "(tokens, batch, embed_dim)"
            )
            raise ValueError(
                f"query must have shape {layout} with embed_dim={self.embed_dim}; got "
                f"{tuple(query.shape)}."
            )
        x = query if self.batch_first else query.transpose(0, 1)  # (b, n, e)
        b, n, _ = x.shape
        mask = _additive_mask(attn_mask, key_padding_mask, b, self.num_heads, n, x.dtype)
        causal = is_causal and attn_mask is None
        if causal:
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            causal_mask = torch.zeros(n, n, dtype=x.dtype, device=x.device)
            causal_mask = causal_mask.masked_fill(future, -math.inf)
            mask = causal_mask if mask is None else mask + causal_mask
        attn = self.attention
        q, k, v = attn.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.pos_enc is not None:
            positions = self._source.positions(n - attn.num_prefix_tokens, x.device)
            q, k = attn._rotate(q, k, positions)
        dropout = self.dropout if self.training else 0.0
        weights: Optional[Tensor] = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            weights = probs.mean(dim=1) if average_attn_weights else probs
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, self.embed_dim)))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    b: int,
    h: int,
    n: int,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """PyTorch's masks (bool: True = masked; float: added) as one additive float mask that
    broadcasts to ``(b, h, n, n)``."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
        return m.to(dtype)

    mask: Optional[Tensor] = None
    if attn_mask is not None:
        m = additive(attn_mask)
        if m.dim() == 3:  # (b * h, n, n), PyTorch's layout
            m = m.view(b, h, n, n)
        elif m.dim() != 2:
            raise ValueError(
                f"attn_mask must have shape (tokens, tokens) or (batch * heads, tokens, tokens); "
                f"got {tuple(attn_mask.shape)}."
            )
        mask = m
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(
                f"key_padding_mask must have shape (batch, tokens) = ({b}, {n}); got "
                f"{tuple(key_padding_mask.shape)}."
            )
        padding = additive(key_padding_mask)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def _check_mha(mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim:
        raise ValueError(
            "convert_mha needs kdim == vdim == embed_dim (self-attention); this "
            "nn.MultiheadAttention has other key/value sizes."
        )
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("convert_mha does not support add_bias_kv or add_zero_attn.")


def convert_mha(
    mha: nn.MultiheadAttention,
    pos_enc: Union[str, RotaryEncoding, None] = "liere",
    *,
    num_axes: int = 1,
    context_length: int = 512,
    num_prefix_tokens: int = 0,
    _source: Optional[_PositionSource] = None,
    **pos_enc_kwargs: Any,
) -> RotaryMultiheadAttention:
    """A ``RotaryMultiheadAttention`` with ``mha``'s weights and a rotary encoding.

    Args:
        mha: a self-attention ``nn.MultiheadAttention`` (kdim == vdim == embed_dim).
        pos_enc: a name (``"liere"``, ``"rope-axial"``, ``"rope-mixed"``, ``"comrope-ap"``,
            ``"comrope-ld"``, ``"string-cayley"``), a ``RotaryEncoding`` (copied), or None
            (no rotation: computes what ``mha`` did).
        num_axes: position axes of a named encoding (1 for sequences).
        context_length: token ``i`` sits at ``i / (context_length - 1)`` unless positions are
            passed with ``using_positions``.
        num_prefix_tokens: leading tokens left unrotated (e.g. a CLS token).
        **pos_enc_kwargs: passed to a named encoding (e.g. ``block_size``; per-head by default).
    """
    _check_mha(mha)
    head_dim = mha.embed_dim // mha.num_heads
    if isinstance(pos_enc, RotaryEncoding):
        num_axes = pos_enc.num_axes
    if isinstance(pos_enc, (str, RotaryEncoding)) or pos_enc is None:
        enc: Optional[nn.Module] = layer_encoding(
            pos_enc, head_dim, num_axes, num_heads=mha.num_heads, **pos_enc_kwargs
        )
    else:
        raise ValueError(
            f"pos_enc must be one of {ROTARY}, a RotaryEncoding or None; got {pos_enc!r}."
        )
    weight = mha.in_proj_weight
    attention = RotaryAttention(
        mha.embed_dim,
        mha.num_heads,
        pos_enc=enc,
        num_prefix_tokens=num_prefix_tokens,
        qkv_bias=mha.in_proj_bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        attention.qkv.weight.copy_(weight)
        if mha.in_proj_bias is not None:
            attention.qkv.bias.copy_(mha.in_proj_bias)
        attention.proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            attention.proj.bias.copy_(mha.out_proj.bias)
        else:
            attention.proj.bias = None
    if isinstance(enc, nn.Module):
        enc.to(device=weight.device)
    source = _source or _PositionSource(context_length, num_axes)
    out = RotaryMultiheadAttention(
        attention, batch_first=mha.batch_first, source=source, dropout=mha.dropout
    )
    return out.train(mha.training)


def convert_transformer(
    model: nn.Module,
    pos_enc: Union[str, RotaryEncoding, None] = "liere",
    *,
    num_axes: int = 1,
    context_length: int = 512,
    num_prefix_tokens: int = 0,
    **pos_enc_kwargs: Any,
) -> nn.Module:
    """Give every ``nn.TransformerEncoderLayer`` in ``model`` (an ``nn.TransformerEncoder``, a
    layer, or any module holding them) a ``RotaryMultiheadAttention``, in place, weights kept.

    Every layer gets its own encoding. Positions: token indices on ``context_length``'s scale,
    or ``using_positions``. With ``pos_enc=None`` the model computes what it did (to float32
    precision). Returns ``model``.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    if not layers:
        raise ValueError(
            f"convert_transformer found no nn.TransformerEncoderLayer in {type(model).__name__}; "
            f"use convert_mha for a bare nn.MultiheadAttention."
        )
    source = _PositionSource(context_length, num_axes)
    for layer in layers:
        layer.self_attn = convert_mha(  # type: ignore[assignment]
            layer.self_attn,
            pos_enc,
            num_axes=num_axes,
            context_length=context_length,
            num_prefix_tokens=num_prefix_tokens,
            _source=source,
            **pos_enc_kwargs,
        )
    model.liere_positions = source  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def using_positions(model: nn.Module, positions: Tensor) -> Iterator[None]:
    """Use ``positions`` (``(n, a)``, ``(b, n, a)`` or ``(n,)`` for one axis) in every
    converted attention of ``model`` while the block runs, instead of token indices."""
    source = getattr(model, "liere_positions", None)
    if source is None:
        sources = {
            id(m._source): m._source
            for m in model.modules()
            if isinstance(m, RotaryMultiheadAttention)
        }
        if not sources:
            raise ValueError("using_positions: model has no attention converted by liere.")
        targets = list(sources.values())
    else:
        targets = [source]
    previous = [s.override for s in targets]
    for s in targets:
        s.override = positions
    try:
        yield
    finally:
        for s, old in zip(targets, previous):
            s.override = old
