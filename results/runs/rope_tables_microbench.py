"""The RoPE kernel's operators alone at ViT-S/16 shapes (batch 8, CLS + 196 tokens, 6 heads
of 64, q and k views of one qkv tensor), against two clones (the same bytes read and written
as the forward). Run it from two checkouts in alternation to compare kernels:
PYTHONPATH=<checkout>/src python results/runs/rope_tables_microbench.py [table heads]"""

import platform
import statistics
import subprocess
import sys
import time

import torch

import liere
from liere import kernels as K

torch.set_num_threads(2)
torch.manual_seed(0)
heads = int(sys.argv[1]) if len(sys.argv) > 1 else 6  # 6: MixedRoPE per head; 1: shared
qkv = torch.randn(8, 197, 3, 6, 64).permute(2, 0, 3, 1, 4)
q, k = qkv[0], qkv[1]
angles = torch.randn(heads, 196, 32)
c, s = angles.cos().contiguous(), angles.sin().contiguous()
gq, gk = (torch.randn(8, 197, 6, 64).permute(0, 2, 1, 3) for _ in range(2))
cases = {
    "forward": lambda: K.rope_forward(q, k, c, s, 1),
    "backward, inputs only (AxialRoPE)": lambda: K.rope_backward(
        q, k, c, s, gq, gk, 1, True, False
    ),
    "backward with the tables (MixedRoPE)": lambda: K.rope_backward(
        q, k, c, s, gq, gk, 1, True, True
    ),
    "two clones (the forward's bytes)": lambda: (q.clone(), k.clone()),
}
src = liere.__file__.rsplit("/src/", 1)[0]
commit = subprocess.run(
    ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
).stdout.strip()
with open("/proc/cpuinfo") as f:
    cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
print(
    f"{src} at {commit}; {cpu or platform.machine()}; torch "
    f"{torch.__version__}; 2 threads; table heads {heads}; {K.status()}; medians of 200"
)
times: dict[str, list[float]] = {name: [] for name in cases}
for fn in cases.values():
    fn(), fn()
for _ in range(200):
    for name, fn in cases.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
for name, t in times.items():
    print(f"{name:40s} {statistics.median(t) * 1e3:.3f} ms")
