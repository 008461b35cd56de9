"""Every Python code block in docs/*.md runs (the guides' examples stay true)."""

import importlib.util
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [
    pytest.param(code, id=f"{path.name}:{i}")
    for path in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
]


def _missing_module(code):
    """A top-level module the block imports that is not installed here (e.g. timm, which has
    its own venv and runs the swap guide's snippet in tests/integrations)."""
    for name in re.findall(r"^(?:import|from) (\w+)", code, flags=re.M):
        if importlib.util.find_spec(name) is None:
            return name
    return None


@pytest.mark.parametrize("code", BLOCKS)
def test_docs_code_block_runs(code):
    missing = _missing_module(code)
    if missing is not None:
        pytest.skip(f"needs {missing}")
    namespace: dict = {}
    exec(compile(code, "<docs>", "exec"), namespace)
    for name, value in list(namespace.items()):  # guides may define tests: run them too
        if name.startswith("test_") and callable(value):
            value()


def test_docs_have_code_blocks():
    assert BLOCKS, "no Python code block found in docs/"
