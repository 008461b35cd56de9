"""Time liere's registered operators against the eager path they stand in for.

What a compiled graph runs for LieRE at ViT-S/16 shapes (CLS + 14x14 tokens, 6 heads of 64,
8x8 blocks per head, batch 8; ``--grid 4 14 14`` for a clip): the rotations' and the
application's forward and backward operators, each against the eager path's forward +
backward (autograd Functions). Cases are interleaved, rounds repeated, medians reported.

    python benchmarks/bench_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import liere
from liere import LieRE, grid_positions
from liere import functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument(
        "--grid", type=int, nargs="+", default=[14, 14], help="patches per axis (3 for video)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(liere.__file__).resolve().parent,  # the liere imported (PYTHONPATH in an A/B)
    ).stdout.strip()
    print(
        f"Command: python benchmarks/bench_ops.py --threads {args.threads} --batch {args.batch} "
        f"--block {args.block} --rounds {args.rounds} --grid {' '.join(map(str, args.grid))}; "
        f"commit {commit}; torch "
        f"{torch.__version__}; seed 0"
    )
    ops = torch.ops.liere
    enc = LieRE(64, len(args.grid), num_heads=6, block_size=args.block)
    positions = grid_positions(*args.grid)
    tokens = positions.shape[0]
    bases = enc.bases().detach()
    rot = F.lie_rotations(positions, bases)
    grad_rot = torch.randn_like(rot)
    q, k = torch.randn(2, args.batch, 6, tokens + 1, 64).unbind(0)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def eager_rotations() -> None:
        leaf = bases.clone().requires_grad_()
        torch.autograd.grad(F.lie_rotations(positions, leaf), leaf, grad_rot)

    def eager_application() -> None:
        leaves = [t.clone().requires_grad_() for t in (q, k, rot)]
        outs = F.apply_blockwise_pair(*leaves, num_prefix_tokens=1)
        torch.autograd.grad(outs, leaves, (gq, gk))

    backward_args: tuple[object, ...] = (grad_rot, positions, bases, rot, 1024.0, True, False, [])
    if len(ops.lie_rotations_backward.default._schema.arguments) == 7:  # before the kept series
        backward_args = backward_args[:-1]
    elif len(ops.lie_rotations_backward.default._schema.arguments) == 6:
        backward_args = (grad_rot, positions, bases, 1024.0, True, False)  # before c2ebbab
    cases: dict[str, Callable[[], object]] = {
        "rotations: eager forward + backward": eager_rotations,
        "rotations: forward operator": lambda: ops.lie_rotations(positions, bases, 1024.0, True),
        "rotations: backward operator": lambda: ops.lie_rotations_backward(*backward_args),
        "application: eager forward + backward": eager_application,
        "application: forward operator": lambda: ops.apply_blockwise_pair(q, k, rot, 1),
        "application: backward operator": lambda: ops.apply_blockwise_pair_backward(
            gq, gk, q, k, rot, 1
        ),
    }
    if hasattr(ops, "lie_rotations_keeping_series"):  # Note [series kept for the backward ...]
        kept = list(ops.lie_rotations_keeping_series(positions, bases, 1024.0, True)[1:])
        kept_args = (grad_rot, positions, bases, rot, 1024.0, True, False, kept)
        cases["rotations: forward operator keeping the series"] = lambda: (
            ops.lie_rotations_keeping_series(positions, bases, 1024.0, True)
        )
        cases["rotations: backward operator, series kept"] = lambda: ops.lie_rotations_backward(
            *kept_args
        )
    for fn in cases.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    for name in cases:
        print(f"{name:<40} {statistics.median(times[name]) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
