"""The blockwise application's registered operators alone (ViT-S/16: CLS + 196 tokens, 6 heads
of 64, q and k views of one qkv tensor), forward and backward, medians. Run from two
checkouts in alternation to compare kernels:
PYTHONPATH=<checkout>/src python results/runs/apply_ops_microbench.py <block> <batch> <rounds>"""

import statistics
import sys
import time

import torch

import liere
from liere import LieRE, grid_positions
from liere import functional as F

torch.set_num_threads(2)
torch.manual_seed(0)
ops = torch.ops.liere
block, batch, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
enc = LieRE(64, 2, num_heads=6, block_size=block)
positions = grid_positions(14, 14)
bases = enc.bases().detach()
rot = F.lie_rotations(positions, bases)
qkv = torch.randn(batch, 197, 3, 6, 64).permute(2, 0, 3, 1, 4)
q, k = qkv[0], qkv[1]
gq, gk = (torch.randn(batch, 197, 6, 64).permute(0, 2, 1, 3) for _ in range(2))
cases = {
    "fwd": lambda: ops.apply_blockwise_pair(q, k, rot, 1),
    "bwd": lambda: ops.apply_blockwise_pair_backward(gq, gk, q, k, rot, 1),
}
for f in cases.values():
    f()
    f()
t = {k_: [] for k_ in cases}
for _r in range(rounds):
    for n in cases:
        s = time.perf_counter()
        cases[n]()
        t[n].append(time.perf_counter() - s)
m = {k_: statistics.median(v) * 1e3 for k_, v in t.items()}
print(
    f"{liere.__file__.split('/src/')[0]:12s} block {block} batch {batch}: "
    f"fwd {m['fwd']:.2f} ms, bwd {m['bwd']:.2f} ms"
)
