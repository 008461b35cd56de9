import torch, time, statistics, sys
from torch import Tensor
from liere.speed import polynomial as P
from liere import kernels as _kernels
torch.set_num_threads(2)
exec(open("results/runs/coef_backward_buffers_tried_impl.py").read())
new = _poly_coefficients_backward; old = P._poly_coefficients_backward
hm, s = 6, 64
g = torch.Generator().manual_seed(0)
b = torch.randn(hm, 2 * s, s, generator=g) / 30
out = P._poly_coefficients_forward(b, 14)
gr = torch.randn(out.shape, generator=g)
for a, bb in ((b, out),):
    print("diff", (old(gr, b, out, 14) - new(gr, b, out, 14)).abs().max().item())
b1 = b[:, :s].contiguous(); out1 = P._poly_coefficients_forward(b1, 14); gr1 = torch.randn(out1.shape, generator=g)
print("diff a=1", (old(gr1, b1, out1, 14) - new(gr1, b1, out1, 14)).abs().max().item())
def t(f, r=20):
    for _ in range(3): f()
    ts = []
    for _ in range(r):
        st = time.perf_counter(); f(); ts.append(time.perf_counter() - st)
    return statistics.median(ts) * 1e3
for rep in range(3):
    print(rep, "old", round(t(lambda: old(gr, b, out, 14)), 2), "new", round(t(lambda: new(gr, b, out, 14)), 2))
