"""A small reference Vision Transformer for 2D images and 3D volumes/clips.

Every block owns its own position encoding (truly per-layer generators/frequencies; the
paper's official code accidentally reuses layer 0's).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import RotaryAttention
from .commuting import CayleySTRING, ComRoPE
from .encodings import AxialRoPE, LieRE, MixedRoPE, RotaryEncoding
from .positions import augment_positions, grid_positions

__all__ = ["VisionTransformer", "Block", "POS_ENCODINGS", "make_pos_enc", "layer_encoding"]

POS_ENCODINGS = (
    "none",
    "absolute",
    "rope-axial",
    "rope-mixed",
    "liere",
    "comrope-ap",
    "comrope-ld",
    "string-cayley",
)
ROTARY = POS_ENCODINGS[2:]


def make_pos_enc(
    name: str, head_dim: int, num_axes: int, **kwargs: Any
) -> Optional[RotaryEncoding]:
    """The rotary encoding one attention layer uses for ``name`` (None for none/absolute).

    ``kwargs`` go to the encoding's constructor; ``num_heads`` and ``block_size`` are dropped
    where the encoding has no such option (AxialRoPE is shared by all heads; LieRE and ComRoPE
    have blocks).
    """
    if name in ("none", "absolute"):
        return None
    if name == "rope-axial":
        kwargs.pop("num_heads", None)
        kwargs.pop("block_size", None)
        return AxialRoPE(head_dim, num_axes, **kwargs)
    if name == "rope-mixed":
        kwargs.pop("block_size", None)
        return MixedRoPE(head_dim, num_axes, **kwargs)
    if name == "liere":
        return LieRE(head_dim, num_axes, **kwargs)
    if name in ("comrope-ap", "comrope-ld"):
        return ComRoPE(head_dim, num_axes, variant=name[-2:], **kwargs)
    if name == "string-cayley":
        kwargs.pop("block_size", None)
        return CayleySTRING(head_dim, num_axes, **kwargs)
    raise ValueError(f"pos_enc must be one of {POS_ENCODINGS}; got {name!r}.")


def layer_encoding(
    pos_enc: Union[str, RotaryEncoding, None], head_dim: int, num_axes: int, **kwargs: Any
) -> Optional[RotaryEncoding]:
    """One layer's encoding for the converters: a fresh one from a name (``make_pos_enc``),
    a deep copy of a given ``RotaryEncoding`` (so every layer gets its own), or None."""
    if pos_enc is None:
        return None
    if isinstance(pos_enc, RotaryEncoding):
        if pos_enc.head_dim != head_dim or pos_enc.num_axes != num_axes:
            raise ValueError(
                f"the given encoding has head_dim={pos_enc.head_dim}, num_axes="
                f"{pos_enc.num_axes}; this model's layers need head_dim={head_dim}, "
                f"num_axes={num_axes}."
            )
        return copy.deepcopy(pos_enc)
    if pos_enc not in ROTARY:
        raise ValueError(
            f"pos_enc must be one of {ROTARY}, a RotaryEncoding or None; got {pos_enc!r}."
        )
    return make_pos_enc(pos_enc, head_dim, num_axes, **kwargs)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x)); x + mlp(norm(x))``.

    Shape:
        x ``(b, prefix + n, dim)``, positions ``(n, a)`` or ``(b, n, a)``, attn_mask as
        ``RotaryAttention`` takes it -> same as x
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        pos_enc: Optional[nn.Module] = None,
        num_prefix_tokens: int = 1,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RotaryAttention(
            dim,
            num_heads,
            pos_enc=pos_enc,
            num_prefix_tokens=num_prefix_tokens,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(
        self, x: Tensor, positions: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, attn_mask)
        return x + self.mlp(self.norm2(x))


def _tuple(value: Union[int, Sequence[int]], name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    values = tuple(value)  # type: ignore[arg-type]
    if len(values) not in (2, 3) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        raise ValueError(
            f"{name} must be an int or a 2-tuple (image) / 3-tuple (volume, clip) of positive "
            f"ints; got {value!r}."
        )
    return values


GRID_SCALINGS = ("extend", "rescale")


def _check_grid_scaling(value: str) -> None:
    if value not in GRID_SCALINGS:
        raise ValueError(
            f"grid_scaling must be 'extend' (keep the training grid's spacing) or 'rescale' "
            f"(every grid on [0, 1]); got {value!r}."
        )


class VisionTransformer(nn.Module):
    """ViT with pre-norm blocks and a CLS token (or mean pooling); 2D images or 3D volumes/clips.

    Positions are ``grid_positions(*grid, reference=training_grid)``: each axis spans [0, 1]
    at ``image_size // patch_size`` and extends proportionally for larger inputs (the paper's
    convention, ``grid_scaling="extend"``); ``grid_scaling="rescale"`` puts every grid on
    [0, 1] instead (the spacing shrinks on larger grids). The ``"absolute"`` embedding is
    learned at the training grid and resized (bilinear / trilinear) for other grids.

    Args:
        image_size, patch_size: int (square image) or 2-tuple ``(H, W)`` or 3-tuple
            ``(D, H, W)``; every size must be divisible by its patch size.
        num_classes: output logits (0 returns the pooled features).
        in_channels, dim, depth, num_heads, mlp_ratio: the usual.
        pos_enc: ``"none"``, ``"absolute"``, ``"rope-axial"``, ``"rope-mixed"``, ``"liere"``,
            ``"comrope-ap"``, ``"comrope-ld"`` or ``"string-cayley"``.
        block_size: LieRE / ComRoPE block size (8 is LieRE_8; ``dim // num_heads`` is dense).
        position_augment: keyword arguments of ``liere.augment_positions`` (``shift``,
            ``jitter``, ``rescale``): DINOv3-style coordinate augmentation, applied in
            training only (one draw per forward, shared by the batch); eval sees the plain
            grid.
        pos_enc_kwargs: extra keyword arguments for the encoding (e.g. ``num_heads=1`` to share
            LieRE generators across heads, ``max_freq`` for RoPE).
        drop_rate, attn_drop_rate: dropout.
        pool: ``"cls"`` (default: a CLS token, left unrotated, read out) or ``"mean"`` (no CLS
            token; the mean of the final tokens). With ``"cls"`` the CLS query meets
            rotated keys, so even an exactly relative encoding gives the read-out a view of
            absolute positions; with ``"mean"`` every attention score of an exactly
            relative encoding depends on offsets only.
        grid_scaling: ``"extend"`` (default) or ``"rescale"``: the rotary encodings'
            coordinates on grids other than the training grid (see above). An attribute, so
            one trained model can be evaluated both ways. The absolute embedding is always
            resized to the grid.

    Shape:
        x ``(b, in_channels, *spatial)`` with ``len(spatial) == len(image_size)`` and each
        spatial size divisible by its patch size -> ``(b, num_classes)``
    """

    def __init__(
        self,
        image_size: Union[int, Sequence[int]],
        patch_size: Union[int, Sequence[int]],
        num_classes: int,
        *,
        in_channels: int = 3,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        pos_enc: str = "liere",
        block_size: int = 8,
        pos_enc_kwargs: Optional[dict[str, Any]] = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        position_augment: Optional[dict[str, Any]] = None,
        grid_scaling: str = "extend",
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(
                f"pool must be 'cls' (a CLS token) or 'mean' (average of the tokens); got {pool!r}."
            )
        self.pool = pool
        _check_grid_scaling(grid_scaling)
        self.grid_scaling = grid_scaling
        if pos_enc not in POS_ENCODINGS:
            raise ValueError(f"pos_enc must be one of {POS_ENCODINGS}; got {pos_enc!r}.")
        image = _tuple(image_size, "image_size")
        if isinstance(patch_size, int) and not isinstance(patch_size, bool):
            patch = (patch_size,) * len(image)
        else:
            patch = _tuple(patch_size, "patch_size")
        if len(patch) != len(image):
            raise ValueError(f"patch_size {patch} must have as many axes as image_size {image}.")
        if any(i % p for i, p in zip(image, patch)):
            raise ValueError(f"image_size {image} must be divisible by patch_size {patch}.")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        augment: dict[str, Any] = dict(position_augment or {})
        unknown = set(augment) - {"shift", "jitter", "rescale"}
        if unknown:
            raise ValueError(
                f"position_augment takes shift, jitter and rescale (liere.augment_positions); "
                f"got {sorted(unknown)}."
            )
        augment_positions(grid_positions(2, 2), **augment)  # validates the values
        self.position_augment = augment
        self.image_size = image
        self.patch_size = patch
        self.grid_size = tuple(i // p for i, p in zip(image, patch))
        self.num_axes = len(image)
        self.in_channels = in_channels
        self.dim = dim
        self.num_classes = num_classes
        self.pos_enc = pos_enc
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        head_dim = dim // num_heads

        conv = nn.Conv2d if self.num_axes == 2 else nn.Conv3d
        self.patch_embed = conv(in_channels, dim, kernel_size=patch, stride=patch)  # type: ignore[arg-type]
        self.cls_token: Optional[nn.Parameter] = None
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed: Optional[nn.Parameter] = None
        if pos_enc == "absolute":
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid_size), dim))
        self.pos_drop = nn.Dropout(drop_rate)
        kwargs = {"num_heads": num_heads, "block_size": block_size, **(pos_enc_kwargs or {})}
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                pos_enc=make_pos_enc(pos_enc, head_dim, self.num_axes, **kwargs),
                num_prefix_tokens=self.num_prefix_tokens,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @property
    def uses_rotary(self) -> bool:
        return self.pos_enc in ROTARY

    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does (e.g. after meta-device
        construction and ``to_empty``): each submodule's own ``reset_parameters`` (layer
        norms, convolutions, encodings), then the ViT's truncated-normal init."""
        for module in self.modules():
            reset = getattr(module, "reset_parameters", None)
            if module is not self and callable(reset):
                reset()
        self._init_weights()

    def _init_weights(self) -> None:
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def grid_for(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Patch grid of an input with these spatial sizes (validated)."""
        if len(spatial) != self.num_axes:
            kind = "(B, C, H, W)" if self.num_axes == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"this model takes {self.num_axes}-D inputs {kind}; got {len(spatial)} spatial "
                f"dims {tuple(spatial)}."
            )
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(
                f"input spatial size {tuple(spatial)} must be divisible by patch_size "
                f"{self.patch_size}."
            )
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def positions_for(self, grid: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
        """Token coordinates for a patch grid, with the training grid as reference.

        Shape:
            ``(prod(grid), num_axes)``
        """
        _check_grid_scaling(self.grid_scaling)
        reference = self.grid_size if self.grid_scaling == "extend" else None
        return grid_positions(*grid, reference=reference, device=device)

    def absolute_embedding(self, grid: Sequence[int]) -> Tensor:
        """The learned absolute embedding, resized to ``grid`` when it differs.

        Shape:
            ``(1, prod(grid), dim)``
        """
        assert self.pos_embed is not None
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.pos_embed
        mode = "bilinear" if self.num_axes == 2 else "trilinear"
        table = self.pos_embed.reshape(1, *self.grid_size, self.dim).movedim(-1, 1)
        table = F.interpolate(table, size=grid, mode=mode, align_corners=False)
        return table.movedim(1, -1).reshape(1, math.prod(grid), self.dim)

    def forward_features(self, x: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """Tokens after the last block and norm (CLS first, when ``pool="cls"``).

        ``x`` may be a list of images of different sizes (variable resolution): each is
        embedded at its own grid with its own positions, tokens are padded to the longest
        sequence, and padded tokens are masked out as keys, so they never change the others;
        their own outputs are meaningless (see ``token_mask``).

        Shape:
            x ``(b, c, *spatial)`` -> ``(b, P + prod(grid), dim)``; or a list of ``b`` tensors
            ``(c, *spatial_i)`` -> ``(b, P + max_i prod(grid_i), dim)``, with ``P`` the
            ``num_prefix_tokens`` (1 with a CLS token, else 0)
        """
        if not isinstance(x, Tensor):
            return self._forward_variable(list(x))
        if x.dim() < 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (batch, {self.in_channels}, *spatial); got {tuple(x.shape)}."
            )
        grid = self.grid_for(x.shape[2:])
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # b n dim
        if self.pos_embed is not None:
            tokens = tokens + self.absolute_embedding(grid).to(tokens.dtype)
        if self.cls_token is not None:
            cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat((cls, tokens), dim=1)
        tokens = self.pos_drop(tokens)
        positions = self.positions_for(grid, device=x.device) if self.uses_rotary else None
        if positions is not None and self.training and self.position_augment:
            positions = augment_positions(positions, **self.position_augment)
        for block in self.blocks:
            tokens = block(tokens, positions)
        return self.norm(tokens)

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        features = self.forward_features(x)
        if self.pool == "cls":
            return self.head(features[:, 0])
        if isinstance(x, Tensor):
            return self.head(features.mean(dim=1))
        mask = self.token_mask(list(x)).unsqueeze(-1).to(features.dtype)
        return self.head((features * mask).sum(dim=1) / mask.sum(dim=1))

    def token_mask(self, images: Sequence[Tensor]) -> Tensor:
        """Which tokens of ``forward_features(images)`` are real (CLS included) and which are
        padding, for a list of images of different sizes.

        Shape:
            ``(b, P + max_i prod(grid_i))`` (bool), ``P`` the ``num_prefix_tokens``
        """
        prefix = self.num_prefix_tokens
        counts = [prefix + math.prod(self.grid_for(img.shape[1:])) for img in images]
        device = images[0].device
        index = torch.arange(max(counts), device=device)
        return index.unsqueeze(0) < torch.tensor(counts, device=device).unsqueeze(1)

    def _forward_variable(self, images: Sequence[Tensor]) -> Tensor:
        if len(images) == 0:
            raise ValueError("forward takes a batch tensor or a non-empty list of images.")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 1 + self.num_axes:
                kind = "(C, H, W)" if self.num_axes == 2 else "(C, D, H, W)"
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(
                    f"a list input holds one image {kind} per sample, without a batch dim; "
                    f"item {i} has shape {shape}."
                )
            if img.shape[0] != self.in_channels:
                raise ValueError(
                    f"item {i} has {img.shape[0]} channels; this model takes {self.in_channels}."
                )
        grids = [self.grid_for(img.shape[1:]) for img in images]
        sequences, coordinates = [], []
        for img, grid in zip(images, grids):
            tokens = self.patch_embed(img.unsqueeze(0)).flatten(2).transpose(1, 2)[0]  # n dim
            if self.pos_embed is not None:
                tokens = tokens + self.absolute_embedding(grid)[0].to(tokens.dtype)
            sequences.append(tokens)
            if self.uses_rotary:
                positions = self.positions_for(grid, device=img.device)
                if self.training and self.position_augment:  # one draw per image
                    positions = augment_positions(positions, **self.position_augment)
                coordinates.append(positions)
        mask = self.token_mask(images)  # (b, P + N)
        tokens = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # b N dim
        if self.cls_token is not None:
            cls = self.cls_token.expand(len(images), -1, -1).to(tokens.dtype)
            tokens = torch.cat((cls, tokens), dim=1)
        tokens = self.pos_drop(tokens)
        positions_b: Optional[Tensor] = None
        if coordinates:
            positions_b = torch.nn.utils.rnn.pad_sequence(coordinates, batch_first=True)
        attn_mask = mask[:, None, None, :]  # padded tokens are never attended to
        for block in self.blocks:
            tokens = block(tokens, positions_b, attn_mask)
        return self.norm(tokens)

    def rotary_encodings(self) -> list[RotaryEncoding]:
        """The rotary encoding of every block (empty for none/absolute)."""
        encodings = [block.attn.pos_enc for block in self.blocks]  # type: ignore[union-attr]
        return [e for e in encodings if isinstance(e, RotaryEncoding)]

    def freeze_rotations(self, grid: Optional[Sequence[int]] = None) -> VisionTransformer:
        """Precompute every block's rotations for inputs of one patch grid (default: the
        training grid), for inference and export (ONNX has no matrix-exponential operator).
        Inputs of other sizes still work, computing their rotations as usual."""
        device = self.patch_embed.weight.device
        positions = self.positions_for(grid or self.grid_size, device=device)
        for enc in self.rotary_encodings():
            enc.freeze(positions)
        return self

    def unfreeze_rotations(self) -> VisionTransformer:
        for enc in self.rotary_encodings():
            enc.unfreeze()
        return self

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, "
            f"grid={self.grid_size}, pos_enc={self.pos_enc!r}, pool={self.pool!r}"
        )
