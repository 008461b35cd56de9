import torch, time, statistics, sys
from torch import Tensor
from liere.speed import polynomial as P
from liere import kernels as _kernels
import math
torch.set_num_threads(2)
exec(open("results/runs/coef_forward_strided_out_tried_impl.py").read())
new_fwd = _poly_coefficients_forward
old_fwd = P._poly_coefficients_forward
hm, s = 6, 64
g = torch.Generator().manual_seed(0)
b = torch.randn(hm, 2 * s, s, generator=g) / 30
a1 = old_fwd(b, 14); a2 = new_fwd(b, 14)
print("max diff", (a1 - a2).abs().max().item(), a1.abs().max().item())
def t(f, r=20):
    for _ in range(3): f()
    ts = []
    for _ in range(r):
        st = time.perf_counter(); f(); ts.append(time.perf_counter() - st)
    return statistics.median(ts) * 1e3
for rep in range(3):
    print(rep, "old", round(t(lambda: old_fwd(b, 14)), 2), "new", round(t(lambda: new_fwd(b, 14)), 2))
