"""A/B of the series layout for dense heads in one process: "rows" (one batched product over
the coefficients' rows, Note [series in rows]) against "batch" (a permuted copy of the
coefficients and one GEMM into (N, hm, s, s)), swapped in and out by replacing
``liere.speed.rotations.kernel_series_layout``; interleaved with the layer without encoding.

    python results/runs/series_rows_layer_ab.py <batch> <rounds>
"""

import random
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_attention import make_layer  # noqa: E402

from liere import grid_positions  # noqa: E402
from liere.speed import rotations  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)
batch, rounds = int(sys.argv[1]), int(sys.argv[2])
rows_layout = rotations.kernel_series_layout


def batch_layout(size: int) -> str:
    return "entry" if size <= 8 else "batch"


layer, none = make_layer("liere64", 384, 6, 2), make_layer("none", 384, 6, 2)
positions, x = grid_positions(14, 14), torch.randn(batch, 197, 384)
times: dict[str, list[float]] = {"rows": [], "batch": [], "none": []}


def step(version: str) -> None:
    if version != "none":
        rotations.kernel_series_layout = rows_layout if version == "rows" else batch_layout
    (none if version == "none" else layer)(x, positions).sum().backward()


for _ in range(2):
    for version in times:
        step(version)
order, shuffle = list(times), random.Random(0)
for _ in range(rounds):
    shuffle.shuffle(order)
    for version in order:
        start = time.perf_counter()
        step(version)
        times[version].append(time.perf_counter() - start)
ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(
    f"batch {batch}: rows {ms['rows']:.1f} ms ({ms['rows'] / ms['none']:.2f}x none), "
    f"batch {ms['batch']:.1f} ms ({ms['batch'] / ms['none']:.2f}x none), none {ms['none']:.1f} ms"
)
