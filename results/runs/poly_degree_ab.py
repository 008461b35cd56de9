"""Float32 series degrees 12, 13, 14 (kept) and 16 in the ViT-S/16 layer, forward + backward,
by setting liere.speed.polynomial.POLY in one process between interleaved rounds (a
diagnostic; POLY is internal). Run: python results/runs/poly_degree_ab.py <batch> <rounds> <case>"""

import sys, time, statistics, torch, resource

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_attention import make_layer
from liere import grid_positions
from liere.speed import polynomial

torch.set_num_threads(2)
torch.manual_seed(0)
batch, rounds, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
degrees = {12: 1.57, 13: 1.84, 14: 2.11, 16: 2.69}
layer = make_layer(case, 384, 6, 2)
pos = grid_positions(14, 14)
none = make_layer("none", 384, 6, 2)
x = torch.randn(batch, 197, 384, requires_grad=True)


def step(l):
    l(x, pos).sum().backward()


names = [*degrees, "none"]
res = {n: [] for n in names}
import random

rng = random.Random(0)
for r in range(rounds):
    order = names[:]
    rng.shuffle(order)
    for n in order:
        if n != "none":
            polynomial.POLY[torch.float32] = (n, degrees[n])
        l = none if n == "none" else layer
        step(l)
        t = time.perf_counter()
        step(l)
        res[n].append(time.perf_counter() - t)
polynomial.POLY[torch.float32] = (14, 2.11)
m = {k: statistics.median(v) * 1e3 for k, v in res.items()}
print(
    case,
    f"batch {batch}:",
    ", ".join(f"degree {k} {m[k]:.1f} ms ({m[k] / m['none']:.2f}x)" for k in degrees),
    f"none {m['none']:.1f}",
)
