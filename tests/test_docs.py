"""Every Python code block in docs/*.md runs (the guides' examples stay true)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [
    pytest.param(code, id=f"{path.name}:{i}")
    for path in sorted(DOCS.glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_docs_code_block_runs(code):
    exec(compile(code, "<docs>", "exec"), {})


def test_docs_have_code_blocks():
    assert BLOCKS, "no Python code block found in docs/"
