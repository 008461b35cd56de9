import numpy as np
import pytest
import torch

from liere import tasks
from liere.experiments import TrainConfig, evaluate, predict, train
from liere.models import VisionTransformer
from liere.tasks import (
    GLYPH,
    arrow_spatial,
    balanced_labels,
    mnist_digits,
    moving_digits,
    relative_direction,
    resize,
    shuffle_patches,
)


def test_balanced_labels():
    labels = balanced_labels(103, 4, np.random.default_rng(0))
    assert np.bincount(labels).tolist() == [26, 26, 26, 25]


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: arrow_spatial(40, seed=seed),
        lambda seed: relative_direction(40, seed=seed),
        lambda seed: moving_digits("train", 40, seed=seed),
        lambda seed: mnist_digits("train", seed=seed),
    ],
    ids=["spatial", "relational", "video", "mnist"],
)
def test_deterministic_by_seed_and_balanced(make):
    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    counts = torch.bincount(a.labels, minlength=a.num_classes)
    assert counts.max() - counts.min() <= 1
    assert a.inputs.dtype == torch.float32 and 0 <= a.inputs.min() and a.inputs.max() <= 1


def test_mnist_split_is_fixed_disjoint_and_stratified():
    train_set, test_set = mnist_digits("train"), mnist_digits("test")
    assert len(train_set) == 4000 and len(test_set) == 1000
    assert torch.bincount(test_set.labels).tolist() == [100] * 10
    assert train_set.inputs.shape[1:] == (1, 24, 24)
    # the test split is the same set of digits whatever the seed
    other = mnist_digits("test", seed=5)
    key = lambda d: sorted(d.inputs.flatten(1).sum(1).tolist())  # noqa: E731
    assert key(other) == key(test_set)
    train_images = {bytes(x.numpy().tobytes()) for x in train_set.inputs}
    assert not any(bytes(x.numpy().tobytes()) in train_images for x in test_set.inputs)
    with pytest.raises(ValueError, match="split must be"):
        mnist_digits("val")


def _points_at(cell, direction, target):
    """The task's rule, written out: the arrow at ``cell`` shares the target's row or column
    and its step ``DIRECTIONS[direction]`` leads towards it."""
    dr, dc = tasks.DIRECTIONS[direction]
    rr, cc = target[0] - cell[0], target[1] - cell[1]
    return (rr == 0 and dr == 0 and cc * dc > 0) or (cc == 0 and dc == 0 and rr * dr > 0)


def _decode_board(image):
    """Map cell -> glyph name for a noise-free board."""
    grid = image.shape[-1] // GLYPH
    names = {}
    arrows = {tuple(a.flatten()): d for d, a in enumerate(tasks.ARROW_GLYPHS)}
    for r in range(grid):
        for c in range(grid):
            cell = image[r * GLYPH : (r + 1) * GLYPH, c * GLYPH : (c + 1) * GLYPH].numpy()
            key = tuple(cell.flatten())
            if key in arrows:
                names[(r, c)] = ("arrow", arrows[key])
            elif np.array_equal(cell, tasks.TARGET_GLYPH):
                names[(r, c)] = ("target", None)
            elif cell.any():
                names[(r, c)] = ("letter", None)
    return names


@pytest.mark.parametrize("grid", [8, 12])
def test_spatial_label_is_quadrant_of_the_only_arrow_pointing_at_target(grid):
    data = arrow_spatial(60, grid=grid, noise=0.0, seed=3)
    assert data.inputs.shape == (60, 1, GLYPH * grid, GLYPH * grid)
    for image, label in zip(data.inputs[:, 0], data.labels.tolist()):
        board = _decode_board(image)
        (target,) = [cell for cell, (kind, _) in board.items() if kind == "target"]
        pointing = [
            cell
            for cell, (kind, d) in board.items()
            if kind == "arrow" and _points_at(cell, d, target)
        ]
        assert len(pointing) == 1
        (r, c), half = pointing[0], grid // 2
        assert label == 2 * (r >= half) + (c >= half)
        assert sum(kind == "arrow" for kind, _ in board.values()) == 5
        assert sum(kind == "letter" for kind, _ in board.values()) == 3


# the relational task's glyphs as its docstring describes them: a ringed square and a plus
RING = np.ones((5, 5), dtype=np.float32)
RING[1:4, 1:4] = 0
RING[2, 2] = 1
PLUS = np.zeros((5, 5), dtype=np.float32)
PLUS[2, :] = 1
PLUS[:, 2] = 1


@pytest.mark.parametrize("grid", [8, 12, 16])
def test_relational_label_is_the_dominant_direction_from_anchor_to_probe(grid):
    data = relative_direction(200, grid=grid, noise=0.0, seed=4)
    assert data.inputs.shape == (200, 1, GLYPH * grid, GLYPH * grid)
    offsets = set()
    for image, label in zip(data.inputs[:, 0].numpy(), data.labels.tolist()):
        cells = {
            (r, c): image[r * GLYPH : (r + 1) * GLYPH, c * GLYPH : (c + 1) * GLYPH]
            for r in range(grid)
            for c in range(grid)
        }
        (anchor,) = [k for k, v in cells.items() if np.array_equal(v, RING)]
        (probe,) = [k for k, v in cells.items() if np.array_equal(v, PLUS)]
        others = [k for k, v in cells.items() if v.any() and k not in (anchor, probe)]
        assert len(others) == 4
        dr, dc = probe[0] - anchor[0], probe[1] - anchor[1]
        assert 1 <= max(abs(dr), abs(dc)) <= 3 and abs(dr) != abs(dc)
        if abs(dc) > abs(dr):
            expected = 0 if dc > 0 else 2
        else:
            expected = 3 if dr > 0 else 1
        assert label == expected
        offsets.add((dr, dc))
    # the same offsets at every size: 4 directions x (1 + 3 + 5) offsets each
    assert len(offsets) == 36 if grid >= 12 else len(offsets) > 30


def test_relational_pairs_sit_anywhere_on_larger_boards():
    data = relative_direction(400, grid=16, noise=0.0, seed=5)
    ring_rows = []
    for image in data.inputs[:, 0].numpy():
        for r in range(16):
            for c in range(16):
                if np.array_equal(
                    image[r * GLYPH : (r + 1) * GLYPH, c * GLYPH : (c + 1) * GLYPH], RING
                ):
                    ring_rows.append(r)
    assert min(ring_rows) == 0 and max(ring_rows) == 15


def test_relational_errors():
    with pytest.raises(ValueError, match="max_offset must be >= 1"):
        relative_direction(4, max_offset=0)
    with pytest.raises(ValueError, match="at least max_offset"):
        relative_direction(4, grid=3, max_offset=3)
    with pytest.raises(ValueError, match="too many items"):
        relative_direction(4, grid=4, letters=20)


def test_spatial_errors():
    with pytest.raises(ValueError, match="even number >= 4"):
        arrow_spatial(4, grid=5)
    with pytest.raises(ValueError, match="too many items"):
        arrow_spatial(4, grid=4, distractor_arrows=10, letters=10)


def test_moving_digit_moves_in_the_labelled_direction():
    data = moving_digits("test", 40, seed=1)
    assert data.inputs.shape == (40, 1, 8, 16, 16)
    rows = torch.arange(16.0).view(16, 1)
    cols = torch.arange(16.0).view(1, 16)
    for clip, label in zip(data.inputs[:, 0], data.labels.tolist()):
        mass = clip.sum((-1, -2))
        assert (mass > 0).all()  # the digit never leaves the frame entirely
        r = (clip * rows).sum((-1, -2)) / mass
        c = (clip * cols).sum((-1, -2)) / mass
        dr, dc = float(r[-1] - r[0]), float(c[-1] - c[0])
        expected = {0: (0, 1), 1: (-1, 0), 2: (0, -1), 3: (1, 0)}[label]
        assert np.sign(round(dr, 3)) == expected[0] and np.sign(round(dc, 3)) == expected[1]


def test_moving_digits_use_disjoint_digits_for_train_and_test():
    train_digits = mnist_digits("train", size=8).inputs.flatten(1)
    test_digits = mnist_digits("test", size=8).inputs.flatten(1)
    assert train_digits.shape[0] + test_digits.shape[0] == 5000


def test_resize_images_and_clips():
    assert resize(torch.zeros(2, 1, 24, 24), 1.5).shape == (2, 1, 36, 36)
    clip = torch.rand(2, 1, 4, 8, 8)
    out = resize(clip, 2.0)
    assert out.shape == (2, 1, 4, 16, 16)
    torch.testing.assert_close(out[:, :, 1, ::2, ::2], clip[:, :, 1])  # nearest, frames kept
    assert resize(clip, 1.5, mode="bilinear").shape == (2, 1, 4, 12, 12)


@pytest.mark.parametrize("shape, patch", [((3, 2, 8, 12), (4, 4)), ((2, 1, 4, 8, 8), (1, 4, 4))])
def test_shuffle_patches_permutes_whole_patches(shape, patch):
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    out = shuffle_patches(x, patch, seed=1)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out.flatten().sort().values, x.flatten().sort().values)

    def patches(t):
        grid = [s // p for s, p in zip(t.shape[2:], patch)]
        split = t.reshape(t.shape[0], t.shape[1], *[v for gp in zip(grid, patch) for v in gp])
        dims = len(patch)
        order = [0, *[2 + 2 * i for i in range(dims)], 1, *[3 + 2 * i for i in range(dims)]]
        return split.permute(*order).reshape(t.shape[0], -1, t.shape[1] * int(np.prod(patch)))

    before, after = patches(x), patches(out)
    for b in range(shape[0]):  # every output patch is an input patch of the same sample, intact
        rows_before = {tuple(p.tolist()) for p in before[b]}
        assert {tuple(p.tolist()) for p in after[b]} == rows_before
    assert torch.equal(shuffle_patches(x, patch, seed=1), out)  # seeded


def test_shuffle_patches_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        shuffle_patches(torch.zeros(1, 1, 10, 10), (4, 4))


def test_training_loop_learns_and_repeats_exactly():
    data = arrow_spatial(256, grid=4, distractor_arrows=1, letters=1, seed=0)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VisionTransformer(
            20, 5, 4, in_channels=1, dim=32, depth=1, num_heads=2, pos_enc="liere"
        )
        losses = train(model, data, TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0))
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[0][0][-1] < results[0][0][0]
    assert predict(model, data.inputs[:10]).shape == (10,)
    assert 0.0 <= evaluate(model, data.inputs, data.labels) <= 1.0
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, data.inputs[:0], data.labels[:0])


def test_on_step_sees_every_step_and_leaves_training_unchanged():
    data = arrow_spatial(96, grid=4, distractor_arrows=1, letters=1, seed=0)
    runs = []
    for hook in (False, True):
        torch.manual_seed(0)
        model = VisionTransformer(20, 5, 4, in_channels=1, dim=16, depth=1, num_heads=2)
        calls = []

        def on_step(step, total, model=model, calls=calls):
            calls.append((step, total, model.training))
            evaluate(model, data.inputs[:8], data.labels[:8])  # switches to eval and back

        config = TrainConfig(epochs=2, batch_size=32, seed=0)
        losses = train(model, data, config, on_step=on_step if hook else None)
        runs.append((losses, [p.detach().clone() for p in model.parameters()], calls))
    assert runs[1][2] == [(s, 6, True) for s in range(1, 7)]
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
