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


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = arrow_spatial(16, grid=4, distractor_arrows=1, letters=1, seed=0)
        x, y = data.inputs, data.labels
        half = slice(rank * 8, rank * 8 + 8)

        def sharded():
            model = _model()
            for block in model.blocks:
                fully_shard(block)
            return fully_shard(model)

        model = sharded()
        reference = _model()  # one process, the whole batch
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
        losses, ref_losses = [], []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x[half]), y[half])
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
            ref_loss = torch.nn.functional.cross_entropy(reference(x), y)
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_losses.append(float(ref_loss))
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        param_error = max(
            (full[n] - p.detach()).abs().max().item() for n, p in reference.named_parameters()
        )
        # a checkpoint through torch.distributed.checkpoint loads into a fresh sharded model
        path = os.path.join(out_dir, "checkpoint")
        dcp.save({"model": model.state_dict()}, checkpoint_id=path)
        restored = sharded()
        state = {"model": restored.state_dict()}
        dcp.load(state, checkpoint_id=path)
        restored.load_state_dict(state["model"])
        load_error = max(
            (p.full_tensor() - full[n]).abs().max().item() for n, p in restored.named_parameters()
        )
        with torch.no_grad():
            out_error = (restored(x[half]) - model(x[half])).abs().max().item()
        torch.save(
            {
                "losses": losses,
                "ref_losses": ref_losses,
                "param_error": param_error,
                "load_error": load_error,
                "out_error": out_error,
                "liere_moved": float(
                    (full["blocks.0.attn.pos_enc.weight"] - _model().blocks[0].attn.pos_enc.weight)
                    .abs()
                    .max()
                ),
            },
            os.path.join(out_dir, f"fsdp{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_fsdp2_tracks_a_single_process_run_and_checkpoints(tmp_path):
    """The reference ViT with LieRE under fully_shard on 2 CPU processes (gloo): the loss and
    the parameters track one process on the whole batch, and a torch.distributed.checkpoint
    save/load restores them."""
    init_file = str(tmp_path / "init")
    mp.spawn(_fsdp_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"fsdp{rank}.pt")
        for loss, ref in zip(res["losses"], res["ref_losses"]):
            assert abs(loss - ref) < 1e-5
        assert res["param_error"] < 1e-5
        assert res["liere_moved"] > 1e-3  # LieRE's generators trained
        assert res["load_error"] == 0.0 and res["out_error"] == 0.0
