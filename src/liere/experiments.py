"""A small, seeded training loop for comparing position encodings (single or multi-process).

Under ``torch.distributed`` (e.g. ``torchrun --nproc_per_node=2``), wrap the model in
``DistributedDataParallel`` before calling ``train``: each rank then trains on its own shard
of every epoch's seeded permutation, and DDP averages the gradients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .tasks import TaskData

__all__ = ["TrainConfig", "set_seed", "train", "evaluate", "predict"]


@dataclass
class TrainConfig:
    """AdamW with linear warm-up and cosine decay, per-step schedule."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16


def set_seed(seed: int) -> None:
    """Seed Python, NumPy's global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - user code may draw from the legacy global RNG
    torch.manual_seed(seed)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: nn.Module,
    data: TaskData,
    config: TrainConfig,
    *,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[Iterable[Any]], Iterable[Any]]] = None,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> list[float]:
    """Train ``model`` on ``data``; returns the mean training loss of every epoch.

    ``on_step(step, total)`` is called after every optimizer step (``step`` counts from 1 to
    ``total``), e.g. to evaluate a learning curve; the model is back in training mode
    afterwards.

    The batch order is a function of ``config.seed`` and the epoch only, so runs repeat
    exactly on the same machine. Under torch.distributed each rank takes every
    ``world_size``-th sample of the permutation (drop the remainder so shards are equal).
    """
    device = device or next(model.parameters()).device
    rank, world = _world()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # position encodings, embeddings and the CLS token are not decayed (as in timm)
        positional = "pos_enc." in name or "pos_embed" in name or "cls_token" in name
        (no_decay if param.dim() < 2 or positional else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    n = len(data) - len(data) % world
    per_rank = n // world
    steps_per_epoch = max(1, math.ceil(per_rank / config.batch_size))
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(round(config.warmup_epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    step = 0
    epochs: Iterable[int] = range(config.epochs)
    if progress is not None:
        epochs = progress(epochs)
    model.train()
    for _ in epochs:
        order = torch.randperm(len(data), generator=gen)[:n][rank::world]
        total_loss, seen = 0.0, 0
        for start in range(0, per_rank, config.batch_size):
            idx = order[start : start + config.batch_size]
            x = data.inputs[idx].to(device)
            y = data.labels[idx].to(device)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _schedule(step, total, warmup)
            with torch.autocast(
                device.type,
                dtype=config.autocast_dtype or torch.float32,
                enabled=config.autocast_dtype is not None,
            ):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
            if on_step is not None:
                on_step(step, total)
                model.train()
        losses.append(total_loss / max(1, seen))
    return losses


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, *, batch_size: int = 256) -> Tensor:
    """Arg-max class of every input, in eval mode.

    Shape:
        inputs ``(N, ...)`` -> ``(N,)``
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [
        model(inputs[i : i + batch_size].to(device)).argmax(-1).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor, *, batch_size: int = 256) -> float:
    """Accuracy of ``model`` on ``(inputs, labels)``, in [0, 1]."""
    if len(labels) == 0:
        raise ValueError("cannot evaluate on an empty set.")
    return float((predict(model, inputs, batch_size=batch_size) == labels).float().mean())
