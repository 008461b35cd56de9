"""Time one RotaryAttention layer with each encoding, as ratios to AxialRoPE in the same run.

ViT-S/16 shapes by default: 1 CLS + 14x14 patch tokens, dim 384, 6 heads of 64, 2D positions.
Cases are interleaved (every encoding once per round, in a fresh seeded random order, rounds
repeated) and the median is reported, so drifts in machine load and the memory state a case
leaves behind hit all cases alike.

    python benchmarks/bench_attention.py --threads 2 --batch 8 32

Modes: ``train`` (forward + backward), ``eval`` (forward under ``no_grad``), ``eval-frozen``
(forward under ``no_grad`` with the rotations precomputed by ``encoding.freeze(positions)``,
the explicit way to reuse them; nothing is cached implicitly), ``compiled`` (forward +
backward of every case twice, eager and under ``torch.compile(fullgraph=True)`` as
``<case>/c``, interleaved in one loop, so compiled and eager ratios share a run; compile
time is printed and not timed).

Every line gives the case's multiple of AxialRoPE (``x axial``) and of the same layer with no
encoding (``x none``, the floor), both measured in the same run.

Page faults: ``faults`` is the process's minor page faults per call (``getrusage``), a count
of fresh memory touched: outputs that the allocator could not serve from memory already
mapped. Under glibc's malloc it varies between processes and moves the slower cases' times
(docs/performance.md).

Memory: ``saved MB`` is what autograd keeps for the backward pass (tensors saved by the
forward, counted once per storage), ``peak MB`` the CUDA allocator's peak when on a GPU.

Floor (LieRE cases with blocks > 2): the products the exponential and the blockwise
application need, forward, each timed in this run, times 3 in training (backward costs two
per forward product; the series GEMM counts twice), added to the layer without encoding: the
best ratio this algorithm can reach on this machine, whatever else is optimised. A per-token
product is timed as the fastest of torch.bmm, the entry-major kernel (blocks <= 8) and the
compiled squaring kernel (two squarings of every matrix minus one, when the kernels are
built), and counted as many times per token as the directly computed tokens' squarings plus
one per token split along its ray (Note [products along rays]), averaged over the tokens.
With one or two axes the series is one GEMM over the directly computed tokens plus per-block
coefficient products (timed as such) and only the squarings and splits are per-token
products; otherwise Paterson-Stockmeyer's products are. The application is timed as the
compiled kernel's forward when built, else as the batched product.

Case names: ``liere8`` per-head generators with 8x8 blocks (the paper's LieRE_8), ``liere64``
dense, ``liere8-shared`` one set shared by all heads (``num_heads=1``, the constructor's
default), ``-ref`` the torch.matrix_exp reference path; ``comrope-ap`` and ``comrope-ld``
(8x8 blocks, per head) and ``string-cayley`` (per head) the commuting family.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch

from liere import (
    AxialRoPE,
    CayleySTRING,
    ComRoPE,
    LieRE,
    MixedRoPE,
    RotaryAttention,
    grid_positions,
)
from liere import functional as F
from liere import kernels as K
from liere.speed import polynomial, rays, taylor
from liere.speed import token_squarings as squaring


def make_layer(name: str, dim: int, heads: int, axes: int) -> RotaryAttention:
    head_dim = dim // heads
    pos_enc: Optional[torch.nn.Module]
    if name == "none":
        pos_enc = None
    elif name == "rope-axial":
        pos_enc = AxialRoPE(head_dim, axes)
    elif name == "rope-mixed":
        pos_enc = MixedRoPE(head_dim, axes, num_heads=heads)
    elif name.startswith("liere"):
        # "liere8", "liere64", "liere8-shared", "liere8-ref" (torch.matrix_exp reference path)
        block = int(name[len("liere") :].split("-")[0])
        shared = "-shared" in name
        pos_enc = LieRE(head_dim, axes, num_heads=1 if shared else heads, block_size=block)
        if name.endswith("-ref"):
            pos_enc.exp_method = "matrix_exp"
    elif name in ("comrope-ap", "comrope-ld"):
        pos_enc = ComRoPE(head_dim, axes, num_heads=heads, block_size=8, variant=name[-2:])
    elif name == "string-cayley":
        pos_enc = CayleySTRING(head_dim, axes, num_heads=heads)
    else:
        raise ValueError(f"unknown case {name!r}")
    return RotaryAttention(dim, heads, pos_enc=pos_enc, num_prefix_tokens=1)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def median_ms(fn: Callable[[], object], reps: int = 15) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def floor_ms(
    layer: RotaryAttention, positions: torch.Tensor, batch: int, train: bool
) -> Optional[float]:
    """Time of the products LieRE's fast path needs (see the module docstring)."""
    enc = layer.pos_enc
    if not isinstance(enc, LieRE) or enc.block_size <= 2 or enc.exp_method != "auto":
        return None
    with torch.no_grad():
        bases = enc.bases().float()
        sigma = squaring.spectral_norms(bases)  # the bound lie_rotations uses
        token_bound = torch.matmul(positions.abs().unsqueeze(-3), sigma).amax(dim=(-3, -1))
    s, n = enc.block_size, positions.shape[0]
    count = enc.num_heads * n * enc.num_blocks
    kernel = K.usable(bases, size=s)
    a = torch.randn(count, s, s, device=positions.device)
    # one product of every matrix: the fastest of torch.bmm, the entry-major kernel (blocks
    # <= 8) and the compiled squaring kernel (one squaring, loads and stores included)
    t_product = median_ms(lambda: torch.bmm(a, a))
    if s <= taylor.ENTRY_MAJOR_MAX_BLOCK:
        e = a.permute(1, 2, 0).contiguous()
        t_product = min(t_product, median_ms(lambda: taylor.entry_major_mm(e, e)))
    if kernel:  # the marginal cost of one more squaring, loads and stores excluded
        series, hh, mm = a.view(n, -1, s, s), enc.num_heads, enc.num_blocks
        one, two = (torch.full((n,), j, dtype=torch.int32) for j in (1, 2))
        t_one = median_ms(lambda: K.squarings_forward(series, one, hh, mm, "batch"))
        t_two = median_ms(lambda: K.squarings_forward(series, two, hh, mm, "batch"))
        t_product = min(t_product, max(t_two - t_one, 0.0))
    t_gemm = t_coef = 0.0  # per-block work outside the per-token products (timed, forward)
    if polynomial.uses_polynomial(torch.float32, enc.num_axes):
        degree, theta = polynomial.POLY[torch.float32]
        js = squaring.token_squarings(token_bound, theta)
        # Note [products along rays]: split tokens cost one product, the others their
        # squarings; the series GEMM covers the directly computed tokens only
        plan = rays.ray_plan(positions, js) if positions.device.type == "cpu" else None
        direct = plan.base if plan is not None else torch.arange(n)
        split = plan.split if plan is not None else 0
        products = (float(js[direct].sum()) + split) / n
        terms = polynomial.poly_weights(positions, degree).shape[-1]
        flat = torch.randn(enc.num_heads * enc.num_blocks * s * s, terms, device=positions.device)
        weights = torch.randn(terms, len(direct), device=positions.device)
        t_gemm = median_ms(lambda: flat @ weights)
        t_coef = median_ms(lambda: polynomial.poly_coefficients(bases, degree))
    else:
        k, chunks, _ = taylor.TAYLOR[torch.float32]
        products = (k - 1) + (chunks - 1) + F.squarings_for(float(token_bound.max()))
    heads = layer.num_heads
    if K.usable(bases, size=s, sizes=K.APPLY_SIZES):
        q = torch.randn(batch, heads, n, enc.head_dim, device=positions.device)
        rot = torch.randn(enc.num_heads, n, enc.num_blocks, s, s, device=positions.device)
        t_app = median_ms(lambda: K.apply_forward(q, q, rot, 0))
    else:
        cols = 2 * batch * (heads // enc.num_heads)
        x = torch.randn(count, cols, s, device=positions.device)
        t_app = median_ms(lambda: torch.bmm(x, a))
    if not train:
        return products * t_product + t_gemm + t_coef + t_app
    # backward: two products per forward product (per squaring, per coefficient product, per
    # application), one GEMM (the gradient of the coefficients; positions need none)
    return 3 * (products * t_product + t_coef + t_app) + 2 * t_gemm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["rope-mixed", "liere2", "liere8", "liere8-shared", "liere64", "liere64-shared"],
        help="encodings; rope-axial is the baseline; add liere8-ref for torch.matrix_exp",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["train", "eval", "eval-frozen"],
        choices=["train", "eval", "eval-frozen", "compiled"],
        help="eval-frozen: rotations precomputed once with encoding.freeze(positions)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--grid", type=int, default=14, help="patches per side")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--autocast", choices=["bf16", "fp16"], help="run every case under torch.autocast"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cases = list(dict.fromkeys(["rope-axial", "none", *args.cases]))
    positions = grid_positions(args.grid, args.grid, device=device)
    n = args.grid * args.grid + 1
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"tokens {n}, dim {args.dim}, heads {args.heads}, rounds {args.rounds}, seed {args.seed}, "
        f"autocast {args.autocast or 'off'}, {K.status()}"
    )
    header = (
        f"{'mode':<12}{'batch':>6}  {'case':<16}{'ms':>9}{'x axial':>9}{'x none':>8}"
        f"{'saved MB':>10}{'floor x':>9}{'faults':>8}"
    )
    if device.type == "cuda":
        header += f"{'peak MB':>9}"
    print(header)
    for mode in args.modes:
        for batch in args.batch:
            layers = {c: make_layer(c, args.dim, args.heads, 2).to(device) for c in cases}
            x = torch.randn(batch, n, args.dim, device=device)
            runs: dict[str, Callable[[], object]] = {}
            if mode == "compiled":
                torch.compiler.reset()  # one compile per case and batch; no recompile limit
                for case in cases:
                    layer = layers[case].train()
                    compiled = torch.compile(layer, fullgraph=True)
                    start = time.perf_counter()
                    compiled(x, positions).sum().backward()
                    print(
                        f"# compiled {case} at batch {batch} in {time.perf_counter() - start:.0f} s"
                    )

                    def run_eager(layer: RotaryAttention = layer, x: torch.Tensor = x) -> object:
                        layer(x, positions).sum().backward()
                        return None

                    def run_compiled(fn: Callable = compiled, x: torch.Tensor = x) -> object:
                        fn(x, positions).sum().backward()
                        return None

                    runs[case] = run_eager
                    runs[case + "/c"] = run_compiled
            for case, layer in layers.items() if mode != "compiled" else ():
                if mode == "train":
                    layer.train()

                    def run(layer: RotaryAttention = layer, x: torch.Tensor = x) -> object:
                        layer(x, positions).sum().backward()
                        return None
                else:
                    layer.eval()
                    if layer.pos_enc is not None and mode == "eval-frozen":
                        layer.pos_enc.freeze(positions)

                    def run(layer: RotaryAttention = layer, x: torch.Tensor = x) -> object:
                        with torch.no_grad():
                            return layer(x, positions)

                runs[case] = run
            times: dict[str, list[float]] = {c: [] for c in runs}
            faults: dict[str, int] = {c: 0 for c in runs}
            if args.autocast:
                dtype = torch.bfloat16 if args.autocast == "bf16" else torch.float16

                def autocast(
                    fn: Callable[[], object], dtype: torch.dtype = dtype
                ) -> Callable[[], object]:
                    def wrapped() -> object:
                        with torch.autocast(device.type, dtype=dtype):
                            return fn()

                    return wrapped

                runs = {case: autocast(run) for case, run in runs.items()}
            for _ in range(2):  # warm-up
                for run in runs.values():
                    run()
            order = list(runs)
            shuffle = random.Random(args.seed)
            for _ in range(args.rounds):
                shuffle.shuffle(order)  # no case always runs right after the same neighbour
                for case in order:
                    run = runs[case]
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    run()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[case].append(time.perf_counter() - start)
                    faults[case] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt
            base = statistics.median(times["rope-axial"])
            plain = statistics.median(times["none"])
            for case in runs:
                med = statistics.median(times[case])
                saved = 0.0
                layer = layers[case.removesuffix("/c")]
                if mode == "train":
                    saved = saved_bytes(lambda layer=layer, x=x: layer(x, positions)) / 2**20
                floor = (
                    None
                    if mode in ("eval-frozen", "compiled")
                    else floor_ms(layer, positions, batch, mode == "train")
                )
                floor_text = "" if floor is None else f"{(plain + floor / 1e3) / base:.2f}"
                line = (
                    f"{mode:<12}{batch:>6}  {case:<16}{med * 1e3:>9.1f}{med / base:>9.2f}"
                    f"{med / plain:>8.2f}{saved:>10.1f}{floor_text:>9}"
                    f"{faults[case] / args.rounds:>8.0f}"
                )
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    runs[case]()
                    line += f"{torch.cuda.max_memory_allocated() / 2**20:>9.0f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
