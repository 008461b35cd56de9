"""Swap timm ViTs' position encoding for LieRE (or a RoPE baseline) in one call.

    import timm
    from liere.integrations.timm import convert_vit

    model = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True)
    model = convert_vit(model, "liere", block_size=8)   # qkv/proj weights kept

Works on ``timm.models.vision_transformer.VisionTransformer`` (CLS and register prefix tokens)
and on timm's RoPE ViTs (``timm.models.eva.Eva``: EVA-02, ``vit_*_rope_*``, with fused or
separate q/k/v projections), replacing each block's attention by a ``RotaryAttention``
subclass. The positions are the patch grid (``grid_positions(H, W, reference=training grid)``),
read from the patch embedding's output on every forward, so ``dynamic_img_size=True`` models
take other image sizes. timm's own RoPE is switched off and, unless ``keep_absolute=True``,
the learned absolute embedding too (the paper compares encodings, not their sum).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..attention import RotaryAttention
from ..encodings import RotaryEncoding
from ..models import ROTARY, layer_encoding
from ..positions import augment_positions, grid_positions

__all__ = ["convert_vit", "TimmRotaryAttention"]


class _GridContext:
    """Shared by a converted model's attentions: the current patch grid and its positions."""

    def __init__(
        self, reference: tuple[int, ...], augment: Optional[dict[str, Any]] = None
    ) -> None:
        self.reference = reference
        self.augment = dict(augment or {})
        self.grid: Optional[tuple[int, ...]] = None
        self._cache: dict[tuple[Any, ...], Tensor] = {}
        self._draw = False  # augment this forward's positions (training only)
        self._drawn: Optional[Tensor] = None

    def record(self, grid: tuple[int, ...], training: bool) -> None:
        """A new forward on ``grid``: one augmentation draw for all its layers, if training."""
        self.grid = grid
        self._draw = training and bool(self.augment)
        self._drawn = None

    def positions(self, device: torch.device) -> Tensor:
        if self.grid is None:
            raise RuntimeError(
                "no patch grid recorded: the converted attention must run inside the model's "
                "forward (the patch embedding records the grid)."
            )
        key = (self.grid, device)
        if key not in self._cache:
            self._cache[key] = grid_positions(*self.grid, reference=self.reference, device=device)
        if not self._draw:
            return self._cache[key]
        if self._drawn is None or self._drawn.device != device:
            self._drawn = augment_positions(self._cache[key], **self.augment)
        return self._drawn

    def __getstate__(self) -> dict[str, Any]:
        # the positions are recomputed from the grid: a pickled or saved model carries none
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["_drawn"] = None
        return state


class _TimmRope(nn.Module):
    """timm's own RoPE, kept when the swapped-in encoding is disabled (pos_enc=None on a
    RoPE ViT): called as an encoding with timm's ``rope`` tensor in place of positions."""

    def __init__(self, rotate_half: bool) -> None:
        super().__init__()
        self.rotate_half = rotate_half

    def forward(self, q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        from timm.layers import apply_rot_embed_cat

        return (
            apply_rot_embed_cat(q, rope, half=self.rotate_half).type_as(q),
            apply_rot_embed_cat(k, rope, half=self.rotate_half).type_as(k),
        )


class TimmRotaryAttention(RotaryAttention):
    """``RotaryAttention`` with timm's call signature ``(x, rope=None, attn_mask=None,
    is_causal=False)``; positions come from the model's patch grid (timm's ``rope`` argument
    is ignored: the swapped-in encoding replaces it)."""

    def __init__(self, *args: Any, context: _GridContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._context = context

    def forward(
        self,
        x: Tensor,
        rope: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        if isinstance(self.pos_enc, _TimmRope):
            positions = rope
        elif self.pos_enc is not None:
            positions = self._context.positions(x.device)
        else:
            positions = None
        return super().forward(x, positions, attn_mask=attn_mask, is_causal=is_causal)


def _fused_qkv(attn: Any, dim: int, attn_dim: int) -> tuple[Tensor, Optional[Tensor]]:
    """qkv weight (3 * attn_dim, dim) and bias from timm Attention or EvaAttention."""
    if getattr(attn, "qkv", None) is not None:
        weight = attn.qkv.weight
        bias = attn.qkv.bias
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is not None:  # Eva: separate q/v biases, k bias fixed at zero
            k_bias = getattr(attn, "k_bias", None)
            k_bias = torch.zeros_like(q_bias) if k_bias is None else k_bias
            bias = torch.cat((q_bias, k_bias, attn.v_bias))
        return weight, bias
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    weight = torch.cat((q.weight, k.weight, v.weight))
    biases = [m.bias if m.bias is not None else None for m in (q, k, v)]
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat(
        [b if b is not None else torch.zeros(attn_dim, dtype=weight.dtype) for b in biases]
    )
    return weight, bias


def _convert_attention(
    attn: Any, pos_enc: Optional[nn.Module], prefix: int, context: _GridContext
) -> TimmRotaryAttention:
    if getattr(attn, "gate", None) is not None:
        raise ValueError("gated timm attention (gated=True) is not supported by convert_vit.")
    num_heads, head_dim = attn.num_heads, attn.head_dim
    proj: Any = attn.proj
    dim = proj.out_features
    attn_dim = num_heads * head_dim
    if attn_dim != dim or proj.in_features != dim:
        raise ValueError(
            f"convert_vit needs num_heads * head_dim == dim; got {num_heads} x {head_dim} "
            f"for dim {dim}."
        )
    weight, bias = _fused_qkv(attn, dim, attn_dim)
    ref = weight
    new = TimmRotaryAttention(
        dim,
        num_heads,
        pos_enc=pos_enc,
        num_prefix_tokens=prefix,
        qkv_bias=bias is not None,
        attn_drop=float(attn.attn_drop.p),
        proj_drop=float(attn.proj_drop.p),
        context=context,
        device=ref.device,
        dtype=ref.dtype,
    )
    with torch.no_grad():
        new.qkv.weight.copy_(weight)
        if bias is not None:
            new.qkv.bias.copy_(bias)
        new.proj.weight.copy_(proj.weight)
        if proj.bias is not None:
            new.proj.bias.copy_(proj.bias)
        else:
            new.proj.bias = None  # type: ignore[assignment]
    new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
    new.norm = getattr(attn, "norm", nn.Identity())
    if isinstance(pos_enc, RotaryEncoding):
        pos_enc.to(device=ref.device)
    return new


def convert_vit(
    model: nn.Module,
    pos_enc: Union[str, RotaryEncoding, None] = "liere",
    *,
    block_size: int = 8,
    keep_absolute: Optional[bool] = None,
    position_augment: Optional[dict[str, Any]] = None,
    **pos_enc_kwargs: Any,
) -> nn.Module:
    """Give a timm ViT ``RotaryAttention`` with one of liere's encodings, in place.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (2D patch grid).
        pos_enc: ``"liere"``, ``"rope-mixed"``, ``"rope-axial"``, ``"comrope-ap"``,
            ``"comrope-ld"``, ``"string-cayley"``, a ``RotaryEncoding`` (each block gets a
            copy) or ``None`` (no rotation: with
            ``keep_absolute=True`` the converted model computes exactly what it did).
        block_size: LieRE block size (``head_dim`` for dense LieRE).
        keep_absolute: keep the learned absolute embedding; default: keep it only when
            ``pos_enc`` is None.
        position_augment: keyword arguments of ``liere.augment_positions`` (``shift``,
            ``jitter``, ``rescale``): one draw per forward shared by every layer, in training
            only; eval sees the plain grid.
        **pos_enc_kwargs: passed to the encoding (e.g. ``num_heads=1`` to share generators
            across heads; per-head is the default).

    Every block gets its own encoding (per-layer generators). Returns ``model``.
    """
    vit: Any = model  # timm modules are untyped
    blocks = getattr(vit, "blocks", None)
    patch_embed = getattr(vit, "patch_embed", None)
    if blocks is None or patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(
            f"convert_vit expects a timm VisionTransformer or Eva (with .blocks, .patch_embed, "
            f".num_prefix_tokens); got {type(vit).__name__}."
        )
    if isinstance(pos_enc, str) and pos_enc not in ROTARY:
        raise ValueError(
            f"pos_enc must be one of {ROTARY}, a RotaryEncoding or None; got {pos_enc!r}."
        )
    augment = dict(position_augment or {})
    if set(augment) - {"shift", "jitter", "rescale"}:
        raise ValueError(
            f"position_augment takes shift, jitter and rescale (liere.augment_positions); "
            f"got {sorted(augment)}."
        )
    augment_positions(grid_positions(2, 2), **augment)  # validates the values
    patch_drop = getattr(vit, "patch_drop", None)
    if pos_enc is not None and float(getattr(patch_drop, "prob", 0.0)) > 0:
        raise ValueError(
            "patch dropout (patch_drop_rate > 0) drops tokens, so a patch grid no longer "
            "describes them; create the timm model with patch_drop_rate=0."
        )
    grid = tuple(int(g) for g in patch_embed.grid_size)
    context = _GridContext(grid, augment)
    prefix = int(vit.num_prefix_tokens)
    timm_rope = getattr(vit, "rope", None) is not None
    for block in blocks:
        attn = block.attn
        enc: Optional[nn.Module] = None
        if pos_enc is not None:
            kwargs = {"num_heads": attn.num_heads, "block_size": block_size, **pos_enc_kwargs}
            enc = layer_encoding(pos_enc, attn.head_dim, len(grid), **kwargs)
        elif timm_rope:
            enc = _TimmRope(bool(getattr(attn, "rotate_half", False)))
        block.attn = _convert_attention(attn, enc, prefix, context)

    def record_grid(module: nn.Module, args: Any, output: Tensor) -> None:
        # (B, H, W, C) with dynamic_img_size, else (B, N, C) on the fixed grid
        context.record(tuple(output.shape[1:3]) if output.dim() == 4 else grid, vit.training)

    patch_embed.register_forward_hook(record_grid)
    if getattr(vit, "rope", None) is not None and pos_enc is not None:
        vit.rope = None  # timm's RoPE is replaced, not stacked
    keep = (pos_enc is None) if keep_absolute is None else keep_absolute
    if not keep and getattr(vit, "pos_embed", None) is not None:
        vit.pos_embed = None
    vit.liere_pos_enc = pos_enc if pos_enc is None or isinstance(pos_enc, str) else "module"
    return model
