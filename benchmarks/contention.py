"""How much each encoding slows down when another process keeps every core busy.

The one benchmark that runs a competing load on purpose: ``os.cpu_count()`` spinning Python
processes. One ViT-S/16 attention layer (CLS + 14x14 tokens, 6 heads of 64), forward +
backward, cases interleaved, medians; every configuration runs in a fresh child process, so
thread settings and OpenMP's environment apply from the start:

    quiet            no load, default settings (the reference)
    busy             the load, default settings
    busy-passive     the load, OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep, not spin)
    busy-1-thread    the load, torch.set_num_threads(1)
    busy-kernels-1-thread  the load, liere's kernels on one thread (LIERE_KERNEL_THREADS=1)

    python benchmarks/contention.py --batch 8

Prints each case's time per configuration and its slowdown against ``quiet``, and how often
liere's kernels left OpenMP for their own pool (``liere.kernels.pool_switches()``, Note
[kernel threads]); the target is that LieRE slows down no more than AxialRoPE does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, random, statistics, sys, time
import torch
from liere import AxialRoPE, LieRE, RotaryAttention, grid_positions, kernels
threads, batch, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
positions = grid_positions(14, 14)
encodings = {
    "none": None,
    "rope-axial": AxialRoPE(64, 2),
    "liere8": LieRE(64, 2, num_heads=6, block_size=8),
}
layers = {c: RotaryAttention(384, 6, pos_enc=e, num_prefix_tokens=1) for c, e in encodings.items()}
x = torch.randn(batch, 197, 384)
def run(layer):
    layer(x, positions).sum().backward()
for layer in layers.values():
    run(layer); run(layer)
times = {c: [] for c in layers}
order = list(layers)
shuffle = random.Random(0)
for _ in range(rounds):
    shuffle.shuffle(order)
    for c in order:
        start = time.perf_counter(); run(layers[c]); times[c].append(time.perf_counter() - start)
medians = {c: statistics.median(t) * 1e3 for c, t in times.items()}
steps = (2 + rounds) * len(order)  # training steps of all cases, warm-up included
print(json.dumps({"times": medians, "switches": kernels.pool_switches(), "steps": steps}))
"""

CONFIGS = {
    "quiet": ({}, 0, False),
    "busy": ({}, 0, True),
    "busy-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0, True),
    "busy-1-thread": ({}, 1, True),
    "busy-kernels-1-thread": ({"LIERE_KERNEL_THREADS": "1"}, 0, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(
        f"Command: python benchmarks/contention.py --batch {args.batch} --rounds {args.rounds}; "
        f"{cores} cores; load: {cores} spinning Python processes; ViT-S/16 layer, fwd + bwd"
    )
    results: dict[str, dict[str, float]] = {}
    switches: dict[str, str] = {}
    for name, (env, threads, busy) in CONFIGS.items():
        load = []
        if busy:
            load = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)
            ]
            time.sleep(1.0)
        try:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(threads), str(args.batch), str(args.rounds)],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
                timeout=1800,
                check=True,
            ).stdout
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
        child = json.loads(out.strip().splitlines()[-1])
        results[name] = child["times"]
        switches[name] = f"{child['switches']} in {child['steps']} steps"
    cases = list(results["quiet"])
    print(
        f"{'config':<16}"
        + "".join(f"{c + ' ms':>14}{'slowdown':>10}" for c in cases)
        + "  kernel pool switches"
    )
    for name, times in results.items():
        line = f"{name:<16}"
        for c in cases:
            line += f"{times[c]:>14.1f}{times[c] / results['quiet'][c]:>10.2f}"
        print(line + f"  {switches[name]}")
    for name, times in results.items():
        if name == "quiet":
            continue
        over = {c: times[c] - times["none"] for c in cases if c != "none"}
        ratio = (times["liere8"] / results["quiet"]["liere8"]) / (
            times["rope-axial"] / results["quiet"]["rope-axial"]
        )
        print(
            f"{name}: LieRE_8 slowdown / AxialRoPE slowdown = {ratio:.2f}; encoding cost over "
            f"the bare layer: " + ", ".join(f"{c} {v:.1f} ms" for c, v in over.items())
        )


if __name__ == "__main__":
    main()
