"""The README's Python snippets run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(python_blocks()) >= 1


def test_quick_start_runs():
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README quick start", "exec"), namespace)
    assert namespace["y"].shape == (8, 197, 384)
    assert namespace["video"].shape == (1568, 3)


def test_user_test_example_runs():
    guide = README.parent / "docs" / "testing.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    block = next(b for b in blocks if "def test_my_attention" in b)
    assert len(block.strip().splitlines()) <= 10
    namespace: dict = {}
    exec(compile(block, "README test example", "exec"), namespace)
    namespace["test_my_attention"]()
