"""Cost of keeping 61 MB more per dense layer (the squares), without the saving: an extra
tensor written in the forward and read in the backward, in the bench's interleaving."""
import sys, torch, time, random, statistics, resource
sys.path.insert(0, "benchmarks")
from bench_attention import make_layer
from liere import grid_positions
from liere.speed import rays
torch.manual_seed(0); torch.set_num_threads(2)
b = int(sys.argv[1]); rounds = int(sys.argv[2])
EXTRA = {"on": False}
fwd0, bwd0 = rays.KernelRotations.forward, rays.KernelRotations.backward
def fwd(ctx, *a):
    out = fwd0(ctx, *a)
    if EXTRA["on"]:
        ctx.extra = torch.empty(61 * 2**20 // 4).fill_(1.0)
    return out
def bwd(ctx, g):
    r = bwd0(ctx, g)
    if hasattr(ctx, "extra"):
        ctx.extra.sum(); del ctx.extra
    return r
rays.KernelRotations.forward = staticmethod(fwd); rays.KernelRotations.backward = staticmethod(bwd)
cases = ["rope-axial", "none", "rope-mixed", "liere8", "liere64", "liere64+61MB"]
layers = {c: make_layer(c.split("+")[0], 384, 6, 2) for c in cases}
pos = grid_positions(14, 14); x = torch.randn(b, 197, 384)
def run(c):
    EXTRA["on"] = c.endswith("MB"); layers[c](x, pos).sum().backward()
for _ in range(2):
    for c in cases: run(c)
T = {c: [] for c in cases}; F = {c: 0 for c in cases}; order = list(cases); rnd = random.Random(0)
for _ in range(rounds):
    rnd.shuffle(order)
    for c in order:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.perf_counter(); run(c)
        T[c].append(time.perf_counter() - t0); F[c] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
none = statistics.median(T["none"])
for c in cases: print(f"{c:14s} {statistics.median(T[c])*1e3:7.1f} ms {statistics.median(T[c])/none:5.2f}x none faults {F[c]/rounds:7.0f}")
