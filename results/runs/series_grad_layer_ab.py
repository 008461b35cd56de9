"""The series gradient in the dense ViT-S/16 layer (forward + backward, batch argv[1], rounds
argv[2]): the batched product of ec55359 (liere's own) against the GEMM and permuted copy it
replaced (written out below), swapped in and out of liere.speed.polynomial's private
_series_product_coefficients_grad in one process, alternating, with the layer without encoding
timed beside them. A diagnostic (it patches a private name), not a benchmark of the library.
Run: python results/runs/series_grad_layer_ab.py 8 30"""

import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_attention import make_layer

from liere import grid_positions
from liere import kernels as _kernels
from liere.speed import polynomial

torch.set_num_threads(2)
torch.manual_seed(0)
new = polynomial._series_product_coefficients_grad


def old(grad, shape, weights, entry_major):
    hm, s, ts = shape
    terms, count = ts // s, weights.shape[0]
    fresh = _kernels._fresh
    d_flat = fresh(grad, terms, hm, s, s)
    torch.mm(weights.mT, grad.view(count, -1), out=d_flat.view(terms, -1))
    d_blocks = d_flat.permute(1, 2, 0, 3)
    d_coef = fresh(grad, hm, s, ts)
    d_coef.view(hm, s, terms, s).copy_(d_blocks)
    return d_coef


batch = int(sys.argv[1])
layer = make_layer("liere64", 384, 6, 2)
pos = grid_positions(14, 14)
none = make_layer("none", 384, 6, 2)
x = torch.randn(batch, 197, 384, requires_grad=True)


def step(l):
    l(x, pos).sum().backward()


res = {"old": [], "new": [], "none": []}
fl = {"old": 0, "new": 0, "none": 0}
for r in range(int(sys.argv[2])):
    for name in ["old", "new", "none"] if r % 2 == 0 else ["new", "old", "none"]:
        polynomial._series_product_coefficients_grad = old if name == "old" else new
        l = none if name == "none" else layer
        step(l)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        step(l)
        res[name].append(time.perf_counter() - t)
        fl[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
m = {k: statistics.median(v) * 1e3 for k, v in res.items()}
print(
    f"batch {batch}: old {m['old']:.1f} ms ({m['old'] / m['none']:.2f}x none), new {m['new']:.1f} ms ({m['new'] / m['none']:.2f}x), none {m['none']:.1f}; faults/step",
    {k: v // len(res[k]) for k, v in fl.items()},
)
