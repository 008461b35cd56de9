"""The application kernel alone at ViT-S/16 shapes: python app_bench.py BATCH BLOCK."""
import sys, time, statistics, torch
from liere import kernels as K
torch.set_num_threads(2)
torch.manual_seed(0)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 32
s = int(sys.argv[2]) if len(sys.argv) > 2 else 64
h, n, d = 6, 196, 64
qkv = torch.randn(B, 197, 3, h, d)
q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
a = torch.randn(h * n * (d // s), s, s) * 0.3
rot = torch.linalg.matrix_exp(a - a.mT).view(h, n, d // s, s, s).contiguous()
gq, gk = torch.randn(B, h, 197, d), torch.randn(B, h, 197, d)
def t(fn, reps=20):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
f = t(lambda: K.apply_forward(q, k, rot, 1))
b = t(lambda: K.apply_backward(q, k, rot, gq, gk, 1, True, True))
print(f"B{B} s{s}: fwd {f:.2f} ms  bwd {b:.2f} ms")
