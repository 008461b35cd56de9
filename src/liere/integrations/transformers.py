"""Swap Hugging Face vision transformers' position encodings for liere's, in place.

``convert_model(model, "liere", block_size=8)`` gives every layer of a ``ViTModel``,
``Dinov2Model`` or ``DINOv3ViTModel`` (or a model wrapping one, e.g. ``...ForImageClassification``)
its own rotary encoding, keeping every weight (the attention's ``q_proj``/``k_proj``/``v_proj``/
``o_proj`` stay the same modules, under the same state_dict keys). CLS and register tokens
stay unrotated; positions follow the input's patch grid (``grid_positions`` with the
configured image size as reference), so other image sizes work. With an encoding, the model's
own RoPE (DINOv3) or absolute embedding (ViT, Dinov2) is switched off; DINOv3's coordinate
augmentation settings (``pos_embed_shift``, ``pos_embed_jitter``, ``pos_embed_rescale``) map
to ``liere.augment_positions`` in training. With ``pos_enc=None`` the converted model computes
exactly what the original did, its own RoPE or absolute embedding included.

Needs ``transformers`` (``pip install 'liere[transformers]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..encodings import RotaryEncoding
from ..models import ROTARY, layer_encoding
from ..positions import augment_positions, grid_positions

__all__ = ["HFRotaryAttention", "convert_model"]

SUPPORTED = ("ViTModel", "Dinov2Model", "DINOv3ViTModel")


class _Grid:
    """Shared by a converted model's attentions: the current input's patch grid (recorded by
    a pre-hook on the embeddings) and its positions."""

    def __init__(self, reference: tuple[int, int], augment: dict[str, Any]) -> None:
        self.reference = reference
        self.augment = augment
        self.grid = reference
        self.training = False
        self._positions: Optional[Tensor] = None

    def record(self, grid: tuple[int, int], training: bool) -> None:
        self.grid, self.training, self._positions = grid, training, None

    def positions(self, device: torch.device) -> Tensor:
        if self._positions is None or self._positions.device != device:
            positions = grid_positions(*self.grid, reference=self.reference, device=device)
            if self.training and self.augment:  # one draw per forward, shared by the layers
                positions = augment_positions(positions, **self.augment)
            self._positions = positions
        return self._positions


class HFRotaryAttention(nn.Module):
    """A Hugging Face ``q_proj / k_proj / v_proj / o_proj`` attention (ViT, Dinov2, DINOv3)
    with a liere encoding on q and k; the same call and return as the module it replaces,
    computed through the model's configured attention implementation."""

    def __init__(
        self,
        original: Any,
        pos_enc: Optional[nn.Module],
        num_prefix_tokens: int,
        grid: _Grid,
    ) -> None:
        super().__init__()
        self.q_proj: nn.Module = original.q_proj
        self.k_proj: nn.Module = original.k_proj
        self.v_proj: nn.Module = original.v_proj
        self.o_proj: nn.Module = original.o_proj
        self.config: Any = original.config
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.is_causal = False
        self.attention_dropout = float(
            getattr(original, "attention_dropout", getattr(original, "dropout", 0.0))
        )
        self.pos_enc = pos_enc
        self.num_prefix_tokens = num_prefix_tokens
        self._grid = grid
        module = sys.modules[type(original).__module__]
        self._eager: Callable[..., Any] = module.eager_attention_forward
        self._own_rope: Optional[Callable[..., Any]] = getattr(module, "apply_rotary_pos_emb", None)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Optional[Tensor]]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.pos_enc is not None:
            positions = self._grid.positions(hidden_states.device)
            q, k = self.pos_enc(q, k, positions, num_prefix_tokens=self.num_prefix_tokens)
        elif position_embeddings is not None and self._own_rope is not None:
            q, k = self._own_rope(q, k, *position_embeddings)  # DINOv3's own RoPE, unchanged
        attention: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._eager
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(b, n, -1).contiguous()), weights


def _backbone(model: nn.Module) -> nn.Module:
    if type(model).__name__ in SUPPORTED:
        return model
    for child in model.modules():
        if type(child).__name__ in SUPPORTED:
            return child
    raise ValueError(
        f"convert_model expects a Hugging Face {', '.join(SUPPORTED)} (or a model holding "
        f"one); got {type(model).__name__}."
    )


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def convert_model(
    model: nn.Module,
    pos_enc: Union[str, RotaryEncoding, None] = "liere",
    *,
    block_size: int = 8,
    position_augment: Optional[dict[str, float]] = None,
    **pos_enc_kwargs: Any,
) -> nn.Module:
    """Give every layer of a Hugging Face ViT / Dinov2 / DINOv3 model its own liere encoding,
    in place (see the module docstring).

    Args:
        model: ``ViTModel``, ``Dinov2Model``, ``DINOv3ViTModel``, or a model holding one.
        pos_enc: a liere encoding name (``"liere"``, ``"rope-axial"``, ``"rope-mixed"``,
            ``"comrope-ap"``, ``"comrope-ld"``, ``"string-cayley"``) or None (the original
            computation, its own position encoding kept).
        block_size: LieRE / ComRoPE block size.
        position_augment: ``liere.augment_positions`` keywords for training; default for
            DINOv3: its configured shift (halved: DINOv3's coordinates span [-1, 1], liere's
            training grid spans 1), jitter and rescale.
        **pos_enc_kwargs: passed to the encoding (per-head by default).

    Returns ``model``.
    """
    if isinstance(pos_enc, str) and pos_enc not in ROTARY:
        raise ValueError(
            f"pos_enc must be one of {ROTARY}, a RotaryEncoding or None; got {pos_enc!r}."
        )
    backbone: Any = _backbone(model)
    config = backbone.config
    kind = type(backbone).__name__
    patch = _pair(config.patch_size)
    size = _pair(config.image_size)
    reference = (size[0] // patch[0], size[1] // patch[1])
    augment: dict[str, Any] = dict(position_augment or {})
    if not augment and kind == "DINOv3ViTModel":
        for key, name, scale in (
            ("shift", "pos_embed_shift", 0.5),
            ("jitter", "pos_embed_jitter", 1.0),
            ("rescale", "pos_embed_rescale", 1.0),
        ):
            value = getattr(config, name, None)
            if value is not None:
                augment[key] = float(value) * scale
    augment_positions(grid_positions(2, 2), **augment)  # validates
    grid = _Grid(reference, augment)
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    targets = [
        (parent, name, child)
        for parent in backbone.modules()
        for name, child in parent.named_children()
        if all(hasattr(child, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
    ]
    if not targets:
        raise ValueError(f"convert_model found no q/k/v/o attention in this {kind}.")
    for parent, name, attention in targets:  # one encoding per layer
        heads = config.num_attention_heads
        kwargs = {"num_heads": heads, "block_size": block_size, **pos_enc_kwargs}
        enc = layer_encoding(pos_enc, attention.head_dim, 2, **kwargs)
        if enc is not None:
            enc.to(device=attention.q_proj.weight.device)
        setattr(parent, name, HFRotaryAttention(attention, enc, prefix, grid))

    def record(module: nn.Module, args: Any, kwargs: Any) -> None:
        pixel_values = args[0] if args else kwargs["pixel_values"]
        h, w = pixel_values.shape[-2:]
        grid.record((h // patch[0], w // patch[1]), backbone.training)

    backbone.embeddings.register_forward_pre_hook(record, with_kwargs=True)
    table = getattr(backbone.embeddings, "position_embeddings", None)
    if pos_enc is not None and isinstance(table, nn.Parameter):
        # ViT and Dinov2 add the absolute table (interpolated at other sizes): a frozen zero
        # table switches it off and keeps the state_dict's keys. DINOv3's RoPE reaches the
        # attentions as position_embeddings, which they ignore when they have an encoding.
        backbone.embeddings.position_embeddings = nn.Parameter(
            torch.zeros_like(table), requires_grad=False
        )
    backbone.liere_pos_enc = pos_enc if pos_enc is None or isinstance(pos_enc, str) else "module"
    return model
