"""The RoPE kernel's backward with and without the tables' gradient at ViT-S/16 shapes
(RoPE-Mixed's per-head tables): python rope_tables_bench.py BATCH."""
import sys, time, statistics, torch
from liere import kernels as K
torch.set_num_threads(2)
torch.manual_seed(0)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 32
h, n, d = 6, 196, 64
qkv = torch.randn(B, 197, 3, h, d)
q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
ang = torch.randn(h, n, d // 2)
cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
gq, gk = torch.randn(B, h, 197, d), torch.randn(B, h, 197, d)
def t(fn, reps=20):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
a = t(lambda: K.rope_backward(q, k, cos, sin, gq, gk, 1, True, True))
b = t(lambda: K.rope_backward(q, k, cos, sin, gq, gk, 1, True, False))
print(f"B{B}: backward with tables {a:.2f} ms, without {b:.2f} ms, pool switches {K.pool_switches()}")
