"""Optional compiled CPU kernels for the hot loops of LieRE: the squarings, the products
along rays, the blockwise application of the rotations to q and k, RoPE on q and k, and the
position polynomial's coefficients.

Note [compiled kernels]
~~~~~~~~~~~~~~~~~~~~~~~
After the series GEMM the work left per token is small (an 8x8 product is 512 multiply-adds)
but there are many tokens: torch.bmm of 9,408 8x8 matrices spends most of its time on
per-matrix overhead, the eager entry-major products of ``liere.speed.taylor`` make one pass over
the whole batch per multiply-add row, and rotating q and k through bmm needs a gather and a
scatter of both. Plain C loops keep each matrix in registers or L1 instead:

* ``squarings``: ``R = T^(2^j_n)`` per matrix, each token with its own ``j_n`` (Note
  [per-token squarings] in ``liere.speed.token_squarings``), written straight into the
  ``(h, n, m, s, s)`` layout the application reads (into given rows of a larger tensor when
  some tokens come from products along rays). Blocks up to 16 are squared as many at a time
  as a vector register holds floats (16 with AVX-512, 8 with AVX2), one matrix per lane;
  blocks of 32 and 64 one at a time with a register-tiled product. Vector widths and tiles
  follow the CPU the compiler targets (``LIERE_VBYTES``, ``LIERE_VREGS`` in ``common.h``).
  The backward recomputes the squares from ``T`` (nothing but ``T`` is saved) and runs
  ``G <- G S^T + S^T G`` per matrix. Keeping the squares instead was measured slower here
  (57 MB more written and read per dense ViT-S layer at batch 8 cost more than the third of
  the backward's products it saves), with or without huge pages.
* ``rays``: ``R[dst] = R[left] @ R[right]`` for the tokens split along rays (Note [products
  along rays] in ``liere.speed.rays``), one task per (head, block), operands copied into L1-sized
  buffers first (a product read straight from a tensor of tens of MB stalled on every first
  touch, 4x slower); the backward accumulates in a per-task scratch and writes out the
  gradient of the directly computed tokens only.
* ``apply``: ``q' = R q`` and ``k' = R k`` block by block for blocks up to 64, read in place
  from any strides (q and k are usually views of one qkv tensor) and written to fresh
  contiguous tensors, prefix tokens copied; one token per task, batch rows in tiles that
  share each load of ``R``. The backward gives ``R^T dq'`` and ``dR = sum_batch dq' q^T``.
* ``rope``: RoPE on q and k (the RoPE family: AxialRoPE, MixedRoPE, LieRE with 2x2 blocks)
  and its backward, the tables' gradient summed over the batch in the same pass (Note [RoPE
  kernel] in ``liere.speed.rope``); rows swept in memory order when no table needs a gradient.
* ``poly``: the coefficient recursion of the position polynomial (Note [series as a
  polynomial in the positions] in ``liere.speed.polynomial``) and its backward for blocks up
  to 8x8, one task per (head, block). Through PyTorch it was some thirty batched products,
  copies and concatenations per call, each a parallel region; on a machine with a competing
  load each region waits for a descheduled thread, and LieRE_8's layer collapsed to 840 ms
  (AxialRoPE's 276). As one region each way it runs 372-376 ms there (docs/performance.md).

All split their work over torch's OpenMP threads: built with ``-fopenmp``, the library
links ``libgomp.so.1``, which resolves to the copy torch has loaded, so the kernels run on
torch's worker threads (awake right after torch's own parallel ops) instead of competing
with them. A busy machine switches them to liere's own worker pool for a while (Note [kernel
threads] in ``csrc/common.h``): an OpenMP region ends at a barrier that waits for every
thread of its team, and a thread the OS has descheduled holds it for a time slice, at each
of the kernels' calls; in the pool the caller runs the pieces no worker has claimed and
never waits for a worker that has not started. Built without OpenMP, the pool runs every
call. Their outputs come from torch's allocator.

The source is C11 with GCC/Clang vector extensions and pthreads (no Python or torch
headers), compiled on first use with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) in 10-20 s and cached under ``$LIERE_CACHE_DIR``
(default ``~/.cache/liere``), keyed by the source, the compiler and the CPU. Without a
compiler, on other devices, or with ``LIERE_KERNELS=0``, everything runs on the PyTorch
path, which is also the reference the tests compare with.

Environment: ``LIERE_KERNELS=0`` (off), ``LIERE_CACHE_DIR`` (where the library is cached),
``CC`` (the compiler), ``LIERE_KERNELS_OPENMP=0`` (build without OpenMP: the pool
runs every call), ``LIERE_KERNEL_THREADS`` (threads per call; default ``torch.get_num_threads()``).

The first build is announced on the ``liere.kernels`` logger (a warning, so it shows by
default) and can be done ahead of time: ``python -m liere.kernels``. The cache directory
must belong to the current user and be writable by nobody else; otherwise the kernels stay
off (with the reason in ``unavailable_reason()``) rather than load a library another user
could have planted. There is no fallback to a shared temporary directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "available",
    "unavailable_reason",
    "usable",
    "status",
    "SIZES",
    "APPLY_SIZES",
    "MAX_SQUARINGS",
    "RAY_SIZES",
    "ray_products_forward",
    "ray_products_backward",
]

_LOG = logging.getLogger(__name__)


def _read_source(name: str) -> str:
    """One piece of the kernels' C source, shipped in the package (``liere/csrc``)."""
    return (resources.files("liere") / "csrc" / name).read_text(encoding="utf-8")


# block sizes compiled; other sizes use the PyTorch path
SIZES = (4, 8, 16, 32, 64)
# block sizes of the compiled application (dense heads too: one pass over q and k instead of
# gathers, scatters and a batched GEMM)
APPLY_SIZES = (4, 8, 16, 32, 64)
# squarings per matrix the kernels accept (stack buffers); more falls back to PyTorch
MAX_SQUARINGS = 24
# block sizes of the compiled products along rays
RAY_SIZES = (4, 8, 16, 32, 64)
# block sizes of the compiled polynomial coefficients (larger blocks: PyTorch's batched
# products, which MKL runs faster than this kernel's plain loops)
POLY_SIZES = (4, 8)
# the highest degree of the position polynomial (float64's series: 24)
MAX_POLY_DEGREE = 24

_COMMON = _read_source("common.h")

# Pieces shared by both squaring templates: the context (where the series, the squaring counts,
# the upstream gradient and the output are) and the exported entry point, whose work items are
# lane groups (small blocks) or single matrices (large blocks).
_SQ_CONTEXT = _read_source("squarings_context.in")

_SQ_ENTRY = _read_source("squarings_entry.in")


def _with_shared_pieces(template: str) -> str:
    """Expand ``SQ_CONTEXT`` and ``SQ_ENTRY(items)`` in a squaring template."""
    template = template.replace("SQ_CONTEXT\n", _SQ_CONTEXT)
    return re.sub(r"SQ_ENTRY\((.*)\)\n", lambda m: _SQ_ENTRY.replace("ITEMS", m.group(1)), template)


# Dense S x S products and transposes, one instance per (real type, block size S), used by the
# large-block squarings, the products along rays and the application.
_GEMM = _read_source("gemm.c.in")

# Products along rays, one instance per (real type, block size S).
_RAYS = _read_source("rays.c.in")


# One instance per (real type, block size S). Layout letters as in liere.speed.taylor. The
# squarings work on LW matrices at once, one per vector lane ("structure of arrays"): every
# multiply-add is a full-width vector operation with no dependency between lanes.
_SQUARINGS = _read_source("squarings.c.in")

# Squarings for larger blocks (32, 64), one matrix at a time: a register-tiled product (GR rows
# of GQ vector registers of accumulators, gemm.c.in), each matrix squared in L1/L2 and written
# once.
_SQUARINGS_LARGE = _read_source("squarings_large.c.in")

# The squarings and the products along rays in one parallel region, one instance per (real
# type, block size S); after both.
_ROTATIONS = _read_source("rotations.c.in")

# The blockwise application, one instance per (real type, block size S).
_APPLY = _read_source("apply.c.in")

# The position polynomial's coefficients and their backward (Note [series as a polynomial in
# the positions] in liere/speed/polynomial.py).
_POLY_SOURCE = _read_source("poly.c.in")

# RoPE on q and k and its backward, one instance per real type (Note [RoPE kernel] in
# liere/speed/rope.py); named like a block size 2 instance.
_ROPE = _read_source("rope.c.in")

_REALS = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}
_INTS = {"float": "int32_t", "double": "int64_t"}
_REALS_BY_NAME = {"float": "f32", "double": "f64"}


def _instance(template: str, real: str, size: int) -> str:
    """``template`` for one real type and block size: ``SFX``, ``REAL``, ``IREAL`` and the
    size tokens ``S`` (block size), ``CW`` (lanes of one vector register, at most ``S``),
    ``NC`` (vectors per block row), ``RB`` (rows per tile, so that ``RB * NC`` accumulators
    fit in half the registers), ``GQ`` and ``GR`` (the products' tile: ``GR`` rows of ``GQ``
    vectors, ``common.h``) and ``TT`` (the side of a transposed tile) replaced. ``CW``,
    ``NC`` and ``RB`` are C constant expressions of the target's vector width and register
    count (``LIERE_VBYTES``, ``LIERE_VREGS`` in ``common.h``), which the compiler knows and
    this process need not guess."""
    tag = _REALS_BY_NAME[real]
    code = template.replace("SFX", f"{tag}_s{size}").replace("IREAL", _INTS[real])
    code = code.replace("REAL", real)
    width = f"(LIERE_VBYTES / {4 if real == 'float' else 8})"
    lanes = f"({size} < {width} ? {size} : {width})"
    chunks = f"({size} / {lanes})"
    values = {
        "S": str(size),
        "CW": lanes,
        "NC": chunks,
        "RB": f"LIERE_RB{chunks}",
        "GQ": f"LIERE_GQ{chunks}",
        "GR": f"LIERE_GR({size}, {chunks})",
        "TT": str(min(size, 8)),
    }
    tokens = r"(?<![A-Za-z0-9_])(S|CW|NC|RB|GQ|GR|TT)(?![A-Za-z0-9_])"
    return re.sub(tokens, lambda t: str(values[t.group(1)]), code)


def _source() -> str:
    parts = [_COMMON, f"#define MAXSQ {MAX_SQUARINGS}\n"]
    for real in _INTS:
        small, large = _with_shared_pieces(_SQUARINGS), _with_shared_pieces(_SQUARINGS_LARGE)
        parts += [_instance(_GEMM, real, size) for size in sorted({*SIZES, *APPLY_SIZES})]
        parts += [_instance(small, real, size) for size in SIZES if size <= 16]
        parts += [_instance(large, real, size) for size in SIZES if size > 16]
        parts += [_instance(_RAYS, real, size) for size in RAY_SIZES]
        parts += [_instance(_ROTATIONS, real, size) for size in SIZES if size in RAY_SIZES]
        parts += [_instance(_APPLY, real, size) for size in APPLY_SIZES]
        parts += [_instance(_POLY_SOURCE, real, size) for size in POLY_SIZES]
        parts.append(_instance(_ROPE, real, 2))
    return "\n".join(parts)


_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_fingerprint() -> str:
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if "flags" in info and "model name" in info:
                    break
    except OSError:
        pass
    return info


def _unsafe_directory(path: Path) -> str:
    """Why the library must not load from ``path`` (empty when it may): created if missing
    (mode 0700); it must be a directory of the current user, writable by no one else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        return f"cannot use the kernel cache {path}: {exc} (set LIERE_CACHE_DIR)"
    if not path.is_dir():
        return f"the kernel cache {path} is not a directory (set LIERE_CACHE_DIR)"
    if hasattr(os, "getuid"):
        if info.st_uid != os.getuid():
            return (
                f"the kernel cache {path} belongs to another user (uid {info.st_uid}); "
                f"set LIERE_CACHE_DIR to a directory of your own"
            )
        if info.st_mode & 0o022:
            return (
                f"the kernel cache {path} is writable by other users (mode "
                f"{info.st_mode & 0o777:o}); chmod go-w it or set LIERE_CACHE_DIR"
            )
    return ""


def _cache_dir() -> Path:
    root = os.environ.get("LIERE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "liere"


def _compile(source: str) -> tuple[Optional[ctypes.CDLL], str]:
    compiler = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None
    )
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    attempts = [
        ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
        ["-O3", "-march=native", "-ffp-contract=fast"],
        ["-O3", "-ffp-contract=fast"],
    ]
    if _off(os.environ.get("LIERE_KERNELS_OPENMP", "1")):  # the worker pool only (tests)
        attempts = attempts[1:]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(
            "\0".join([source, compiler, *flags, _cpu_fingerprint(), sys.platform]).encode()
        ).hexdigest()[:20]
        suffix = ".dll" if sys.platform == "win32" else ".so"
        cache = _cache_dir()
        unsafe = _unsafe_directory(cache)
        if unsafe:
            return None, unsafe
        lib = cache / f"kernels-{key}{suffix}"
        if not lib.exists():
            _LOG.warning(
                "liere: compiling its CPU kernels for this machine (once, 10-20 s) into "
                "%s; `python -m liere.kernels` does this ahead of time, LIERE_KERNELS=0 "
                "turns them off",
                cache,
            )
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "kernels.c"
                src.write_text(source)
                built = Path(tmp) / f"kernels{suffix}"
                cmd = [compiler, *flags, "-std=gnu11", "-shared", "-fPIC", "-pthread"]
                cmd += [str(src), "-o", str(built)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(f"{' '.join(cmd)}: {exc}")
                    continue
                if proc.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-2000:]}")
                    continue
                os.replace(built, lib)  # atomic: concurrent builders race harmlessly
        try:
            return ctypes.CDLL(str(lib)), ""
        except OSError as exc:
            errors.append(f"loading {lib}: {exc}")
    return None, "compiling the kernels failed: " + " | ".join(errors)


def _off(value: str) -> bool:
    return value.strip().lower() in ("0", "false", "no", "off")


def _library() -> Optional[ctypes.CDLL]:
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            if _off(os.environ.get("LIERE_KERNELS", "1")):
                lib, reason = None, "disabled by LIERE_KERNELS=0"
            else:
                try:
                    lib, reason = _compile(_source())
                except OSError as exc:  # unwritable cache, ...
                    lib, reason = None, f"building the kernels failed: {exc}"
            _state["reason"] = reason
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when the compiled kernels are built and loaded (Note [compiled kernels]); the first
    call compiles them (about a second), later calls are free."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False (empty when it is True)."""
    _library()
    return str(_state.get("reason", ""))


def vector_width() -> tuple[int, int]:
    """``(bytes per vector register, registers)`` the built kernels target, as the compiler
    saw the CPU (``-march=native``): ``(64, 32)`` with AVX-512, ``(32, 16)`` with AVX2,
    ``(16, 16)`` for plain x86-64. Raises ``RuntimeError`` when the kernels are off."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"liere's kernels are off: {unavailable_reason()}")
    return int(lib.liere_vector_bytes()), int(lib.liere_vector_registers())


def pool_switches() -> int:
    """How many times a kernel call found an OpenMP worker a whole piece late, after which
    the next 64 calls ran on liere's own worker pool (Note [kernel threads] in
    ``csrc/common.h``); 0 when the kernels are off. On a quiet machine it moves now and
    then (0-1 times in 36 training steps, docs/performance.md); a count that keeps growing,
    about once per 64 calls, means the machine is oversubscribed. Raises nothing."""
    lib = _library()
    if lib is None:
        return 0
    fn = lib.liere_pool_switches
    fn.restype = ctypes.c_long
    return int(fn())


def status() -> str:
    """One line for logs and benchmark headers: ``"kernels on (32-byte vectors, 16
    registers)"`` or why they are off."""
    if not available():
        return f"kernels off ({unavailable_reason()})"
    width, registers = vector_width()
    return f"kernels on ({width}-byte vectors, {registers} registers)"


def usable(*tensors: Tensor, size: int, sizes: tuple[int, ...] = SIZES) -> bool:
    """Whether the kernels can serve these tensors: CPU, one dtype among float32/float64,
    backed by memory (not ``torch.func``'s wrappers), a block size among ``sizes`` (``SIZES``
    for the squarings, ``APPLY_SIZES`` for the application) and the kernels built. Callers
    skip the kernels while tracing (``functional.is_tracing``)."""
    if size not in sizes:
        return False
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or t.dtype not in _REALS:
            return False
        if not has_storage(t):
            return False
    return available()


def has_storage(t: Tensor) -> bool:
    """Whether ``t`` has memory a kernel could read: the tensors ``torch.func`` transforms
    (``grad``, ``vmap``, ...) pass through a function wrap their values and have none, so the
    PyTorch path runs under them."""
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _threads() -> int:
    return int(os.environ.get("LIERE_KERNEL_THREADS", torch.get_num_threads()))


def _fresh(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised contiguous tensor of ``like``'s dtype and device (``like``'s shape
    unless ``shape`` is given), from torch's allocator. (A pool of reused storages and
    ``madvise`` huge-page hints used to live here; both are gone: the pool needed a private
    torch API, and neither belongs in a library. Where page faults and zeroing of large
    buffers matter, preload jemalloc or tcmalloc, as PyTorch's CPU performance guide advises;
    docs/performance.md has the measurement.)"""
    size = tuple(shape) if shape else tuple(like.shape)
    return torch.empty(size, dtype=like.dtype, device=like.device)


def row_strides(like: Tensor) -> tuple[int, ...]:
    """Strides of a dense tensor shaped like ``like`` whose leading dims are laid out in the
    order of ``like``'s strides (as elementwise PyTorch ops lay out their outputs) and whose
    last dim is contiguous: rotating q, a ``(b, h, n, d)`` view of a ``(b, n, 3, h, d)`` qkv,
    gives a ``(b, n, h, d)``-ordered result, so attention's output reshapes to ``(b, n, h*d)``
    without a copy (Note [output layout])."""
    lead = like.dim() - 1
    strides_in = like.stride()
    order = sorted(range(lead), key=lambda i: (-strides_in[i], i)) + [lead]
    strides = [0] * like.dim()
    step = 1
    for i in reversed(order):
        strides[i] = step
        step *= max(like.shape[i], 1)
    return tuple(strides)


def _fresh_rows(like: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``like`` with ``row_strides(like)``."""
    return torch.empty_strided(like.shape, row_strides(like), dtype=like.dtype, device=like.device)


# Note [output layout]: the application and RoPE kernels write rows (b, h, t) of d entries at
# any strides; their outputs take the layout of their inputs (``_fresh_rows``). With contiguous
# (b, h, n, d) outputs, scaled_dot_product_attention's output came out (b, h, n, d) too and the
# attention layer copied it to (b, n, h*d) before its output projection: one extra pass and
# buffer per layer (2.3 MB at ViT-S/16, batch 8) that no encoding had with the complex
# multiplication, whose outputs follow q's layout.


def _run(kind: str, dtype: torch.dtype, size: int, *args: Any) -> None:
    """Call a kernel; its status says whether every scratch allocation succeeded."""
    if _fn(kind, dtype, size)(*args):
        raise MemoryError(
            f"liere.kernels: the {kind} kernel could not allocate its scratch memory "
            f"(block size {size}, {dtype}); free memory or set LIERE_KERNELS=0"
        )


# Note [kernel argument checks]: every wrapper checks what it hands to C (device, dtype,
# shape, contiguity where the kernel assumes it, index and squaring ranges) and raises a
# ValueError otherwise: a pointer only crosses when the C code's assumptions hold, so bad
# input never reads or writes out of bounds. The value checks are reductions over small index
# tensors (CPU only: the kernels never see another device).


def _fail(message: str) -> None:
    raise ValueError(f"liere.kernels: {message}")


def _check_real(
    name: str,
    t: Tensor,
    dtype: torch.dtype,
    shape: Optional[tuple[int, ...]] = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, Tensor) or t.device.type != "cpu":
        _fail(f"{name} must be a CPU tensor; got {getattr(t, 'device', type(t).__name__)}.")
    if t.dtype != dtype or dtype not in _REALS:
        _fail(f"{name} must be {dtype} (float32 or float64, one dtype for all); got {t.dtype}.")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}.")
    if contiguous and not t.is_contiguous():
        _fail(f"{name} must be contiguous.")
    if any(st < 0 for st in t.stride()):
        _fail(f"{name} has negative strides {t.stride()}.")


def _check_index(
    name: str, t: Tensor, dtype: torch.dtype, length: int, low: int, high: int
) -> None:
    """``t`` is a contiguous CPU ``(length,)`` ``dtype`` tensor with values in [low, high]."""
    if not isinstance(t, Tensor) or t.device.type != "cpu" or t.dtype != dtype:
        _fail(f"{name} must be a CPU {dtype} tensor; got {getattr(t, 'dtype', type(t).__name__)}.")
    if t.dim() != 1 or t.shape[0] != length or not t.is_contiguous():
        _fail(f"{name} must be contiguous of shape ({length},); got {tuple(t.shape)}.")
    if length and (int(t.min()) < low or int(t.max()) > high):
        _fail(f"{name} must lie in [{low}, {high}]; got [{int(t.min())}, {int(t.max())}].")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _strides(t: Tensor) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _fn(kind: str, dtype: torch.dtype, size: int) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    lib = _library()
    assert lib is not None
    fn = getattr(lib, f"liere_{kind}_{_REALS[dtype][1]}_s{size}")
    if not getattr(fn, "_liere_typed", False):
        p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        if kind == "squarings":
            fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i, i]
        elif kind == "rays":
            fn.argtypes = [p, p, p, p, i64, p, p, p, i64, i64, i64, i64, i]
        elif kind == "rotations":
            fn.argtypes = [p, p, p, p, p, p, p, i64, p, p, p, i64, i64, i64, i64, i, i]
        elif kind == "poly":
            fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i, i, i]
        elif kind == "rope":
            fn.argtypes = [p] * 15 + [i64] * 6 + [i, i]
        else:
            fn.argtypes = [p] * 13 + [i64] * 6 + [i, i]
        fn.restype = ctypes.c_int  # nonzero: a scratch allocation failed
        fn._liere_typed = True
    return fn


# Layouts of a series the squarings read (token n, head h, block m, entry e = (i, j)):
#   "entry"     (s, s, h*m, N)  the 1-2 axis GEMM for blocks <= 8
#   "batch"     (N, h*m, s, s)  the 1-2 axis GEMM for larger blocks
#   "entry-hnm" (s, s, h*N*m)   the 3-axis Paterson-Stockmeyer series for blocks <= 8
#   "rows"      (h*m, s, N, s)  the 1-2 axis GEMM for larger blocks, one batched product over
#                               the coefficients' rows (Note [series in rows] in
#                               ``liere.speed.polynomial``)
LAYOUTS = ("entry", "batch", "entry-hnm", "rows")


def _series_strides(layout: str, s: int, h: int, m: int, n: int) -> tuple[int, ...]:
    """Strides (entry column, head, block, token, entry row) of a contiguous series in
    ``layout``: entry ``(i, j)`` is at ``i * row + j * column``."""
    if layout == "entry":
        return (h * m * n, m * n, n, 1, s * h * m * n)
    if layout == "batch":
        return (1, m * s * s, s * s, h * m * s * s, s)
    if layout == "entry-hnm":
        return (h * n * m, n * m, 1, m, s * h * n * m)
    if layout == "rows":
        return (1, m * s * n * s, s * n * s, s, n * s)
    raise ValueError(f"unknown series layout {layout!r}; expected one of {LAYOUTS}")


def block_size_of(series: Tensor, layout: str) -> int:
    return int(series.shape[-1] if layout in ("batch", "rows") else series.shape[0])


def squarings_forward(
    series: Tensor,
    squarings: Tensor,
    h: int,
    m: int,
    layout: str,
    out: Optional[Tensor] = None,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """``R[h, n, m] = T[h, m, n]^(2^squarings[n])`` (Note [compiled kernels]); with ``out``
    and ``rows``, token ``n`` is written to row ``rows[n]`` of ``out`` (other rows are left
    as they are).

    Shape:
        series contiguous in ``layout`` (``LAYOUTS``); squarings ``(N,)`` int32; rows ``(N,)``
        int64 -> ``(h, N, m, s, s)``, or ``out`` ``(h, N', m, s, s)`` contiguous
    """
    s, n = _check_series(series, squarings, h, m, layout)
    if out is None:
        if rows is not None:
            _fail("rows needs out (the tensor whose rows it names).")
        out = _fresh(series, h, n, m, s, s)
    else:
        _check_token_rows("out", out, series.dtype, (h, m, s), n, rows)
    strides = (ctypes.c_int64 * 5)(*_series_strides(layout, s, h, m, n))
    _run(
        "squarings", series.dtype, s, _ptr(series), strides, _ptr(squarings), None, _ptr(out),
        _ptr(rows), h, m, n, out.shape[1], 0, _threads(),
    )  # fmt: skip
    return out


def _check_token_rows(
    name: str,
    t: Tensor,
    dtype: torch.dtype,
    hms: tuple[int, int, int],
    n: int,
    rows: Optional[Tensor],
) -> None:
    """``t`` is a contiguous ``(h, N', m, s, s)`` tensor holding ``n`` tokens: in rows
    ``rows[n]`` (each in ``[0, N')``) or, without ``rows``, ``N' == n``."""
    h, m, s = hms
    if t.dim() != 5:
        _fail(f"{name} must be (h, N', m, s, s); got {tuple(t.shape)}.")
    _check_real(name, t, dtype, (h, t.shape[1], m, s, s))
    if rows is None:
        if t.shape[1] != n:
            _fail(f"{name} must have {n} token rows without rows; got {t.shape[1]}.")
    else:
        _check_index("rows", rows, torch.int64, n, 0, t.shape[1] - 1)


def _check_series(
    series: Tensor, squarings: Tensor, h: int, m: int, layout: str
) -> tuple[int, int]:
    """Block size and token count of a series, after checking it and the squaring counts."""
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    if series.dim() not in (3, 4):
        _fail(f"series must be 3-D or 4-D in layout {layout!r}; got {tuple(series.shape)}.")
    s = block_size_of(series, layout)
    if s not in SIZES:
        _fail(f"block size {s} is not compiled (sizes {SIZES}).")
    if not isinstance(squarings, Tensor) or squarings.dim() != 1:
        _fail("squarings must be a 1-D int32 tensor (one count per token).")
    n = squarings.shape[0]
    _check_real("series", series, series.dtype)
    if series.numel() != h * m * n * s * s:
        _fail(
            f"series has {series.numel()} entries; {h} heads x {m} blocks x {n} tokens x "
            f"{s}x{s} need {h * m * n * s * s}."
        )
    _check_index("squarings", squarings, torch.int32, n, 0, MAX_SQUARINGS)
    return s, n


def squarings_backward(
    series: Tensor,
    squarings: Tensor,
    grad: Tensor,
    h: int,
    m: int,
    layout: str,
    rows: Optional[Tensor] = None,
) -> Tensor:
    """``dL/dT`` from ``dL/dR`` (``grad``, contiguous ``(h, N, m, s, s)``, or with ``rows``
    ``(h, N', m, s, s)`` with token ``n`` in row ``rows[n]``), laid out like ``series``."""
    s, n = _check_series(series, squarings, h, m, layout)
    _check_token_rows("grad", grad, series.dtype, (h, m, s), n, rows)
    out = _fresh(series)
    strides = (ctypes.c_int64 * 5)(*_series_strides(layout, s, h, m, n))
    _run(
        "squarings", series.dtype, s, _ptr(series), strides, _ptr(squarings), _ptr(grad),
        _ptr(out), _ptr(rows), h, m, n, grad.shape[1], 1, _threads(),
    )  # fmt: skip
    return out


def apply_forward(q: Tensor, k: Tensor, rotations: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """``(R q, R k)`` block by block, the first ``p`` tokens copied (Note [compiled kernels]).

    Shape:
        q, k ``(b, h, p + n, d)`` (any strides); rotations ``(h | 1, n, m, s, s)`` contiguous
        -> two contiguous ``(b, h, p + n, d)``
    """
    b, heads, tokens, hr, m, s = _check_application(q, k, rotations, p)
    out_q = _fresh_rows(q)
    out_k = torch.empty_like(out_q)
    _run(
        "apply", q.dtype, s, _ptr(q), _strides(q), _ptr(k), _strides(k), None, None, None,
        None, _ptr(rotations), _ptr(out_q), _ptr(out_k), _strides(out_q), None, b, heads,
        tokens, p, m, hr, 0, _threads(),
    )  # fmt: skip
    return out_q, out_k


def _check_application(
    q: Tensor, k: Tensor, rotations: Tensor, p: int
) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4 or rotations.dim() != 5:
        _fail(f"q must be (b, h, p + n, d) and rotations (h', n, m, s, s); got "
              f"{tuple(q.shape)} and {tuple(rotations.shape)}.")  # fmt: skip
    b, heads, tokens, d = q.shape
    hr, n, m, s, s2 = rotations.shape
    _check_real("q", q, q.dtype, contiguous=False)
    _check_real("k", k, q.dtype, tuple(q.shape), contiguous=False)
    _check_real("rotations", rotations, q.dtype, (hr, n, m, s, s))
    if s not in APPLY_SIZES or s2 != s or m * s != d:
        _fail(f"rotations' {m} blocks of {s}x{s2} must cover head_dim {d} (sizes {APPLY_SIZES}).")
    if not 0 <= p <= tokens or tokens - p != n:
        _fail(f"{tokens} tokens minus {p} prefix tokens must equal the {n} rotated tokens.")
    if hr < 1 or heads % hr:
        _fail(f"{heads} heads must be a multiple of the rotations' {hr} heads.")
    return b, heads, tokens, hr, m, s


def apply_backward(
    q: Tensor,
    k: Tensor,
    rotations: Tensor,
    grad_q: Tensor,
    grad_k: Tensor,
    p: int,
    need_inputs: bool,
    need_rotations: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``apply_forward`` for q, k (``R^T g``, prefix copied) and the rotations
    (``sum g x^T`` over the batch and the heads sharing a rotation)."""
    b, heads, tokens, hr, m, s = _check_application(q, k, rotations, p)
    _check_real("grad_q", grad_q, q.dtype, tuple(q.shape), contiguous=False)
    _check_real("grad_k", grad_k, q.dtype, tuple(q.shape), contiguous=False)
    so = (ctypes.c_int64 * 4)(*row_strides(grad_q))
    d_q = d_k = d_rot = None
    if need_inputs:
        d_q = _fresh_rows(grad_q)
        d_k = torch.empty_like(d_q)
    if need_rotations:
        d_rot = _fresh(rotations)
    _run(
        "apply", q.dtype, s, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(grad_q),
        _strides(grad_q), _ptr(grad_k), _strides(grad_k), _ptr(rotations), _ptr(d_q),
        _ptr(d_k), so, _ptr(d_rot), b, heads, tokens, p, m, hr, 1, _threads(),
    )  # fmt: skip
    return d_q, d_k, d_rot


def _check_rope(
    q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, p: int
) -> tuple[int, int, int, int, int]:
    if not isinstance(q, Tensor) or not isinstance(cos, Tensor) or q.dim() != 4 or cos.dim() != 3:
        shapes = [tuple(getattr(t, "shape", ())) for t in (q, cos)]
        _fail(f"q must be (b, h, p + n, 2k) and cos (h', n, k); got {shapes[0]} and {shapes[1]}.")
    b, heads, tokens, d = q.shape
    hr, n, pairs = cos.shape
    _check_real("q", q, q.dtype, contiguous=False)
    if k is not None:
        _check_real("k", k, q.dtype, tuple(q.shape), contiguous=False)
    _check_real("cos", cos, q.dtype, (hr, n, pairs))
    _check_real("sin", sin, q.dtype, (hr, n, pairs))
    if d != 2 * pairs:
        _fail(f"cos and sin must have head_dim / 2 = {d // 2} pairs per row; got {pairs}.")
    for name, t in (("q", q), ("k", k)):
        if t is not None and t.stride(-1) != 1:
            _fail(f"{name} needs a unit last stride; got strides {t.stride()}.")
    if not 0 <= p <= tokens or tokens - p != n:
        _fail(f"{tokens} tokens minus {p} prefix tokens must equal the {n} rotated tokens.")
    if hr < 1 or heads % hr:
        _fail(f"{heads} heads must be a multiple of the tables' {hr} heads.")
    return b, heads, tokens, hr, pairs


def rope_forward(
    q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, p: int
) -> tuple[Tensor, Optional[Tensor]]:
    """RoPE on q and k (``k`` may be ``None``: q alone), the first ``p`` tokens copied (Note
    [RoPE kernel] in ``liere.speed.rope``).

    Shape:
        q, k ``(b, h, p + n, 2k)`` (unit last stride); cos, sin ``(h | 1, n, k)`` contiguous
        -> two contiguous ``(b, h, p + n, 2k)`` (the second ``None`` without k)
    """
    b, heads, tokens, hr, pairs = _check_rope(q, k, cos, sin, p)
    out_q = _fresh_rows(q)
    out_k = None if k is None else torch.empty_like(out_q)
    sk = _strides(q if k is None else k)
    _run(
        "rope", q.dtype, 2, _ptr(q), _strides(q), _ptr(k), sk, None, None, None, None,
        _ptr(cos), _ptr(sin), _ptr(out_q), _ptr(out_k), _strides(out_q), None, None, b, heads,
        tokens, p, pairs, hr, 0, _threads(),
    )  # fmt: skip
    return out_q, out_k


def rope_backward(
    q: Tensor,
    k: Optional[Tensor],
    cos: Tensor,
    sin: Tensor,
    grad_q: Tensor,
    grad_k: Optional[Tensor],
    p: int,
    need_inputs: bool,
    need_tables: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``rope_forward`` for q and k (turned back, prefix copied) and for cos and
    sin (summed over the batch, q and k, and the heads sharing a table); ``k`` and ``grad_k``
    both ``None`` for q alone."""
    b, heads, tokens, hr, pairs = _check_rope(q, k, cos, sin, p)
    if (k is None) != (grad_k is None):
        _fail("k and grad_k must be given together (or both None for q alone).")
    for name, g in (("grad_q", grad_q), ("grad_k", grad_k)):
        if g is not None:
            _check_real(name, g, q.dtype, tuple(q.shape), contiguous=False)
            if g.stride(-1) != 1:
                _fail(f"{name} needs a unit last stride; got strides {g.stride()}.")
    d_q = d_k = d_cos = d_sin = None
    so = (ctypes.c_int64 * 4)(*row_strides(grad_q))
    if need_inputs:
        d_q = _fresh_rows(grad_q)
        d_k = None if grad_k is None else torch.empty_like(d_q)
    if need_tables:
        d_cos, d_sin = _fresh(cos), _fresh(sin)
    sk = _strides(q if k is None else k)
    sgk = _strides(grad_q if grad_k is None else grad_k)
    _run(
        "rope", q.dtype, 2, _ptr(q), _strides(q), _ptr(k), sk, _ptr(grad_q), _strides(grad_q),
        _ptr(grad_k), sgk, _ptr(cos), _ptr(sin), _ptr(d_q), _ptr(d_k), so, _ptr(d_cos),
        _ptr(d_sin), b, heads, tokens, p, pairs, hr, 1, _threads(),
    )  # fmt: skip
    return d_q, d_k, d_cos, d_sin


def ray_products_forward(rotations: Tensor, dst: Tensor, left: Tensor, right: Tensor) -> None:
    """In place, item by item: ``R[:, dst_i] = R[:, left_i] @ R[:, right_i]`` (Note [products
    along rays] in ``liere.speed.rays``); items in level order (a token is written before it is
    read).

    Shape:
        rotations ``(h, n, m, s, s)`` contiguous, ``s`` in ``RAY_SIZES``; dst, left, right
        ``(L,)`` int64
    """
    h, n, m, s = _check_rays(rotations, dst, left, right)
    _run(
        "rays", rotations.dtype, s, _ptr(rotations), None, None, None, 0, _ptr(dst),
        _ptr(left), _ptr(right), dst.shape[0], h, n, m, _threads(),
    )  # fmt: skip


def _check_rays(
    rotations: Tensor, dst: Tensor, left: Tensor, right: Tensor
) -> tuple[int, int, int, int]:
    if rotations.dim() != 5:
        _fail(f"rotations must be (h, n, m, s, s); got {tuple(rotations.shape)}.")
    h, n, m, s, _ = rotations.shape
    if s not in RAY_SIZES:
        _fail(f"block size {s} is not compiled (sizes {RAY_SIZES}).")
    _check_real("rotations", rotations, rotations.dtype, (h, n, m, s, s))
    count = dst.shape[0] if isinstance(dst, Tensor) and dst.dim() == 1 else -1
    for name, index in (("dst", dst), ("left", left), ("right", right)):
        _check_index(name, index, torch.int64, max(count, 0), 0, n - 1)
    return h, n, m, s


def ray_products_backward(
    rotations: Tensor, grad: Tensor, base: Tensor, dst: Tensor, left: Tensor, right: Tensor
) -> Tensor:
    """The gradient of the tokens in ``base`` (computed directly) from that of every token
    (``grad``, contiguous like ``rotations``), items reversed:
    ``G[:, left_i] += G[:, dst_i] R[:, right_i]^T``, ``G[:, right_i] += R[:, left_i]^T G[:, dst_i]``
    (``grad`` itself is not modified).

    Shape:
        rotations, grad ``(h, n, m, s, s)``; base ``(nb,)`` int64 -> ``(h, nb, m, s, s)``
    """
    h, n, m, s = _check_rays(rotations, dst, left, right)
    _check_real("grad", grad, rotations.dtype, tuple(rotations.shape))
    if not isinstance(base, Tensor) or base.dim() != 1:
        _fail("base must be a 1-D int64 tensor of token indices.")
    _check_index("base", base, torch.int64, base.shape[0], 0, n - 1)
    d_base = _fresh(grad, h, base.shape[0], m, s, s)
    _run(
        "rays", rotations.dtype, s, _ptr(rotations), _ptr(grad), _ptr(d_base), _ptr(base),
        base.shape[0], _ptr(dst), _ptr(left), _ptr(right), dst.shape[0], h, n, m, _threads(),
    )  # fmt: skip
    return d_base


def rotations_forward(
    series: Tensor,
    squarings: Tensor,
    h: int,
    m: int,
    layout: str,
    out: Tensor,
    base: Tensor,
    dst: Tensor,
    left: Tensor,
    right: Tensor,
) -> None:
    """``squarings_forward(series, squarings, h, m, layout, out=out, rows=base)`` then
    ``ray_products_forward(out, dst, left, right)``, in one parallel region (Note [products
    along rays] in ``liere.speed.rays``): the same products, the same bits.

    Shape:
        series contiguous in ``layout`` with ``nb`` tokens; squarings ``(nb,)`` int32; out
        ``(h, n, m, s, s)`` contiguous; base ``(nb,)``, dst, left, right ``(L,)`` int64
    """
    if not isinstance(base, Tensor):
        _fail("base must be a 1-D int64 tensor of token indices.")
    s, nb = _check_series(series, squarings, h, m, layout)
    _check_token_rows("out", out, series.dtype, (h, m, s), nb, base)
    _check_rays(out, dst, left, right)
    strides = (ctypes.c_int64 * 5)(*_series_strides(layout, s, h, m, nb))
    _run(
        "rotations", series.dtype, s, _ptr(series), strides, _ptr(squarings), _ptr(out), None,
        None, _ptr(base), nb, _ptr(dst), _ptr(left), _ptr(right), dst.shape[0], h, m,
        out.shape[1], 0, _threads(),
    )  # fmt: skip


def rotations_backward(
    series: Tensor,
    squarings: Tensor,
    rotations: Tensor,
    grad: Tensor,
    base: Tensor,
    dst: Tensor,
    left: Tensor,
    right: Tensor,
    h: int,
    m: int,
    layout: str,
) -> Tensor:
    """``squarings_backward(series, squarings, ray_products_backward(rotations, grad, base,
    dst, left, right), h, m, layout)`` in one parallel region: ``dL/dT`` of the directly
    computed tokens' series from ``dL/dR`` of every token, laid out like ``series``.

    Shape:
        series with ``nb`` tokens; rotations, grad ``(h, n, m, s, s)`` contiguous; base
        ``(nb,)`` -> as series
    """
    if not isinstance(base, Tensor):
        _fail("base must be a 1-D int64 tensor of token indices.")
    s, nb = _check_series(series, squarings, h, m, layout)
    _check_token_rows("rotations", rotations, series.dtype, (h, m, s), nb, base)
    _check_rays(rotations, dst, left, right)
    _check_real("grad", grad, series.dtype, tuple(rotations.shape))
    out = _fresh(series)
    strides = (ctypes.c_int64 * 5)(*_series_strides(layout, s, h, m, nb))
    _run(
        "rotations", series.dtype, s, _ptr(series), strides, _ptr(squarings), _ptr(rotations),
        _ptr(grad), _ptr(out), _ptr(base), nb, _ptr(dst), _ptr(left), _ptr(right),
        dst.shape[0], h, m, rotations.shape[1], 1, _threads(),
    )  # fmt: skip
    return out


def main() -> int:
    """``python -m liere.kernels``: build (or find) the kernels and say so."""
    logging.basicConfig(format="%(message)s")
    print(f"liere kernels: {status()}")
    return 0 if available() else 1


def poly_offsets(degree: int, axes: int) -> list[int]:
    """Column-block offset of each degree's coefficients in ``C_e``'s side-by-side layout
    (``k + 1`` blocks per degree for two axes, one for one axis); the last entry is the number
    of monomials ``T``. The PyTorch recursion (``liere.speed.polynomial``) and the kernel
    share it."""
    offsets = [0]
    for k in range(degree + 1):
        offsets.append(offsets[-1] + (k + 1 if axes == 2 else 1))
    return offsets


def _check_poly(stacked: Tensor, degree: int) -> tuple[int, int, int, list[int]]:
    if not isinstance(stacked, Tensor) or stacked.dim() != 3:
        _fail(f"stacked must be (blocks, axes * s, s); got {getattr(stacked, 'shape', stacked)}.")
    hm, rows, s = stacked.shape
    _check_real("stacked", stacked, stacked.dtype)
    if s not in POLY_SIZES or rows not in (s, 2 * s):
        _fail(f"stacked must be (blocks, a * s, s) with a in (1, 2), s in {POLY_SIZES}; got "
              f"{tuple(stacked.shape)}.")  # fmt: skip
    if (
        isinstance(degree, bool)
        or not isinstance(degree, int)
        or not 0 <= degree <= MAX_POLY_DEGREE
    ):
        _fail(f"degree must be an integer in [0, {MAX_POLY_DEGREE}]; got {degree!r}.")
    axes = rows // s
    return hm, axes, s, poly_offsets(degree, axes)


def poly_coefficients_forward(
    stacked: Tensor, degree: int, entry_major: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """The position polynomial's coefficients ``C_e`` of every (head, block), side by side
    (Note [series as a polynomial in the positions] in ``liere.speed.polynomial``), and with
    ``entry_major`` the same values laid out as the series GEMM reads them (else ``None``).

    Shape:
        stacked ``(hm, a*s, s)``, a in (1, 2), contiguous -> ``(hm, s, T*s)`` and
        ``(s, s, hm, T)``
    """
    hm, axes, s, offsets = _check_poly(stacked, degree)
    terms = offsets[-1]
    out = _fresh(stacked, hm, s, terms * s)
    flat = _fresh(stacked, s, s, hm, terms) if entry_major else None
    off = torch.tensor(offsets, dtype=torch.int64)
    _run(
        "poly", stacked.dtype, s, _ptr(stacked), _ptr(out), _ptr(flat), None, None, _ptr(off),
        hm, axes, degree, terms, 0, 0, _threads(),
    )  # fmt: skip
    return out, flat


def poly_coefficients_backward(
    grad: Tensor, stacked: Tensor, out: Tensor, degree: int, entry_major: bool = False
) -> Tensor:
    """``poly_coefficients_forward``'s vector-Jacobian product: the gradient with respect to
    ``stacked``, from ``out`` (the coefficients) and ``grad`` (their gradient, laid out as
    ``out`` or, with ``entry_major``, as the forward's entry-major copy).

    Shape:
        grad ``(hm, s, T*s)`` or ``(s, s, hm, T)``, out ``(hm, s, T*s)``; stacked
        ``(hm, a*s, s)`` -> as stacked
    """
    hm, axes, s, offsets = _check_poly(stacked, degree)
    terms = offsets[-1]
    _check_real("out", out, stacked.dtype, (hm, s, terms * s))
    grad_shape = (s, s, hm, terms) if entry_major else (hm, s, terms * s)
    _check_real("grad", grad, stacked.dtype, grad_shape)
    d_stacked = _fresh(stacked)
    off = torch.tensor(offsets, dtype=torch.int64)
    _run(
        "poly", stacked.dtype, s, _ptr(stacked), _ptr(out), None, _ptr(grad), _ptr(d_stacked),
        _ptr(off), hm, axes, degree, terms, int(entry_major), 1, _threads(),
    )  # fmt: skip
    return d_stacked
