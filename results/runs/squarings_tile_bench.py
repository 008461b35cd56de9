"""The squarings kernels alone at dense ViT-S/16 shapes (6 heads, 118 directly computed tokens,
4-7 squarings each): python squarings_tile_bench.py."""
import sys, time, statistics, torch
from liere import kernels as K
torch.set_num_threads(2)
torch.manual_seed(0)
h, m, s, n = 6, 1, 64, 118
a = torch.randn(n, h * m, s, s) * 0.05
a = a - a.mT
series = torch.linalg.matrix_exp(a).contiguous()
js = torch.randint(4, 8, (n,), dtype=torch.int32)
g = torch.randn(h, n, m, s, s)
out = K.squarings_forward(series, js, h, m, "batch")
d = K.squarings_backward(series, js, g, h, m, "batch")
print("checksum", float(out.double().sum()), float(d.double().sum()))
def t(fn, reps=30):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
f = t(lambda: K.squarings_forward(series, js, h, m, "batch"))
b = t(lambda: K.squarings_backward(series, js, g, h, m, "batch"))
prods = int(js.sum()) * h * m
flops = 2 * s**3
print(f"fwd {f:.2f} ms ({prods*flops/f/1e6:.1f} GFLOP/s)  bwd {b:.2f} ms ({(3*prods - n*h*m)*flops/b/1e6:.1f} GFLOP/s)")
