"""Whether torch.compile, torch.export, TorchScript or ONNX export is tracing the code.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

from typing import Any

import torch


def is_tracing() -> bool:
    """True while torch.compile, torch.export, TorchScript tracing or ONNX export traces the
    code: data-dependent choices (the squaring count, caches, input checks) are skipped then."""
    for check in _TRACING_CHECKS:
        if check():
            return True
    return False


def _tracing_checks() -> tuple[Any, ...]:
    """The tracing predicates this torch has (looked up once: they are functions)."""
    checks = []
    for owner, name in (
        ("compiler", "is_compiling"),
        ("compiler", "is_exporting"),
        ("jit", "is_tracing"),
        ("onnx", "is_in_onnx_export"),
    ):
        check = getattr(getattr(torch, owner, None), name, None)
        if callable(check):
            checks.append(check)
    return tuple(checks)


_TRACING_CHECKS = _tracing_checks()
