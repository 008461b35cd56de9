"""Layer output and every gradient for 8x8, 32x32 and dense heads, saved for comparing two checkouts:
PYTHONPATH=<checkout>/src python same_bits_layer.py OUT.pt, then torch.equal on each pair."""
import sys, torch
from liere import LieRE, RotaryAttention
from liere.positions import grid_positions
torch.set_num_threads(2)
res = {}
for block in (8, 32, 64):
    torch.manual_seed(0)
    enc = LieRE(64, 2, num_heads=6, block_size=block)
    layer = RotaryAttention(384, 6, pos_enc=enc, num_prefix_tokens=1)
    pos = grid_positions((14, 14))
    x = torch.randn(4, 197, 384, requires_grad=True)
    y = layer(x, pos)
    y.square().sum().backward()
    res[block] = [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
torch.save(res, sys.argv[1])
