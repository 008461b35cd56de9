"""Profiler self times of the ViT-S/16 layer with AxialRoPE and MixedRoPE: python rope_profile.py BATCH."""
import torch, sys
from torch.profiler import profile, ProfilerActivity
from liere import AxialRoPE, MixedRoPE, RotaryAttention
from liere.positions import grid_positions
torch.set_num_threads(2); torch.manual_seed(0)
pos = grid_positions((14, 14))
B = int(sys.argv[1])
for name, enc in [("axial", AxialRoPE(64, 2)), ("mixed", MixedRoPE(64, 2, num_heads=6))]:
    layer = RotaryAttention(384, 6, pos_enc=enc, num_prefix_tokens=1)
    x = torch.randn(B, 197, 384, requires_grad=True)
    for _ in range(3): layer(x, pos).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5): layer(x, pos).sum().backward()
    print("=====", name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
