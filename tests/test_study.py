"""examples/study.py: the plan covers what the study promises, and the report reads its runs
correctly (synthetic runs; the training itself is tested in test_tasks.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "examples" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["study"]


def test_the_full_plan_covers_every_case_with_three_seeds(study):
    runs = study.plan(["resolution", "pooling", "data"], [0, 1, 2], quick=False)
    keys = {r.key for r in runs}
    assert len(keys) == len(runs)  # shared runs counted once
    for task in ("relational", "spatial", "mnist"):
        for enc in study.ENCODINGS:
            for seed in (0, 1, 2):
                assert study.Run(task, enc, False, 1.0, seed) in runs
                assert (study.Run(task, enc, True, 1.0, seed) in runs) == (enc in study.ROTARY)
    for task in ("mnist", "spatial"):
        for enc in study.CONTRAST:
            for fraction in study.FRACTIONS:
                assert study.Run(task, enc, False, fraction, 2) in runs
    mean_pooled = [r for r in runs if r.pool == "mean"]
    assert {r.encoding for r in mean_pooled} == set(study.ROTARY)
    assert {r.task for r in mean_pooled} == {"relational"}
    assert len(runs) == 3 * (3 * 16 + 7 + 2 * 5 * 2)


def test_quick_plan_is_one_seed_and_small(study):
    runs = study.plan(["resolution", "pooling", "data"], [0], quick=True)
    assert {r.seed for r in runs} == {0} and len(runs) <= 10


def _record(task, enc, seed, acc, curve, augment=False, fraction=1.0, pool="cls"):
    record = {
        "task": task, "encoding": enc, "augment": augment, "fraction": fraction, "seed": seed,
        "pool": pool, "acc": acc, "curve": curve, "steps": 100, "seconds": 1.0,
        "train_loss": 0.1, "commit": "abc1234",
    }  # fmt: skip
    for scale in ("1.5x", "2x"):
        for scaling in ("extend", "rescale"):
            record[f"acc@{scale}/{scaling}"] = acc / 2 if scaling == "extend" else acc
    return record


def test_report_tables_and_steps_to_the_absolute_baseline(study, tmp_path):
    results = []
    for seed, end in ((0, 0.5), (1, 0.7)):  # absolute ends at 0.6 on average
        results.append(_record("spatial", "absolute", seed, end, [[50, 0.3], [100, end]]))
    for seed in (0, 1):  # liere-8 passes 0.6 at step 50 in both seeds
        results.append(_record("spatial", "liere-8", seed, 0.9, [[50, 0.65], [100, 0.9]]))
    # rope-axial reaches it in one seed only
    results.append(_record("spatial", "rope-axial", 0, 0.7, [[50, 0.5], [100, 0.7]]))
    results.append(_record("spatial", "rope-axial", 1, 0.5, [[50, 0.4], [100, 0.5]]))
    results.append(_record("spatial", "liere-8", 0, 0.4, [], fraction=0.25))
    text = study.write_report(results, tmp_path, "header")
    assert "| liere-8 | 90.0 ± 0.0 | 45.0 ± 0.0 | 90.0 ± 0.0 | 45.0 ± 0.0 | 90.0 ± 0.0 |" in text
    assert "baseline's final accuracy (60.0%" in text
    assert "| liere-8 | 40.0 | - | 90.0 ± 0.0 | 50 ± 0 | 100 |" in text
    assert "| absolute | - | - | 60.0 ± 14.1 | not reached in 1 of 2 seeds (others: 100) |" in text
    assert (
        "| rope-axial | - | - | 60.0 ± 14.1 | not reached in 1 of 2 seeds (others: 100) |" in text
    )
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["header"] == "header" and len(saved["results"]) == len(results)
    assert (tmp_path / "resolution_spatial.png").exists()
    assert (tmp_path / "data_efficiency.png").exists()


def test_steps_to_reach(study):
    curve = [[10, 0.2], [20, 0.6], [30, 0.5]]
    assert study.steps_to_reach(curve, 0.6) == 20
    assert study.steps_to_reach(curve, 0.7) is None
