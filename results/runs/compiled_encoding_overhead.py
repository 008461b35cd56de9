"""The LieRE encoding alone (no attention), eager against compiled, forward + backward.

    python results/runs/compiled_encoding_overhead.py [block] [calls] [batch]

Times ``LieRE(64, 2, num_heads=6, block_size=block)`` on q and k of ViT-S/16 shape (CLS + 14x14
tokens, laid out as the attention layer's qkv views) eagerly and under
``torch.compile(fullgraph=True)``, alternating the order every call, and prints the medians.
Then profiles 40 calls of each with cProfile and prints where the Python time goes, grouped by
package, so the compiled path's extra layers (custom-op dispatch in ``torch._library``, dynamo,
AOT autograd) show beside liere's own code. The profile inflates Python-call overhead.
"""

import collections
import cProfile
import pstats
import statistics
import sys
import time

import torch

from liere import LieRE, grid_positions

torch.set_num_threads(2)
torch.manual_seed(0)
block, calls, batch = (int(a) for a in (sys.argv[1:] + ["8", "40", "8"][len(sys.argv) - 1 :]))
enc = LieRE(64, 2, num_heads=6, block_size=block)
positions = grid_positions(14, 14)
qkv = torch.randn(batch, 197, 3, 6, 64)


def runner(fn):
    def run():
        x = qkv.clone().requires_grad_(True)
        q, k = x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2)
        out_q, out_k = fn(q, k, positions, num_prefix_tokens=1)
        (out_q.sum() + out_k.sum()).backward()

    return run


fns = {"eager": runner(enc), "compiled": runner(torch.compile(enc, fullgraph=True))}
for fn in fns.values():
    for _ in range(3):
        fn()
times = {k: [] for k in fns}
for i in range(calls):
    for name, fn in list(fns.items())[:: 1 if i % 2 else -1]:
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
print(f"torch {torch.__version__}, block {block}, batch {batch}, {calls} alternating calls")
for name, ts in times.items():
    print(f"{name:9s} median {statistics.median(ts) * 1e3:7.2f} ms")
for name, fn in fns.items():
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(40):
        fn()
    prof.disable()
    groups: collections.Counter = collections.Counter()
    for (path, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if "site-packages/torch/" in path:
            key = "torch/" + path.split("site-packages/torch/")[1].split("/")[0]
        elif "/liere/" in path:
            key = "liere/" + path.split("/liere/")[1]
        elif path == "~":
            key = func[:50]
        else:
            key = "other"
        groups[key] += tottime * 1e3 / 40
    print(f"# {name}: cProfile, {sum(groups.values()):.2f} ms a call; largest groups:")
    for key, ms in groups.most_common(14):
        print(f"    {ms:6.2f} ms  {key}")
