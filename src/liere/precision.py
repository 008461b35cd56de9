"""Full float32 precision whatever the user's matmul settings (Note [matmul precision]).

Note [matmul precision]
~~~~~~~~~~~~~~~~~~~~~~~
``torch.set_float32_matmul_precision("high" | "medium")``, ``allow_tf32`` and the
``fp32_precision`` flags let float32 matmuls run in TF32 or bf16 (10 or 8 significant bits),
on GPUs and on CPUs with bf16 matrix units. That is fine for a model's projections and wrong
for rotations: a rotation built or applied by bf16 products is no longer a rotation (LieRE
outputs move by 8-36% under "medium"; RoPE angles by 1.5-2%).

liere never flips those process-global flags. Instead:

- elementwise work (RoPE angles, generator sums, RoPE application) is written elementwise,
  which no flag touches;
- products of matrices (the exponential's series and squarings, blockwise application,
  Cayley-STRING's basis) run in float64 whenever a float32 matmul on that device would be
  reduced (``float32_matmul_is_reduced``), and are cast back to float32: the default
  ("highest") pays nothing;
- inside ``torch.compile`` / ``torch.export`` the flags cannot be read, so the products run in
  liere's registered operators (``liere.ops``), whose implementations run eagerly and read
  them there; what must stay in the traced graph computes in float64.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["float32_matmul_is_reduced", "exact_dtype", "no_autocast"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for ``device_type`` (a no-op for devices autocast does not know, such as
    meta): rotations are computed in their own dtype, whatever the caller's autocast."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _backend_precision(device_type: str) -> str:
    backends = torch.backends
    if device_type == "cuda":
        owner = getattr(backends.cuda, "matmul", None)
    elif device_type == "cpu":
        owner = getattr(getattr(backends, "mkldnn", None), "matmul", None)
    else:
        return "unknown"
    value = getattr(owner, "fp32_precision", None)
    if value is None:  # torch before the per-backend flags: the legacy settings
        if device_type == "cuda" and bool(backends.cuda.matmul.allow_tf32):
            return "tf32"
        legacy = torch.get_float32_matmul_precision()
        return "ieee" if legacy == "highest" else legacy
    value = str(value)
    if value == "none":  # inherits the generic setting
        value = str(getattr(backends, "fp32_precision", "none"))
    return value


def float32_matmul_is_reduced(device: torch.device) -> bool:
    """Whether a float32 matmul on ``device`` may run at reduced precision (TF32 / bf16) under
    the current settings. Devices other than CPU and CUDA count as reduced (unknown).

    Reads Python-level flags only: no host synchronisation. Not traceable by dynamo (torch
    skips its backends module), so callers decide before tracing or inside registered ops.
    """
    value = _backend_precision(torch.device(device).type)
    return value not in ("ieee", "none")


def exact_dtype(dtype: torch.dtype, device: torch.device, *, tracing: bool = False) -> torch.dtype:
    """The dtype to run matrix products in for full ``dtype`` precision: float64 for float32
    when float32 matmuls are reduced on ``device`` (or cannot be checked: ``tracing``), else
    ``dtype`` itself."""
    if dtype != torch.float32:
        return dtype
    if tracing or float32_matmul_is_reduced(device):
        return torch.float64
    return dtype
