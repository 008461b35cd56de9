"""What the position scale of a 1D (sequence) model does to float32 LieRE rotations.

For 1-axis LieRE at the paper's initialisation (seed 0, 6 heads of 64), token indices 0..L-1
times a scale (1/(L-1): [0, 1] over the context, as grid_positions(L); 1/sigma: one radian
per token at the fastest block, like language-model RoPE; 1: raw indices), prints: the
generator norm per unit position (sigma, the bound ||A(p)||_2 <= |p| sigma), the rotation
angle between neighbouring tokens at the fastest block (scale * sigma), the largest generator
norm over the context, the largest drift of a vector norm | |R x| - 1 | in float32 (512
random unit vectors, every token), the largest difference to the float64 rotations, and
whether liere warns (norm above 2^14).

    python benchmarks/position_scale.py
"""

from __future__ import annotations

import argparse
import warnings

import torch

from liere import LieRE
from liere import functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, seed {args.seed}")
    print(
        f"{'block':>5} {'context':>8} {'scale':>10} {'sigma':>7} {'rad/token':>9} "
        f"{'max ||A||':>10} {'|Rx|-1':>9} {'vs float64':>10} {'warns':>6}"
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    for block in args.blocks:
        torch.manual_seed(args.seed)
        enc = LieRE(64, 1, num_heads=6, block_size=block)
        sigma = enc.generator_norm(torch.ones(1, 1))
        x = torch.randn(512, block, generator=gen, dtype=torch.float64)
        x = x / x.norm(dim=-1, keepdim=True)
        for context in args.contexts:
            scales = (
                (f"1/{context - 1}", 1.0 / (context - 1)),
                ("1/sigma", 1.0 / sigma),
                ("1", 1.0),
            )
            for label, scale in scales:
                positions = torch.arange(context, dtype=torch.float64).unsqueeze(-1) * scale
                with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    bases = enc.bases().detach()
                    rot = F.lie_rotations(positions.float(), bases).double()
                    exact = F.lie_rotations(positions, bases.double())
                drift = float(
                    (torch.einsum("...ij,vj->...vi", rot, x).norm(dim=-1) - 1).abs().max()
                )
                error = float((rot - exact).abs().max())
                warned = any(issubclass(w.category, RuntimeWarning) for w in caught)
                print(
                    f"{block:>5} {context:>8} {label:>10} {sigma:>7.1f} {scale * sigma:>9.4f} "
                    f"{enc.generator_norm(positions):>10.0f} {drift:>9.1e} {error:>10.1e} "
                    f"{'yes' if warned else 'no':>6}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
