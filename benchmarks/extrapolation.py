"""Orthogonality of float32 LieRE rotations far outside the training range.

For each block size, the paper's initialisation (seed 0) and a 14x14 grid scaled by
1x..64x (1x: each axis on [0, 1]), prints the largest generator norm ||sum_a p_a A_a||_2 and
max |R^T R - I| over all tokens and heads, next to the same for float32
torch.linalg.matrix_exp of the same generators (the reference path) and the documented
tolerance 10 * s * eps * max(1, ||A||).

    python benchmarks/extrapolation.py
"""

from __future__ import annotations

import argparse
import warnings

import torch

from liere import LieRE, grid_positions, kernels
from liere import functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {kernels.status()}")
    print(
        f"{'block':>5} {'scale':>6} {'||A||_2':>10} {'max|RtR-I|':>12} {'matrix_exp':>11} "
        f"{'tolerance':>11}"
    )
    for block in args.blocks:
        torch.manual_seed(args.seed)
        enc = LieRE(64, 2, num_heads=6, block_size=block)
        for scale in args.scales:
            positions = grid_positions(14, 14) * scale
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rot = F.lie_rotations(positions, enc.bases()).double()
                ref = F.expm_skew_reference(F.block_generators(positions, enc.bases())).double()
            eye = torch.eye(block, dtype=torch.float64)
            err = float((rot.mT @ rot - eye).abs().max())
            err_ref = float((ref.mT @ ref - eye).abs().max())
            norm = enc.generator_norm(positions)
            tol = 10 * block * torch.finfo(torch.float32).eps * max(1.0, norm)
            print(
                f"{block:>5} {scale:>6g} {norm:>10.1f} {err:>12.2e} {err_ref:>11.2e} {tol:>11.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
