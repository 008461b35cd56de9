"""The per-token norm bound alone: torch.matmul against elementwise products (tried in
73d574e, reverted). Run: python results/runs/norm_bound_microbench.py"""

import statistics
import time

import torch

from liere import LieRE, grid_positions
from liere.speed.token_squarings import spectral_norms

torch.set_num_threads(2)
torch.manual_seed(0)
positions = grid_positions(14, 14)
with torch.no_grad():
    sigma = spectral_norms(LieRE(64, 2, num_heads=6, block_size=8).bases())  # (h, a, m)


def elementwise(p, s):
    return (p.abs().unsqueeze(-3).unsqueeze(-1) * s.unsqueeze(1)).sum(dim=-2)


def matmul(p, s):
    return torch.matmul(p.abs().unsqueeze(-3), s)


with torch.no_grad():
    for name, fn in [("elementwise", elementwise), ("matmul", matmul)]:
        times = []
        for _ in range(500):
            start = time.perf_counter()
            fn(positions, sigma)
            times.append(time.perf_counter() - start)
        print(f"{name}: {statistics.median(times) * 1e6:.0f} us (median of 500 calls)")
