"""Time one decoding step's rotation of q and k, as ratios to AxialRoPE in the same run.

A KV-cache decoding step rotates the new token's query and key (``encoding(q, k, positions)``
with one token, under ``no_grad``); cached keys are never rotated again (docs/decoding.md).
Shapes: batch 8, 6 heads of 64, one position axis, the token at index ``--index`` of a
``--context``-token context, on the docs' recommended scale ``index / (context - 1)`` (the
1D analogue of ``grid_positions``: [0, 1] over the training context). Cases are interleaved
(every encoding once per round, in a seeded random order) and the median is reported.

    python benchmarks/bench_decode.py --threads 2

Cases: ``rope-axial`` (the baseline), ``rope-mixed`` per head, ``liere8`` per-head 8x8 blocks,
``liere8-shared`` one set for all heads, ``liere64`` dense per head, and ``-ref`` the
torch.linalg.matrix_exp reference path.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from liere import AxialRoPE, LieRE, MixedRoPE, RotaryEncoding


def make(name: str, head_dim: int, heads: int) -> RotaryEncoding:
    if name == "rope-axial":
        return AxialRoPE(head_dim, 1)
    if name == "rope-mixed":
        return MixedRoPE(head_dim, 1, num_heads=heads)
    block = int(name[len("liere") :].split("-")[0])
    enc = LieRE(head_dim, 1, num_heads=1 if "-shared" in name else heads, block_size=block)
    if name.endswith("-ref"):
        enc.exp_method = "matrix_exp"
    return enc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1, help="new tokens per step")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--index", type=int, default=None, help="default: the last token")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["rope-mixed", "liere8", "liere8-shared", "liere64", "liere8-ref"],
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cases = list(dict.fromkeys(["rope-axial", *args.cases]))
    index = args.context - args.tokens if args.index is None else args.index
    steps = torch.arange(index, index + args.tokens, dtype=torch.float32)
    positions = (steps / (args.context - 1)).unsqueeze(-1)  # (tokens, 1)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k = torch.randn(shape), torch.randn(shape)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, q/k {shape}, "
        f"token {index} of {args.context} at position {float(positions[-1]):.4f}, "
        f"rounds {args.rounds}, seed {args.seed}"
    )
    runs: dict[str, Callable[[], object]] = {}
    norms: dict[str, float] = {}
    for case in cases:
        enc = make(case, args.head_dim, args.heads).eval()
        norms[case] = enc.generator_norm(positions)

        def run(enc: RotaryEncoding = enc) -> object:
            with torch.no_grad():
                return enc(q, k, positions)

        runs[case] = run
    times: dict[str, list[float]] = {c: [] for c in cases}
    for run in runs.values():
        for _ in range(20):
            run()
    order = list(runs)
    shuffle = random.Random(args.seed)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for case in order:
            start = time.perf_counter()
            runs[case]()
            times[case].append(time.perf_counter() - start)
    base = statistics.median(times["rope-axial"])
    print(f"{'case':<16}{'us':>9}{'x axial':>9}{'||A(p)||':>10}")
    for case in cases:
        med = statistics.median(times[case])
        print(f"{case:<16}{med * 1e6:>9.1f}{med / base:>9.2f}{norms[case]:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
