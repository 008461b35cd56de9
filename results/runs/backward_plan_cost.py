"""What the backward operator re-derives: the spectral norms (kept from the forward) and the plan, LieRE_8 at ViT-S/16."""
import time, torch
from liere import LieRE
from liere.positions import grid_positions
from liere.speed import rotations as R
from liere.speed.token_squarings import spectral_norms
torch.set_num_threads(2)
torch.manual_seed(0)
enc = LieRE(64, 2, num_heads=6, block_size=8)
B = enc.bases().detach()
pos = grid_positions((14, 14))
sig = spectral_norms(B)
def t(f, n=200):
    for _ in range(20): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3
print("spectral_norms", t(lambda: spectral_norms(B)))
print("direct_plan", t(lambda: R._direct_plan(pos, B, sig, None)))
