#!/bin/bash
cd "$(dirname "$0")/../.."
OLD=${OLD:?set OLD to a checkout of f671e3f}
for i in 1 2 3 4; do
  PYTHONPATH=$OLD/src .venv/bin/python benchmarks/bench_attention.py --threads 2 --batch 8 32 --rounds 10 --modes train --cases rope-mixed liere8 liere64 > results/runs/eager_zen3_ab_f671e3f_$i.txt 2>&1
  .venv/bin/python benchmarks/bench_attention.py --threads 2 --batch 8 32 --rounds 10 --modes train --cases rope-mixed liere8 liere64 > results/runs/eager_zen3_27fd3bc_$i.txt 2>&1
done
echo done
