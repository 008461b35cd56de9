"""The GPU check: one command, a few minutes, on a machine with a CUDA device.

    python benchmarks/gpu_check.py            # prints every figure with the command and commit

1. ``pytest tests/test_cuda.py`` (the CUDA tests the CPU suite skips);
2. host synchronisations inside one training step of the reference ViT (2 blocks) with
   LieRE_8, eager and compiled: with ``check_finite`` off counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (each sync warns once per call site) and then
   run under ``"error"``; with it on (the default) counted the same way (one read per
   encoding call is the documented allowance, Note [sync-free rotations]);
3. ``benchmarks/bench_attention.py`` at ViT-B/16 (dim 768, 12 heads, 14x14 + CLS), batch 64,
   bf16 autocast, modes ``train`` and ``compiled``.

Nothing here runs on a CPU-only machine: it exits with a message instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return "unknown"


def training_step_syncs(compiled: bool, check_finite: bool = False) -> tuple[int, str]:
    """(number of sync warnings in one warm training step, the first one's text)."""
    from liere.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(224, 16, 10, dim=384, depth=2, num_heads=6, pos_enc="liere")
    model = model.cuda()
    for enc in model.rotary_encodings():
        enc.check_finite = check_finite
    x = torch.randn(8, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    step_model = torch.compile(model, fullgraph=True) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (compilation, kernel set-up)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    first = str(syncs[0].message).splitlines()[0] if syncs else ""
    if check_finite:
        return len(syncs), first
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        verdict = "no sync under set_sync_debug_mode('error')"
    except RuntimeError as err:
        verdict = f"raised under 'error': {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return len(syncs), f"{first} | {verdict}"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine.")
        return 1
    start = time.perf_counter()
    print(
        f"Command: python benchmarks/gpu_check.py; commit {commit()}; torch {torch.__version__}; "
        f"{torch.cuda.get_device_name()}; seed 0"
    )
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], cwd=ROOT, text=True
    )
    print(f"tests/test_cuda.py exit status {tests.returncode}")
    for check_finite in (False, True):
        for compiled in (False, True):
            label = f"{'compiled' if compiled else 'eager'}, check_finite={check_finite}"
            try:
                count, detail = training_step_syncs(compiled, check_finite)
                print(f"training step ({label}): {count} sync call sites; {detail}")
            except Exception as err:  # report and go on to the benchmark
                print(f"training step ({label}) failed: {err!r}")
    bench = [
        sys.executable, "benchmarks/bench_attention.py", "--dim", "768", "--heads", "12",
        "--batch", "64", "--autocast", "bf16", "--rounds", "10", "--modes", "train", "compiled",
        "--cases", "rope-mixed", "liere8", "liere64",
    ]  # fmt: skip
    print("$ " + " ".join(bench[1:]), flush=True)
    subprocess.run(bench, cwd=ROOT, text=True)
    print(f"gpu_check took {time.perf_counter() - start:.0f} s")
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
