"""Orthogonality of float32 LieRE rotations far outside the training range.

For each block size, the paper's initialisation (seed 0, 6 heads of 64) and a 14x14 grid
scaled by 1x..64x (1x: each axis on [0, 1]), prints the largest generator norm
||sum_a p_a A_a||_2, max |R^T R - I| over all tokens and heads and the largest drift of a
vector norm | |R x| - 1 | (4096 random unit vectors), with the re-orthogonalisation step on
(the default, Note [re-orthogonalisation]) and off, next to float32 torch.linalg.matrix_exp of
the same generators (the reference path), and liere.testing's default tolerance. The last
columns time lie_rotations forward (no grad, median of --reps) with the step on and off.

    python benchmarks/extrapolation.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from liere import LieRE, grid_positions, kernels
from liere import functional as F
from liere.testing import orthogonality_tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {kernels.status()}, seed {args.seed}")
    print(
        f"{'block':>5} {'scale':>6} {'||A||_2':>9} {'RtR-I':>9} {'RtR-I off':>9} "
        f"{'|Rx|-1':>9} {'|Rx|-1 off':>10} {'mexp':>9} {'|Rx|-1 mexp':>11} {'tolerance':>9} "
        f"{'ms':>7} {'ms off':>7}"
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    for block in args.blocks:
        torch.manual_seed(args.seed)
        enc = LieRE(64, 2, num_heads=6, block_size=block)
        x = torch.randn(4096, block, generator=gen, dtype=torch.float64)
        x = x / x.norm(dim=-1, keepdim=True)
        eye = torch.eye(block, dtype=torch.float64)
        for scale in args.scales:
            positions = grid_positions(14, 14) * scale
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bases = enc.bases()
                on = F.lie_rotations(positions, bases).double()
                off = F.lie_rotations(positions, bases, reorthogonalize_above=None).double()
                ref = F.expm_skew_reference(F.block_generators(positions, bases)).double()
                ms_on = median_ms(lambda p=positions, b=bases: F.lie_rotations(p, b), args.reps)
                ms_off = median_ms(
                    lambda p=positions, b=bases: F.lie_rotations(p, b, reorthogonalize_above=None),
                    args.reps,
                )
                norm = enc.generator_norm(positions)
                tol = orthogonality_tolerance(enc, positions, torch.float32)
            cols = [
                orth(on, eye),
                orth(off, eye),
                drift(on, x),
                drift(off, x),
                orth(ref, eye),
                drift(ref, x),
            ]
            print(
                f"{block:>5} {scale:>6g} {norm:>9.1f} {cols[0]:>9.2e} {cols[1]:>9.2e} "
                f"{cols[2]:>9.2e} {cols[3]:>10.2e} {cols[4]:>9.2e} {cols[5]:>11.2e} "
                f"{tol:>9.2e} {ms_on:>7.1f} {ms_off:>7.1f}",
                flush=True,
            )


def orth(rot: torch.Tensor, eye: torch.Tensor) -> float:
    return float((rot.mT @ rot - eye).abs().max())


def drift(rot: torch.Tensor, x: torch.Tensor) -> float:
    return float((torch.einsum("...ij,vj->...vi", rot, x).norm(dim=-1) - 1).abs().max())


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
