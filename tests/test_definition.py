"""liere.definition is the maths in plain PyTorch; the fast path agrees with it, values and
gradients, and the definition imports nothing of liere's speed layer."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import randn

from liere import LieRE, definition, grid_positions, ops
from liere import functional as F


def test_the_definition_imports_no_other_liere_module():
    tree = ast.parse((Path(definition.__file__)).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "typing", "torch"}, imported


@pytest.mark.parametrize("block, heads", [(8, 2), (16, 1), (4, 2)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_fast_path_agrees_with_the_definition(block, heads, per_sample):
    torch.manual_seed(0)
    bases = LieRE(16, 2, num_heads=heads, block_size=block).bases().detach().double()
    positions = grid_positions(5, 5, dtype=torch.float64) * 2
    if per_sample:
        positions = torch.stack([positions, positions.flip(0)])
    bases.requires_grad_()
    x = randn(2, 2, 25, 16, seed=1).double().requires_grad_()
    k = randn(2, 2, 25, 16, seed=2).double().requires_grad_()
    outs = {}
    for name, rotations, apply in (
        ("definition", definition.rotations_reference, definition.apply_blockwise_reference),
        ("fast", F.lie_rotations, F.apply_blockwise),
    ):
        rot = rotations(positions, bases)
        y = apply(x, rot)
        grads = torch.autograd.grad((y * k).sum(), (x, bases))
        outs[name] = (rot, y, *grads)
    q_pair, k_pair = ops.blockwise_pair(x, k, F.lie_rotations(positions, bases))
    for got, expected in zip(outs["fast"], outs["definition"]):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(q_pair, outs["definition"][1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        k_pair, definition.apply_blockwise_reference(k, outs["definition"][0]), atol=1e-10, rtol=0
    )
