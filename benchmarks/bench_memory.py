"""Peak memory of LieRE rotations on big grids, all tokens at once vs chunked.

Each case runs in a fresh subprocess; the figure is the process's peak resident memory above
what it held right after building q, k and the positions (``ru_maxrss``), so it counts the
rotations, the exponential's intermediates and (training) what autograd keeps.

    python benchmarks/bench_memory.py --threads 2

Cases: a 16x32x32 3D grid (16,384 tokens) and 8,192 1D tokens, LieRE with 6 heads of 64 and
8x8 blocks, batch 1; eval (no grad) and train (forward + backward).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(config: dict) -> dict:
    import torch

    from liere import LieRE, grid_positions

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    grid = config["grid"]
    enc = LieRE(64, len(grid), num_heads=6, block_size=config["block"])
    enc.max_tokens_per_chunk = config["chunk"]
    positions = grid_positions(*grid, reference=[max(2, g // 2) for g in grid])
    n = positions.shape[0]
    train = config["mode"] == "train"
    q = torch.randn(1, 6, n, 64, requires_grad=train)
    k = torch.randn(1, 6, n, 64, requires_grad=train)
    upstream = torch.randn(1, 6, n, 64)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if train:
        q_out, k_out = enc(q, k, positions)
        ((q_out + k_out) * upstream).sum().backward()
    else:
        with torch.no_grad():
            enc(q, k, positions)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": n, "peak_mb": (peak - base) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2048, help="max_tokens_per_chunk when chunked")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from liere import kernels

    print(
        f"threads {args.threads}; LieRE 6 heads x 64, 8x8 blocks, batch 1; peak RSS above "
        f"inputs; {kernels.status()}"
    )
    print(
        f"{'grid':<12}{'tokens':>8}  {'mode':<6}{'all at once MB':>16}{'chunked MB':>12}"
        f"{'ratio':>7}{'s once':>8}{'s chunked':>10}"
    )
    for grid in ([16, 32, 32], [8192]):
        for mode in ("eval", "train"):
            rows = []
            for chunk in (None, args.chunk):
                config = {
                    "grid": grid,
                    "mode": mode,
                    "chunk": chunk,
                    "block": 8,
                    "threads": args.threads,
                }
                out = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(config)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            once, chunked = rows
            label = "x".join(map(str, grid))
            print(
                f"{label:<12}{once['tokens']:>8}  {mode:<6}{once['peak_mb']:>16.0f}"
                f"{chunked['peak_mb']:>12.0f}{once['peak_mb'] / max(chunked['peak_mb'], 1):>7.1f}"
                f"{once['seconds']:>8.2f}{chunked['seconds']:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
