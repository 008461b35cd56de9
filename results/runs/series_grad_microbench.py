"""The series GEMM's gradient for dense 64x64 heads at ViT-S/16 (6 heads, 118 directly computed
tokens, 120 monomials): one GEMM into the series' layout plus a permuted copy (before
ec55359) against one batched product writing the coefficients' layout (ec55359), and the
forward likewise (kept as the GEMM). Plain torch, no liere. Run:
python results/runs/series_grad_microbench.py"""

import statistics
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)
hm, s, T, N = 6, 64, 120, 118
coef = torch.randn(hm, s, T * s)
W = torch.randn(N, T)
g = torch.randn(N, hm, s, s)


def cur_fwd():
    flat = torch.empty(T, hm, s, s)
    flat.copy_(coef.view(hm, s, T, s).permute(2, 0, 1, 3))
    series = torch.empty(N, hm, s, s)
    torch.mm(W, flat.view(T, -1), out=series.view(N, -1))
    return series


def new_fwd():
    series = torch.empty(N, hm, s, s)
    out = series.view(N, hm * s, s).transpose(0, 1)
    torch.bmm(W.expand(hm * s, N, T), coef.view(hm * s, T, s), out=out)
    return series


def cur_bwd():
    d_flat = torch.empty(T, hm, s, s)
    torch.mm(W.mT, g.view(N, -1), out=d_flat.view(T, -1))
    d_coef = torch.empty(hm, s, T * s)
    d_coef.view(hm, s, T, s).copy_(d_flat.permute(1, 2, 0, 3))
    return d_coef


def new_bwd():
    return torch.bmm(W.mT.expand(hm * s, T, N), g.view(N, hm * s, s).transpose(0, 1)).view(
        hm, s, T * s
    )


print(
    "fwd diff",
    (cur_fwd() - new_fwd()).abs().max().item(),
    "bwd diff",
    (cur_bwd() - new_bwd()).abs().max().item(),
)
s1 = new_fwd()
res = {f.__name__: [] for f in (cur_fwd, new_fwd, cur_bwd, new_bwd)}
for _r in range(40):
    for f in (cur_fwd, new_fwd, cur_bwd, new_bwd):
        t = time.perf_counter()
        f()
        res[f.__name__].append(time.perf_counter() - t)
for k, v in res.items():
    print(k, f"{statistics.median(v) * 1e3:.2f} ms")
