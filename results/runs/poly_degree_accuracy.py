"""Accuracy of the float32 fast path against float64 torch.linalg.matrix_exp on the 14x14 grid
with default init, per series degree (a diagnostic setting liere.speed.polynomial.POLY).
Run: python results/runs/poly_degree_accuracy.py"""

import sys, torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_attention import make_layer
from liere import grid_positions
from liere.speed import polynomial
import liere.functional as F

torch.manual_seed(0)
pos = grid_positions(14, 14)
for case in ["liere64", "liere8"]:
    enc = make_layer(case, 384, 6, 2).pos_enc
    B = enc.bases().detach()
    ref = torch.linalg.matrix_exp(
        torch.einsum("na,hamij->hnmij", pos.double(), B.double()).contiguous()
    )
    for d, th in ((12, 1.57), (13, 1.84), (14, 2.11)):
        polynomial.POLY[torch.float32] = (d, th)
        R = F.lie_rotations(pos, B.float())
        err = (R.double() - ref).abs().amax().item()
        orth = (
            (R.double().mT @ R.double() - torch.eye(R.shape[-1], dtype=torch.float64))
            .abs()
            .amax()
            .item()
        )
        print(case, d, f"max|R-exp| {err:.2e}  max|R^T R - I| {orth:.2e}")
polynomial.POLY[torch.float32] = (14, 2.11)
Rm = torch.linalg.matrix_exp(torch.einsum("na,hamij->hnmij", pos, B.float()).contiguous())
print("float32 matrix_exp 8x8", (Rm.double() - ref).abs().amax().item())
