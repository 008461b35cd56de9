"""Two CPU processes (gloo): DDP averages LieRE gradients and keeps ranks identical."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from liere.experiments import TrainConfig, train
from liere.models import VisionTransformer
from liere.tasks import arrow_spatial


def _model():
    torch.manual_seed(0)
    return VisionTransformer(20, 5, 4, in_channels=1, dim=16, depth=2, num_heads=2, pos_enc="liere")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = arrow_spatial(64, grid=4, distractor_arrows=1, letters=1, seed=0)
        model = _model()
        ddp = DistributedDataParallel(model)
        # 1) one step's gradients equal the mean of the per-rank local gradients
        x, y = data.inputs[rank * 8 : rank * 8 + 8], data.labels[rank * 8 : rank * 8 + 8]
        reference = _model()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        local = [p.grad.clone() for p in reference.parameters()]
        for g in local:
            dist.all_reduce(g)
            g /= world
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        grad_error = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), local))
        liere_grads = [b.attn.pos_enc.weight.grad.clone() for b in model.blocks]
        model.zero_grad()
        # 2) training with the library's loop keeps every rank's LieRE parameters identical
        train(ddp, data, TrainConfig(epochs=2, batch_size=8, lr=3e-3, seed=0))
        weights = torch.cat([b.attn.pos_enc.weight.detach().flatten() for b in model.blocks])
        gathered = [torch.zeros_like(weights) for _ in range(world)]
        dist.all_gather(gathered, weights)
        torch.save(
            {
                "grad_error": grad_error,
                "liere_grad_norm": sum(float(g.norm()) for g in liere_grads),
                "weights": gathered,
                "initial": torch.cat([b.attn.pos_enc.weight.flatten() for b in _model().blocks]),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_average_gradients_and_stay_in_sync(tmp_path):
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["grad_error"] < 1e-6
        assert res["liere_grad_norm"] > 0
        w0, w1 = res["weights"]
        assert torch.equal(w0, w1)  # identical across ranks
        assert not torch.equal(w0, res["initial"])  # and they did train
