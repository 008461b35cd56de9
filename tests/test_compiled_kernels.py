"""The compiled C kernels (Note [compiled kernels] in liere.kernels) against the PyTorch path:
per-token squarings and the blockwise application, values and gradients, every compiled
block size, both dtypes, both series layouts, strided and prefixed q/k; the fallback when
no compiler is there; the per-token squaring counts of the PyTorch path."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import qk_views, randn, use_pytorch_path

from liere import LieRE, RotaryAttention, grid_positions
from liere import functional as F
from liere import kernels as K
from liere.speed import blockwise, polynomial
from liere.speed import token_squarings as squaring

needs_kernels = pytest.mark.skipif(
    not K.available(), reason=f"compiled kernels unavailable: {K.unavailable_reason()}"
)


def orthogonal(count, size, seed, dtype, scale=0.3):
    a = randn(count, size, size, seed=seed, dtype=dtype) * scale
    return torch.linalg.matrix_exp(a - a.mT)


@pytest.fixture
def eager(monkeypatch):
    """Run liere's functions as if the kernels were missing."""
    use_pytorch_path(monkeypatch)


# -- per-token squarings ----------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", K.SIZES)
@pytest.mark.parametrize("layout", K.LAYOUTS)
def test_kernel_squarings_match_plain(dtype, size, layout):
    h, m, n = 2, 3, 37  # 37 tokens: two full lane groups and a partial one
    series = orthogonal(n * h * m, size, seed=size, dtype=dtype).view(n, h, m, size, size)
    if layout == "entry":
        series = series.permute(3, 4, 1, 2, 0).reshape(size, size, h * m, n).contiguous()
    elif layout == "batch":
        series = series.reshape(n, h * m, size, size).contiguous()
    elif layout == "rows":  # (h*m, s, n, s)
        series = series.permute(1, 2, 3, 0, 4).reshape(h * m, size, n, size).contiguous()
    else:  # entry-hnm
        series = series.permute(3, 4, 1, 0, 2).reshape(size, size, -1).contiguous()
    js = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    js[0], js[-1] = 0, 6
    fast = K.squarings_forward(series, js, h, m, layout)
    ref = squaring.token_squarings_plain(series, js.long(), h, m, layout)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(fast, ref, atol=tol, rtol=0)
    grad = randn(*ref.shape, seed=2, dtype=dtype)
    d_fast = K.squarings_backward(series, js, grad.contiguous(), h, m, layout)
    leaf = series.clone().requires_grad_(True)
    (d_ref,) = torch.autograd.grad(
        squaring.token_squarings_plain(leaf, js.long(), h, m, layout), leaf, grad
    )
    torch.testing.assert_close(d_fast, d_ref, atol=50 * tol, rtol=0)


@needs_kernels
@pytest.mark.parametrize("layout", ["entry", "batch", "rows"])
def test_kernel_squarings_gradcheck(layout):
    h, m, n, s = 1, 2, 3, 4
    series = orthogonal(n * h * m, s, seed=3, dtype=torch.float64).view(n, h * m, s, s)
    if layout == "entry":
        series = series.permute(2, 3, 1, 0).contiguous()
    elif layout == "rows":
        series = series.permute(1, 2, 0, 3).contiguous()
    js = torch.tensor([2, 0, 1], dtype=torch.int32)
    series.requires_grad_(True)

    def fn(t):
        return squaring.KernelSquarings.apply(t, js, h, m, layout)

    assert torch.autograd.gradcheck(fn, (series,))
    assert torch.autograd.gradgradcheck(fn, (series,))  # recomputed in plain ops


# -- blockwise application --------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", K.APPLY_SIZES)
@pytest.mark.parametrize("rot_heads", [1, 4])
@pytest.mark.parametrize("prefix", [0, 2])
def test_kernel_application_matches_plain(dtype, size, rot_heads, prefix):
    b, h, n, m = 3, 4, 7, 2
    q, k = qk_views(b, h, prefix + n, m * size, dtype, seed=size)
    rot = orthogonal(rot_heads * n * m, size, seed=5, dtype=dtype).view(rot_heads, n, m, size, size)
    fast = K.apply_forward(q, k, rot, prefix)
    ref = blockwise.blockwise_pair_plain(q, k, rot, prefix)
    tol = size * (2e-7 if dtype == torch.float32 else 4e-16)  # sums of `size` products
    for f, r in zip(fast, ref):
        # laid out like q (b, n, h, d), so attention's output reshapes without a copy
        assert f.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(f, r, atol=tol, rtol=0)
    gq, gk = randn(*q.shape, seed=6, dtype=dtype), randn(*k.shape, seed=7, dtype=dtype)
    gq = gq.transpose(1, 2).contiguous().transpose(1, 2)  # a strided upstream gradient
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, rot)]
    outs = blockwise.blockwise_pair_plain(*leaves, prefix)
    d_ref = torch.autograd.grad(outs, leaves, (gq, gk))
    d_fast = K.apply_backward(q, k, rot, gq, gk, prefix, True, True)
    for f, r in zip(d_fast, d_ref):
        torch.testing.assert_close(f, r, atol=10 * tol, rtol=0)
    only_q = K.apply_backward(q, k, rot, gq, gk, prefix, True, False)
    assert only_q[2] is None
    torch.testing.assert_close(only_q[0], d_ref[0], atol=10 * tol, rtol=0)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@needs_kernels
@pytest.mark.skipif(
    __import__("platform").machine() not in ("x86_64", "AMD64") or _cpu_flags() is None,
    reason="reads x86 CPU flags from /proc/cpuinfo",
)
def test_kernels_use_the_vector_width_of_this_cpu():
    # Vectors wider than the CPU's registers are split by the compiler, and the register
    # tiles sized for them spill: on an AVX2 machine the 64x64 kernels ran 5x slower than
    # PyTorch's own path. The build must target what this CPU has.
    flags = _cpu_flags()
    expected = (64, 32) if "avx512f" in flags else (32, 16) if "avx" in flags else (16, 16)
    assert K.vector_width() == expected
    assert f"{expected[0]}-byte vectors" in K.status()


@needs_kernels
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_kernels_split_tokens_and_prefix_rows_over_any_thread_count(threads):
    # each thread takes its share of the tokens and of the prefix rows; every output entry
    # is computed the same way whatever the split, so the bits match one thread's
    b, h, p, n = 5, 4, 2, 6
    q, k = qk_views(b, h, p + n, 16, torch.float32, seed=11)
    gq, gk = randn(*q.shape, seed=12), randn(*q.shape, seed=13)
    rot = orthogonal(h * n * 2, 8, seed=14, dtype=torch.float32).view(h, n, 2, 8, 8)
    angles = randn(h, n, 8, seed=15)
    cos, sin = angles.cos(), angles.sin()

    def run():
        return (
            *K.apply_forward(q, k, rot, p),
            *K.apply_backward(q, k, rot, gq, gk, p, True, True),
            *K.rope_backward(q, k, cos, sin, gq, gk, p, True, True),
        )

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(threads)
        many = run()
    finally:
        torch.set_num_threads(before)
    for a, c in zip(one, many):
        assert torch.equal(a, c)


@needs_kernels
def test_kernel_application_with_strided_channels():
    # last-dim stride 2: the kernel gathers the row before rotating it
    b, h, n, s = 2, 2, 5, 4
    wide = randn(b, h, n, 2 * 2 * s, seed=1, dtype=torch.float64)
    q, k = wide[..., ::2], wide[..., 1::2]
    rot = orthogonal(h * n * 2, s, seed=2, dtype=torch.float64).view(h, n, 2, s, s)
    for f, r in zip(K.apply_forward(q, k, rot, 0), blockwise.blockwise_pair_plain(q, k, rot, 0)):
        torch.testing.assert_close(f, r, atol=1e-14, rtol=0)


@needs_kernels
def test_kernel_application_gradcheck():
    q, k = qk_views(2, 2, 4, 8, torch.float64, seed=3)
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    rot = orthogonal(2 * 3 * 2, 4, seed=4, dtype=torch.float64).view(2, 3, 2, 4, 4)
    rot.requires_grad_(True)

    def fn(q, k, r):
        return F.apply_blockwise_pair(q, k, r, num_prefix_tokens=1)

    assert torch.autograd.gradcheck(fn, (q, k, rot))
    assert torch.autograd.gradgradcheck(fn, (q, k, rot))


# -- the library with and without kernels -----------------------------------------------------


def encode(enc, positions, x_seed=0):
    """q', k' of a LieRE encoding and the gradients of a fixed loss wrt its parameters."""
    enc.zero_grad()
    q, k = qk_views(2, enc.num_heads, positions.shape[0] + 1, enc.head_dim, torch.float32, x_seed)
    layer_q, layer_k = enc(q, k, positions, num_prefix_tokens=1)
    loss = (layer_q * randn(*layer_q.shape, seed=9)).sum() + (layer_k**2).sum()
    loss.backward()
    return layer_q.detach(), layer_k.detach(), enc.weight.grad.clone()


@needs_kernels
@pytest.mark.parametrize(
    "block, heads, sizes",
    [(4, 1, (6, 5)), (8, 3, (6, 5)), (16, 1, (6, 5)), (32, 3, (4, 4)), (64, 1, (4, 4))]
    + [(8, 3, (7,)), (4, 2, (2, 3, 3)), (8, 1, (3, 2, 2))],  # 1 axis; 3 axes
)
def test_layer_with_kernels_matches_the_pytorch_path(monkeypatch, block, heads, sizes):
    # paper init: same degree and squaring counts, different kernels
    enc = LieRE(max(16, block), len(sizes), num_heads=heads, block_size=block)
    positions = grid_positions(*sizes)
    fast = encode(enc, positions)
    use_pytorch_path(monkeypatch)
    slow = encode(enc, positions)
    for f, s in zip(fast, slow):
        scale = float(s.abs().max())
        torch.testing.assert_close(f, s, atol=2e-5 * scale, rtol=0)


@needs_kernels
def test_kernel_path_is_taken_and_matches_float64_reference():
    enc = LieRE(64, 2, num_heads=2, block_size=8)
    positions = grid_positions(14, 14, reference=7)  # twice the training range
    bases = enc.bases().detach()
    assert K.usable(bases, size=8)
    rot = F.lie_rotations(positions, bases)
    ref = F.expm_skew_reference(F.block_generators(positions.double(), bases.double()))
    gen_norm = float(torch.linalg.matrix_norm(F.block_generators(positions, bases), ord=2).max())
    tol = 10 * 8 * torch.finfo(torch.float32).eps * max(1.0, gen_norm)
    assert (rot.double() - ref).abs().max().item() <= tol
    eye = torch.eye(8, dtype=torch.float64)
    assert (rot.double().mT @ rot.double() - eye).abs().max().item() <= tol


def test_pytorch_path_per_token_squarings_match_reference(eager):
    # tokens spread over several squaring counts, shuffled: sorting and un-sorting exercised
    bases = F.skew_symmetric(randn(2, 2, 3, 6, seed=1) * 3, 4)  # (h=2, a=2, m=3, 4, 4)
    positions = torch.rand(40, 2, generator=torch.Generator().manual_seed(2)) * 2
    positions[5] = 0.0  # a token needing no squaring
    norms = torch.linalg.matrix_norm(bases, ord=2)
    js = squaring.token_squarings(
        (positions.abs().unsqueeze(-3) @ norms).amax(dim=(-3, -1)),
        polynomial.POLY[torch.float32][1],
    )
    assert len(set(js.tolist())) >= 3
    leaf = bases.clone().requires_grad_(True)
    rot = F.lie_rotations(positions, leaf)
    ref_leaf = bases.double().requires_grad_(True)
    ref = F.expm_skew_reference(F.block_generators(positions.double(), ref_leaf))
    torch.testing.assert_close(rot.double(), ref, atol=2e-5, rtol=0)
    upstream = randn(*rot.shape, seed=3)
    (g,) = torch.autograd.grad(rot, leaf, upstream)
    (g_ref,) = torch.autograd.grad(ref, ref_leaf, upstream.double())
    torch.testing.assert_close(g.double(), g_ref, atol=1e-3 * float(g_ref.abs().max()), rtol=0)


def test_pytorch_path_squarings_gradcheck(eager):
    bases = F.skew_symmetric(randn(1, 2, 2, 3, seed=4, dtype=torch.float64) * 2, 3)
    positions = torch.tensor([[0.0, 0.1], [1.0, 0.5], [2.0, 2.0]], dtype=torch.float64)
    bases.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: F.lie_rotations(positions, b), (bases,))
    assert torch.autograd.gradgradcheck(lambda b: F.lie_rotations(positions, b), (bases,))


def test_squaring_degree_table_is_accurate():
    for table in (polynomial.POLY,):
        for dtype, (degree, theta) in table.items():
            bound = theta ** (degree + 1) / math.factorial(degree + 1)
            assert bound <= torch.finfo(dtype).eps / 2  # the unit roundoff


# -- availability -----------------------------------------------------------------------------


def run_python(code, **env):
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full,
        check=True,
        timeout=300,  # a kernel that deadlocks fails the test instead of hanging the suite
    ).stdout


def test_kernels_can_be_disabled_and_the_library_still_works(tmp_path):
    code = (
        "import torch; from liere import kernels as K, LieRE, grid_positions\n"
        "print(K.available(), K.unavailable_reason(), K.pool_switches())\n"
        "q = torch.randn(1, 1, 9, 16)\n"
        "print(LieRE(16)(q, q, grid_positions(3, 3))[0].shape)\n"
    )
    out = run_python(code, LIERE_KERNELS="0", LIERE_CACHE_DIR=str(tmp_path))
    assert "False disabled by LIERE_KERNELS=0 0" in out
    assert "torch.Size([1, 1, 9, 16])" in out


def test_missing_compiler_falls_back_with_a_reason(tmp_path):
    code = "from liere import kernels as K; print(K.available(), K.unavailable_reason())"
    out = run_python(code, CC=str(tmp_path / "no-such-cc"), LIERE_CACHE_DIR=str(tmp_path))
    assert out.startswith("False compiling the kernels failed")
    assert "no-such-cc" in out


LAYER_STEP = (
    "import torch\n"
    "from liere import LieRE, RotaryAttention, grid_positions\n"
    "torch.manual_seed(0)\n"
    "layer = RotaryAttention(96, 3, pos_enc=LieRE(32, 2, num_heads=3, block_size=8),"
    " num_prefix_tokens=1)\n"
    "x, positions = torch.randn(4, 50, 96), grid_positions(7, 7)\n"
    "def step():\n"
    "    layer.zero_grad()\n"
    "    out = layer(x, positions)\n"
    "    out.square().sum().backward()\n"
    "    return [out.detach(), *(p.grad.clone() for p in layer.parameters())]\n"
)


CONCURRENT_STEPS = (
    "import threading, copy\n"
    "layers = [copy.deepcopy(layer) for _ in range(4)]\n"
    "results = [None] * 4\n"
    "def work(i):\n"
    "    for _ in range(5):\n"
    "        layers[i].zero_grad()\n"
    "        out = layers[i](x, positions)\n"
    "        out.square().sum().backward()\n"
    "        results[i] = [out.detach(), *(p.grad for p in layers[i].parameters())]\n"
    "threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]\n"
    "for t in threads: t.start()\n"
    "for t in threads: t.join()\n"
    "print('concurrent', all(torch.equal(a, b) for r in results for a, b in zip(r, alone)))\n"
)
FORKED_STEP = (
    "import os\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    torch.set_num_threads(1)  # as in a DataLoader worker: torch's OpenMP hangs after fork\n"
    "    os.environ['LIERE_KERNEL_THREADS'] = os.environ['CHILD_KERNEL_THREADS']\n"
    "    child = step()\n"
    "    os._exit(0 if all(torch.equal(a, b) for a, b in zip(child, alone)) else 3)\n"
    "print('forked', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
)


@pytest.fixture(scope="module")
def pool_only_cache(tmp_path_factory):
    """A cache directory holding a fresh build without OpenMP (one build, ~15 s, shared)."""
    cache = tmp_path_factory.mktemp("pool-only-cache")
    code = "from liere import kernels as K; print(K.available())"
    out = run_python(code, LIERE_CACHE_DIR=str(cache), LIERE_KERNELS_OPENMP="0")
    assert out.strip() == "True"
    return cache


@needs_kernels
@pytest.mark.parametrize("openmp", ["1", "0"], ids=["openmp", "pool-only"])
def test_kernels_from_several_threads_and_forked_children_give_the_same_bits(request, openmp):
    # Note [kernel threads]: one caller owns the worker pool at a time, the others run their
    # pieces themselves (the same pieces, so the same bits); the pool's workers do not
    # survive fork(), and a forked child (a DataLoader worker) starts a fresh pool. Built
    # without OpenMP the pool runs every call, and the kernels must still match the PyTorch
    # path. GNU OpenMP itself cannot start a team in a forked child of a process that used
    # one (torch's matmuls hang there too), so the OpenMP build's child runs one thread.
    # The fork comes before the concurrent threads: a child forked after several Python
    # threads ran torch's matmuls at once can hang inside MKL's allocator (1 run in 15 under
    # load, MKL's mm_account_ptr_by_tid, liere's kernels not on the stack), as DataLoader
    # workers forked from such a process would.
    code = (
        LAYER_STEP + "from unittest import mock\n"
        "from liere import kernels as K\n"
        "torch.set_num_threads(2); assert K.available(), K.unavailable_reason()\n"
        "alone = step()\n"
        "with mock.patch.object(K, 'usable', lambda *t, size, sizes=None: False):\n"
        "    slow = step()\n"
        "print('pytorch', max(float((f - s).abs().max() / s.abs().max())"
        " for f, s in zip(alone, slow)))\n" + FORKED_STEP + CONCURRENT_STEPS
    )
    env = {"LIERE_KERNELS_OPENMP": openmp, "CHILD_KERNEL_THREADS": "1" if openmp == "1" else "2"}
    if openmp == "0":
        env["LIERE_CACHE_DIR"] = str(request.getfixturevalue("pool_only_cache"))
    lines = dict(line.split(" ", 1) for line in run_python(code, **env).splitlines())
    assert float(lines["pytorch"]) < 1e-5
    assert lines["concurrent"] == "True"
    assert lines["forked"] == "0"


@needs_kernels
def test_kernels_build_into_the_cache_dir(pool_only_cache):
    assert [p.suffix for p in pool_only_cache.iterdir()] == [".so"]


@needs_kernels
def test_attention_layer_runs_the_kernels_under_no_grad_and_train():
    layer = RotaryAttention(32, 4, pos_enc=LieRE(8, 2, num_heads=4), num_prefix_tokens=1)
    x = randn(2, 10, 32, seed=1)
    positions = grid_positions(3, 3)
    with torch.no_grad():
        a = layer(x, positions)
    b = layer(x, positions)
    b.sum().backward()
    torch.testing.assert_close(a, b.detach())
    assert layer.pos_enc.weight.grad is not None


@needs_kernels
def test_more_squarings_than_the_kernels_take_fall_back(monkeypatch):
    bases = F.skew_symmetric(randn(1, 1, 1, 6, seed=5), 4)  # (h=1, a=1, m=1, 4, 4)
    positions = torch.tensor([[0.5], [3.0]])
    expected = F.lie_rotations(positions, bases)
    calls = []
    monkeypatch.setattr(K, "MAX_SQUARINGS", 0)  # every token needs at least one
    monkeypatch.setattr(K, "squarings_forward", lambda *a: calls.append(a))
    torch.testing.assert_close(F.lie_rotations(positions, bases), expected, atol=1e-6, rtol=0)
    assert not calls


def _kernels_cli(env_updates, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LIERE_KERNELS": "1", **env_updates}
    return subprocess.run(
        [sys.executable, "-m", "liere.kernels"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX permissions")
def test_kernels_refuse_a_cache_other_users_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    proc = _kernels_cli({"LIERE_CACHE_DIR": str(shared)}, tmp_path)
    assert proc.returncode == 1
    assert "writable by other users" in proc.stdout and "LIERE_CACHE_DIR" in proc.stdout
    assert list(shared.iterdir()) == []  # nothing built, nothing loaded


def test_first_build_is_announced_and_failures_say_why(tmp_path):
    cache = tmp_path / "cache"
    proc = _kernels_cli({"LIERE_CACHE_DIR": str(cache), "CC": "false"}, tmp_path)
    assert proc.returncode == 1
    assert "compiling its CPU kernels" in proc.stderr and "python -m liere.kernels" in proc.stderr
    assert "kernels off (compiling the kernels failed" in proc.stdout
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert "Warning" not in proc.stderr  # e.g. runpy's "found in sys.modules" RuntimeWarning


# Note [kernel argument checks]: bad input raises before any pointer crosses


def _series(n=5, h=2, m=2, s=8):
    return torch.randn(n, h * m, s, s), torch.ones(n, dtype=torch.int32)


@needs_kernels
def test_squaring_arguments_are_checked():
    series, js = _series()
    K.squarings_forward(series, js, 2, 2, "batch")  # fine
    with pytest.raises(ValueError, match=r"squarings must lie in \[0, "):
        K.squarings_forward(series, js * (K.MAX_SQUARINGS + 1), 2, 2, "batch")
    with pytest.raises(ValueError, match="squarings must be a CPU torch.int32"):
        K.squarings_forward(series, js.long(), 2, 2, "batch")
    with pytest.raises(ValueError, match="series must be contiguous"):
        K.squarings_forward(series.transpose(-1, -2), js, 2, 2, "batch")
    with pytest.raises(ValueError, match="need 1920"):
        K.squarings_forward(series, js, 2, 3, "batch")
    with pytest.raises(ValueError, match="layout must be one of"):
        K.squarings_forward(series, js, 2, 2, "columns")
    out = torch.zeros(2, 7, 2, 8, 8)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 6\]"):
        K.squarings_forward(series, js, 2, 2, "batch", out, torch.arange(5) + 3)
    with pytest.raises(ValueError, match="must be torch.float32"):
        K.squarings_forward(series, js, 2, 2, "batch", out.double(), torch.arange(5))
    grad = torch.randn(2, 5, 2, 8, 8)
    with pytest.raises(ValueError, match="grad must have shape"):
        K.squarings_backward(series, js, grad[:, :, :1], 2, 2, "batch")


@needs_kernels
def test_application_and_ray_arguments_are_checked():
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16)
    rot = torch.randn(2, 9, 2, 8, 8)
    K.apply_forward(q, k, rot, 1)  # fine
    with pytest.raises(ValueError, match="k must have shape"):
        K.apply_forward(q, k[:, :2], rot, 1)
    with pytest.raises(ValueError, match="minus 1 prefix tokens must equal the 9"):
        K.apply_forward(q[:, :, :9], k[:, :, :9], rot, 1)
    with pytest.raises(ValueError, match="multiple of the rotations' 3 heads"):
        K.apply_forward(q, k, torch.randn(3, 9, 2, 8, 8), 1)
    with pytest.raises(ValueError, match="must cover head_dim 16"):
        K.apply_forward(q, k, torch.randn(2, 9, 4, 8, 8), 1)
    rotations = torch.randn(2, 6, 2, 8, 8)
    index = torch.tensor([3, 4])
    K.ray_products_forward(rotations, index, torch.tensor([1, 2]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"left must lie in \[0, 5\]"):
        K.ray_products_forward(rotations, index, torch.tensor([1, 6]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="right must be contiguous of shape"):
        K.ray_products_forward(rotations, index, torch.tensor([1, 2]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"base must lie in \[0, 5\]"):
        K.ray_products_backward(
            rotations, torch.randn_like(rotations), torch.tensor([0, 9]), index,
            torch.tensor([1, 2]), torch.tensor([2, 2]),
        )  # fmt: skip


@needs_kernels
def test_a_failed_scratch_allocation_raises(monkeypatch):
    # the C code reports allocation failure as its return status (it used to abort())
    monkeypatch.setattr(K, "_fn", lambda *args: lambda *a: 1)
    series, js = _series()
    with pytest.raises(MemoryError, match="could not allocate its scratch memory"):
        K.squarings_forward(series, js, 2, 2, "batch")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axes", [1, 2])
@pytest.mark.parametrize("size", K.POLY_SIZES)
def test_polynomial_coefficient_kernel_matches_the_pytorch_recursion(size, axes, dtype):
    torch.manual_seed(size + axes)
    bases = LieRE(2 * size, axes, num_heads=3, block_size=size, dtype=dtype).bases().detach()
    stacked = polynomial.stack_axes(bases)
    degree = polynomial.POLY[dtype][0]
    expected = polynomial.poly_coefficients_plain(stacked, degree)
    out, none = K.poly_coefficients_forward(stacked, degree)
    assert none is None
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, expected, atol=64 * eps * expected.abs().max(), rtol=0)
    # the entry-major copy holds the same values, laid out as the series GEMM reads them
    same, flat = K.poly_coefficients_forward(stacked, degree, entry_major=True)
    hm, s, ts = out.shape
    assert torch.equal(same, out)
    assert torch.equal(flat, out.view(hm, s, ts // s, s).permute(1, 3, 0, 2))
    grad = randn(*out.shape, seed=3, dtype=dtype)
    leaf = stacked.clone().requires_grad_()
    (d_expected,) = torch.autograd.grad(
        polynomial.poly_coefficients_plain(leaf, degree), leaf, grad
    )
    d_out = K.poly_coefficients_backward(grad, stacked, out, degree)
    torch.testing.assert_close(d_out, d_expected, atol=64 * eps * d_expected.abs().max(), rtol=0)
    # the gradient read in the entry-major layout: the same sums, the same bits
    grad_entry = grad.view(hm, s, ts // s, s).permute(1, 3, 0, 2).contiguous()
    d_entry = K.poly_coefficients_backward(grad_entry, stacked, out, degree, entry_major=True)
    assert torch.equal(d_entry, d_out)


@needs_kernels
def test_polynomial_coefficient_arguments_are_checked():
    stacked = polynomial.stack_axes(LieRE(16, 2, num_heads=2, block_size=8).bases().detach())
    out, _ = K.poly_coefficients_forward(stacked, 5)  # fine
    with pytest.raises(ValueError, match="degree must be an integer in"):
        K.poly_coefficients_forward(stacked, K.MAX_POLY_DEGREE + 1)
    with pytest.raises(ValueError, match=r"with a in \(1, 2\)"):
        K.poly_coefficients_forward(torch.zeros(4, 24, 8), 5)
    with pytest.raises(ValueError, match="stacked must be contiguous"):
        K.poly_coefficients_forward(stacked.transpose(-1, -2), 5)
    with pytest.raises(ValueError, match="out must have shape"):
        K.poly_coefficients_backward(out, stacked, out[:, :, :8], 5)
    with pytest.raises(ValueError, match="grad must be torch.float32"):
        K.poly_coefficients_backward(out.double(), stacked, out, 5)
    with pytest.raises(ValueError, match=r"grad must have shape \(8, 8, 4, 21\)"):
        K.poly_coefficients_backward(out, stacked, out, 5, entry_major=True)
