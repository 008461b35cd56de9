import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from liere import grid_positions


def test_grid_matches_flatten_order():
    pos = grid_positions(2, 3)
    # row-major: last axis fastest, as x.flatten(2) for x of shape (B, C, 2, 3)
    expected = torch.tensor([[0, 0], [0, 0.5], [0, 1], [1, 0], [1, 0.5], [1, 1]])
    torch.testing.assert_close(pos, expected)


@given(st.lists(st.integers(1, 7), min_size=1, max_size=3))
def test_shape_and_unit_range_at_reference(sizes):
    pos = grid_positions(*sizes)
    assert pos.shape == (torch.Size(sizes).numel(), len(sizes))
    assert pos.min() == 0
    for axis, n in enumerate(sizes):
        assert pos[:, axis].max() == (1.0 if n > 1 else 0.0)


def test_larger_grid_extends_proportionally():
    small = grid_positions(7, reference=7)
    large = grid_positions(14, reference=7)
    assert torch.equal(large[:7], small)  # same spacing
    assert large.max().item() == pytest.approx(13 / 6)  # about twice the range
    assert grid_positions(4, 4, reference=(7, 7)).max() == pytest.approx(0.5)


def test_reference_int_applies_to_all_axes():
    assert torch.equal(grid_positions(3, 5, reference=4), grid_positions(3, 5, reference=(4, 4)))


def test_dtype_device_and_tuple_form():
    pos = grid_positions((3, 4), dtype=torch.float64, device="cpu")
    assert pos.dtype == torch.float64 and pos.device.type == "cpu"
    assert pos.shape == (12, 2)


def test_errors():
    with pytest.raises(ValueError, match="at least one axis"):
        grid_positions()
    with pytest.raises(ValueError, match="positive integers"):
        grid_positions(0, 3)
    with pytest.raises(ValueError, match="one size per axis"):
        grid_positions(3, 3, reference=(3,))
    with pytest.raises(ValueError, match="floating dtype"):
        grid_positions(3, dtype=torch.int64)
