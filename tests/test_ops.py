"""liere's registered operators (torch.library) and full precision under the user's matmul
settings: opcheck, compiled and exported graphs, and no reduced-precision matmul."""

import pytest
import torch
from conftest import randn
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from liere import AxialRoPE, CayleySTRING, ComRoPE, LieRE, MixedRoPE, grid_positions
from liere.models import VisionTransformer
from liere.precision import exact_dtype, float32_matmul_is_reduced

OPS = torch.ops.liere


def _encodings():
    torch.manual_seed(0)
    return {
        "liere-8": LieRE(16, 2, num_heads=2, block_size=8),
        "liere-dense": LieRE(16, 2, num_heads=2, block_size=16),
        "comrope-ap": ComRoPE(16, 2, num_heads=2, block_size=8),
        "comrope-ld": ComRoPE(16, 2, num_heads=2, block_size=8, variant="ld"),
        "string-cayley": CayleySTRING(16, 2, num_heads=2),
        "rope-axial": AxialRoPE(16, 2),
        "rope-mixed": MixedRoPE(16, 2, num_heads=2),
    }


def _bases(block=8, heads=2, axes=2, seed=0):
    torch.manual_seed(seed)
    return LieRE(16, axes, num_heads=heads, block_size=block).bases().detach()


# -- opcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_opcheck_lie_rotations(block, per_sample):
    positions = grid_positions(3, 4) * 2
    if per_sample:
        positions = torch.stack([positions, positions.flip(0) * 0.5])
    bases = _bases(block)
    args = (positions.requires_grad_(), bases.clone().requires_grad_(), 1024.0, True)
    opcheck(OPS.lie_rotations.default, args)
    rot = OPS.lie_rotations(positions.detach(), bases, None, True)
    grad = torch.randn_like(rot)
    args = (grad, positions.detach(), bases, rot, None, True)
    opcheck(OPS.lie_rotations_backward.default, (*args, True, []))  # positions' gradient too
    opcheck(OPS.lie_rotations_backward.default, (*args, False, []))  # bases only: direct


@pytest.mark.parametrize("shared_heads", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_opcheck_blockwise_application(shared_heads, prefix):
    positions = grid_positions(3, 3)
    bases = _bases(8, heads=1 if shared_heads else 2)
    rot = OPS.lie_rotations(positions, bases, None, True)
    q, k = randn(2, 2, prefix + 9, 16, seed=1), randn(2, 2, prefix + 9, 16, seed=2)
    args = (q.requires_grad_(), k.requires_grad_(), rot.clone().requires_grad_(), prefix)
    opcheck(OPS.apply_blockwise_pair.default, args)
    x = randn(2, 2, 9, 16, seed=3)
    opcheck(OPS.apply_blockwise.default, (x.clone().requires_grad_(), rot.clone().requires_grad_()))
    g = torch.randn_like(x)
    opcheck(OPS.apply_blockwise_backward.default, (g, x, rot))
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    opcheck(
        OPS.apply_blockwise_pair_backward.default, (gq, gk, q.detach(), k.detach(), rot, prefix)
    )


def test_ops_match_the_functional_definition_values_and_grads():
    positions = grid_positions(4, 4).requires_grad_()
    bases = _bases(8).requires_grad_()
    q = randn(2, 2, 17, 16, seed=1).requires_grad_()
    k = randn(2, 2, 17, 16, seed=2).requires_grad_()
    ref_rot = torch.linalg.matrix_exp(
        torch.einsum("na,hamij->hnmij", positions.double(), bases.double()).contiguous()
    )
    rot = OPS.lie_rotations(positions, bases, None, True)
    torch.testing.assert_close(rot.double(), ref_rot, atol=1e-5, rtol=0)
    q_out, k_out = OPS.apply_blockwise_pair(q, k, rot, 1)
    ref_q = torch.einsum("hnmij,bhnmj->bhnmi", ref_rot, q[:, :, 1:].double().unflatten(-1, (2, 8)))
    torch.testing.assert_close(q_out[:, :, 1:].double(), ref_q.flatten(-2), atol=2e-5, rtol=0)
    assert torch.equal(q_out[:, :, :1], q[:, :, :1])
    (q_out.square().sum() + k_out.sum()).backward()
    grads = [t.grad.clone() for t in (positions, bases, q, k)]
    for t in (positions, bases, q, k):
        t.grad = None
    from liere import functional as F

    q_ref, k_ref = F.apply_blockwise_pair(
        q, k, F.lie_rotations(positions, bases), num_prefix_tokens=1
    )
    (q_ref.square().sum() + k_ref.sum()).backward()
    for got, t in zip(grads, (positions, bases, q, k)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)


def test_op_inputs_are_checked_when_traced():
    positions = grid_positions(3, 3)
    with pytest.raises(RuntimeError, match="must match the bases. axes and dtype"):
        call = torch.compile(
            lambda p, b: OPS.lie_rotations(p, b, None, True), backend="eager", fullgraph=True
        )
        call(positions, _bases(axes=3))


# -- compiled and exported graphs ----------------------------------------------------------


class _Recorder:
    """A torch.compile backend that records the graph's call targets and runs it as is."""

    def __init__(self):
        self.targets = []

    def __call__(self, gm, example_inputs):
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward


@pytest.mark.parametrize("name", ["liere-8", "liere-dense", "comrope-ap", "comrope-ld"])
def test_compiled_graph_holds_liere_ops_and_matches_eager(name):
    enc = _encodings()[name]
    positions = grid_positions(5, 5)
    q = randn(2, 2, 26, 16, seed=1).requires_grad_()
    k = randn(2, 2, 26, 16, seed=2).requires_grad_()

    def step(q, k):
        return enc(q, k, positions, num_prefix_tokens=1)

    recorder = _Recorder()
    compiled = torch.compile(step, backend=recorder, fullgraph=True)
    outs = [compiled(q, k), step(q, k)]
    # a training graph: the forward op that keeps the series for the backward op
    assert "liere.lie_rotations_keeping_series" in recorder.targets
    assert "liere.apply_blockwise_pair" in recorder.targets
    assert not [t for t in recorder.targets if "matrix_exp" in t]
    grads = [
        torch.autograd.grad(sum(o.square().sum() for o in out), (q, k, *enc.parameters()))
        for out in outs
    ]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inductor_training_step_matches_eager():
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 3, in_channels=1, dim=32, depth=1, num_heads=2)
    x = randn(2, 1, 16, 16, seed=4)
    compiled = torch.compile(model, fullgraph=True)
    out_c = compiled(x)
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_e = model(x)
    out_e.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for a, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)


def _exported_targets(model, x):
    program = torch.export.export(model, (x,))
    targets = [  # every graph, those nested in higher-order ops (autocast regions) too
        str(n.target)
        for gm in program.graph_module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
        if n.op == "call_function"
    ]
    return program, targets


def test_export_holds_liere_ops_and_frozen_rotations_none():
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 3, in_channels=1, dim=32, depth=1, num_heads=2).eval()
    x = randn(2, 1, 16, 16, seed=5)
    program, targets = _exported_targets(model, x)
    assert "liere.lie_rotations.default" in targets  # not the op that keeps the series
    assert not any("matrix_exp" in t or "keeping_series" in t for t in targets)
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-6, rtol=1e-6)
    model.freeze_rotations()
    program, targets = _exported_targets(model, x)
    assert not any("liere" in t or "matrix_exp" in t for t in targets)
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-6, rtol=1e-6)


# -- precision -----------------------------------------------------------------------------

_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "dot", "linalg_matrix_exp"}


class _Float32Matmuls(TorchDispatchMode):
    """Records every float32 matrix product dispatched (the ops a TF32/bf16 setting rounds)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _MATMULS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            if torch.float32 in dtypes:
                self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def medium_precision():
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")


def _run(enc, frozen=False):
    positions = grid_positions(4, 4) * 2
    q = randn(2, 2, 17, 16, seed=1).requires_grad_()
    k = randn(2, 2, 17, 16, seed=2).requires_grad_()
    if frozen:
        enc.eval().freeze(positions)
    q_out, k_out = enc(q, k, positions, num_prefix_tokens=1)
    x_out = enc.rotate(q.detach(), positions, num_prefix_tokens=1)
    (q_out.square().sum() + k_out.sum()).backward()
    return q_out.detach(), k_out.detach(), x_out


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", list(_encodings()))
def test_no_float32_matmul_under_reduced_precision(name, frozen, medium_precision):
    enc = _encodings()[name]
    assert float32_matmul_is_reduced(torch.device("cpu"))
    with _Float32Matmuls() as mode:
        _run(enc, frozen)
    assert mode.seen == []


def test_the_matmul_probe_sees_float32_matmuls_at_highest():
    # the check above can fail: at "highest" LieRE's products run in float32
    enc = _encodings()["liere-8"]
    assert not float32_matmul_is_reduced(torch.device("cpu"))
    with _Float32Matmuls() as mode:
        _run(enc)
    assert mode.seen


def _float32_matmul_is_rounded_here():
    a, b = randn(256, 256, seed=0), randn(256, 256, seed=1)
    exact = a @ b
    torch.set_float32_matmul_precision("medium")
    try:
        return not torch.equal(a @ b, exact)
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(
    not _float32_matmul_is_rounded_here(),
    reason="a plain float32 matmul is unaffected by 'medium' on this CPU (no bf16 matmul unit)",
)
@pytest.mark.parametrize("name", list(_encodings()))
def test_outputs_under_medium_match_highest(name):
    enc = _encodings()[name]
    expected = _run(enc)
    torch.set_float32_matmul_precision("medium")
    try:
        got = _run(enc)
    finally:
        torch.set_float32_matmul_precision("highest")
    for a, b in zip(got, expected):
        err = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max()
        assert err < 1e-5, err


def test_exact_dtype():
    cpu = torch.device("cpu")
    assert exact_dtype(torch.float32, cpu) == torch.float32
    assert exact_dtype(torch.float32, cpu, tracing=True) == torch.float64
    assert exact_dtype(torch.float64, cpu, tracing=True) == torch.float64
    assert exact_dtype(torch.bfloat16, cpu, tracing=True) == torch.bfloat16
    torch.set_float32_matmul_precision("medium")
    try:
        assert exact_dtype(torch.float32, cpu) == torch.float64
    finally:
        torch.set_float32_matmul_precision("highest")


def test_documented_schemas_are_the_registered_ones():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "api" / "ops.md").read_text()
    rows = [line.split("|") for line in doc.splitlines() if line.startswith("| `liere::")]
    assert len(rows) == 7
    for row in rows:
        name, schema = row[1].strip().strip("`"), row[2].strip().strip("`")
        op = getattr(torch.ops.liere, name.removeprefix("liere::")).default
        assert str(op._schema) == name + schema


@pytest.mark.parametrize("per_sample", [False, True])
def test_complex_rope_matches_the_definition_values_and_grads(per_sample):
    from liere import functional as F
    from liere import ops

    qkv = randn(2, 10, 3, 4, 16, seed=7).permute(2, 0, 3, 1, 4)  # q, k views of one tensor
    x = qkv[0][:, :, 1:].clone().requires_grad_()
    view = qkv[1][:, :, 1:]  # strided, as in attention
    angles = randn(2, 4, 9, 8, seed=8) if per_sample else randn(4, 9, 8, seed=8)
    cos, sin = angles.cos(), angles.sin()
    for inp in (x, view):
        torch.testing.assert_close(ops.rope(inp, cos, sin), F.apply_rope(inp, cos, sin))
    g = randn(2, 4, 9, 16, seed=9)
    (grad_fast,) = torch.autograd.grad(ops.rope(x, cos, sin), x, g)
    (grad_ref,) = torch.autograd.grad(F.apply_rope(x, cos, sin), x, g)
    torch.testing.assert_close(grad_fast, grad_ref)
    # gradcheck and gradgradcheck on a small slice (they cost per input element)
    x64 = x.detach()[:1, :2, :3, :8].double().requires_grad_()
    small = angles[..., :2, :3, :4] if not per_sample else angles[:1, :2, :3, :4]
    c64, s64 = small.cos().double().requires_grad_(), small.sin().double().requires_grad_()
    torch.autograd.gradcheck(ops.rope, (x64, c64, s64))
    torch.autograd.gradgradcheck(ops.rope, (x64, c64, s64))


def test_backward_op_works_from_inside_a_recompute_and_reraises_errors():
    # Note [registered operators]: the backward op's recompute (here: position gradients)
    # runs on liere's autograd worker, a thread named liere-autograd*; called on such a thread
    # (a recompute inside a recompute) it runs the recompute on a helper thread instead of
    # queueing behind itself. Called from a thread of that name, it takes that branch: the
    # same gradients
    import threading

    positions, bases = grid_positions(3, 3), _bases(8)
    rot = OPS.lie_rotations(positions, bases, None, True)
    grad = torch.randn_like(rot)
    args = (grad, positions, bases, rot, None, True, True, [])
    expected = OPS.lie_rotations_backward(*args)
    nested: list = []
    thread = threading.Thread(
        target=lambda: nested.append(OPS.lie_rotations_backward(*args)), name="liere-autograd-0"
    )
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and len(nested) == 1
    for a, b in zip(nested[0], expected):
        torch.testing.assert_close(a, b)
    bad = bases.clone()
    bad[0, 0, 0, 0, 1] = float("nan")  # the recompute raises on the worker: re-raised here
    with pytest.raises(ValueError, match="generators contain NaN or Inf"):
        OPS.lie_rotations_backward(grad, positions, bad, rot, None, True, True, [])


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_rope_pair_matches_the_definition_with_prefix_tokens(prefix, both_paths):
    from liere import functional as F
    from liere import ops

    qkv = randn(2, prefix + 9, 3, 4, 16, seed=7).permute(2, 0, 3, 1, 4)
    q, k = qkv[0].clone().requires_grad_(), qkv[1].clone().requires_grad_()
    angles = randn(4, 9, 8, seed=8)
    cos, sin = angles.cos(), angles.sin()
    fast = ops.rope_pair(q, k, cos, sin, prefix)
    ref = [
        torch.cat((t[:, :, :prefix], F.apply_rope(t[:, :, prefix:], cos, sin)), dim=2)
        for t in (q, k)
    ]
    # the complex multiplication makes the definition's products and sums (same bits); the
    # kernel may fuse them (one rounding fewer)
    exact = {"atol": 0, "rtol": 0} if both_paths == "pytorch" else {}
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, **exact)
    assert torch.equal(fast[0][:, :, :prefix], q[:, :, :prefix])
    g = [randn(*q.shape, seed=10), randn(*q.shape, seed=11)]
    grads_fast = torch.autograd.grad(fast, (q, k), g)
    grads_ref = torch.autograd.grad(ref, (q, k), g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b)


# -- the backward operators' direct paths --------------------------------------------------

_BACKWARD_CASES = {
    # name: (block, axes, positions, dtype); the test names those that run the hand-written
    # backwards directly (bases_vjp); the rest differentiate a recompute
    "8x8 grid": (8, 2, lambda: grid_positions(14, 14), torch.float32),
    "dense": (16, 2, lambda: grid_positions(9, 9) * 2, torch.float32),
    "float64": (8, 2, lambda: grid_positions(9, 9).double() * 3, torch.float64),
    "one axis": (4, 1, lambda: torch.arange(30.0).unsqueeze(-1) / 4, torch.float32),
    "three axes": (8, 3, lambda: grid_positions(3, 4, 4), torch.float32),
    "off the lattice": (8, 2, lambda: randn(40, 2, seed=9), torch.float32),
    "three axes, off the lattice": (4, 3, lambda: randn(40, 3, seed=9), torch.float32),
    "three axes, dense": (16, 3, lambda: grid_positions(3, 4, 4), torch.float32),
    "per sample": (8, 2, lambda: torch.stack([grid_positions(4, 4)] * 2) * 2, torch.float32),
    "few tokens": (8, 2, lambda: grid_positions(2, 2), torch.float32),
    "re-orthogonalised": (8, 2, lambda: grid_positions(6, 6) * 400, torch.float32),
}


def _backward_case(name, kernels_on, monkeypatch):
    """Positions and bases of ``_BACKWARD_CASES[name]``, the kernels off unless ``kernels_on``."""
    from conftest import kernels_unusable

    from liere import kernels

    if not kernels_on:
        monkeypatch.setattr(kernels, "usable", kernels_unusable)
    block, axes, make, dtype = _BACKWARD_CASES[name]
    return make(), _bases(block, axes=axes).to(dtype)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "no-kernels"])
@pytest.mark.parametrize("name", list(_BACKWARD_CASES))
def test_rotations_backward_op_equals_autograd(name, kernels_on, monkeypatch):
    import warnings

    from liere import functional as F
    from liere import kernels
    from liere.speed.rotations import bases_vjp

    positions, bases = _backward_case(name, kernels_on, monkeypatch)
    dtype = bases.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the large-norm case warns
        leaf = bases.clone().requires_grad_()
        rot = F.lie_rotations(positions, leaf)
        grad = randn(*rot.shape, seed=4, dtype=dtype)
        (expected,) = torch.autograd.grad(rot, leaf, grad)
        rot = rot.detach()
        grad_p, grad_b = OPS.lie_rotations_backward(
            grad, positions, bases, rot, 1024.0, True, False, []
        )
        direct = bases_vjp(grad, positions, bases, rot, 1024.0)
    assert torch.equal(grad_p, torch.zeros_like(positions))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(grad_b, expected, atol=tol * max(1.0, expected.abs().max()), rtol=0)
    direct_cases = {
        "8x8 grid", "dense", "float64", "one axis", "three axes", "off the lattice",
        "three axes, off the lattice",
    }  # fmt: skip
    takes_direct = kernels_on and kernels.available() and name in direct_cases
    assert (direct is not None) == takes_direct
    if direct is not None:
        torch.testing.assert_close(direct, expected, atol=0, rtol=0)


# the cases liere::lie_rotations_keeping_series takes: shared positions, one or two axes,
# more than 8 tokens
_KEEPING_CASES = [
    n
    for n, case in _BACKWARD_CASES.items()
    if case[1] <= 2 and n not in ("per sample", "few tokens")
]


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "no-kernels"])
@pytest.mark.parametrize("name", _KEEPING_CASES)
def test_forward_op_keeping_the_series_matches_the_plain_ops(name, kernels_on, monkeypatch):
    # Note [series kept for the backward operator]: the same rotations, bit for bit, and a
    # backward from what it kept equal to the backward that recomputes, bit for bit
    import warnings

    from liere import kernels

    positions, bases = _backward_case(name, kernels_on, monkeypatch)
    dtype = bases.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the large-norm case warns
        rot = OPS.lie_rotations(positions, bases, 1024.0, True)
        rot_kept, *kept = OPS.lie_rotations_keeping_series(positions, bases, 1024.0, True)
        grad = randn(*rot.shape, seed=4, dtype=dtype)
        args = (grad, positions, bases, rot, 1024.0, True, False)
        expected = OPS.lie_rotations_backward(*args, [])
        got = OPS.lie_rotations_backward(*args, kept)
        # through autograd, which gives the kept outputs no gradient (none materialised)
        leaf = bases.detach().clone().requires_grad_(True)
        through = OPS.lie_rotations_keeping_series(positions, leaf, 1024.0, True)
        (autograd_b,) = torch.autograd.grad(through[0], leaf, grad)
    assert torch.equal(rot_kept, rot)
    assert torch.equal(autograd_b, got[1])
    # NaN norms say that nothing was kept: kernels off, or blocks re-orthogonalised
    kept_anything = kernels_on and kernels.available() and name != "re-orthogonalised"
    assert bool(kept[0].isnan().any()) != kept_anything
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_opcheck_lie_rotations_keeping_series():
    for positions, block in ((grid_positions(4, 5) * 2, 8), (randn(12, 2, seed=3), 16)):
        bases = _bases(block).clone().requires_grad_()
        opcheck(OPS.lie_rotations_keeping_series.default, (positions, bases, 1024.0, True))
        rot, *kept = OPS.lie_rotations_keeping_series(positions, bases.detach(), None, True)
        args = (torch.randn_like(rot), positions, bases.detach(), rot, None, True, False, kept)
        opcheck(OPS.lie_rotations_backward.default, args)


def test_forward_op_keeping_the_series_says_what_it_serves():
    bases = _bases(8, axes=3)
    with pytest.raises(ValueError, match="serves shared CPU positions .n, a. with one or two"):
        OPS.lie_rotations_keeping_series(grid_positions(3, 3, 3), bases, None, True)
    with pytest.raises(ValueError, match="more than 8 tokens"):
        OPS.lie_rotations_keeping_series(grid_positions(2, 2), _bases(8), None, True)


@pytest.mark.parametrize("grad_mode", ["training", "no_grad"])
def test_traced_graphs_keep_the_series_only_for_the_bases_gradient(grad_mode):
    enc = _encodings()["liere-8"]
    positions = grid_positions(5, 5)
    q, k = randn(2, 2, 25, 16, seed=1), randn(2, 2, 25, 16, seed=2)
    recorder = _Recorder()
    compiled = torch.compile(lambda q, k: enc(q, k, positions), backend=recorder, fullgraph=True)
    with torch.set_grad_enabled(grad_mode == "training"):
        compiled(q, k)
    kept = "liere.lie_rotations_keeping_series" in recorder.targets
    assert kept == (grad_mode == "training")
    assert kept != ("liere.lie_rotations" in recorder.targets)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "no-kernels"])
@pytest.mark.parametrize("shared_heads", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
def test_pair_backward_op_equals_autograd(prefix, shared_heads, kernels_on, monkeypatch):
    from conftest import kernels_unusable

    from liere import kernels

    if not kernels_on:
        monkeypatch.setattr(kernels, "usable", kernels_unusable)
    rot = OPS.lie_rotations(
        grid_positions(4, 4), _bases(8, heads=1 if shared_heads else 2), None, True
    )
    _assert_pair_backward_op_is_autograd(rot, batch=3, tokens=16, prefix=prefix)


def _assert_pair_backward_op_is_autograd(rot, batch, tokens, prefix):
    from liere import functional as F

    q, k = (randn(batch, 2, prefix + tokens, 16, seed=s) for s in (3, 4))
    gq, gk = (randn(batch, 2, prefix + tokens, 16, seed=s) for s in (5, 6))
    leaves = [t.clone().requires_grad_() for t in (q, k, rot)]
    outs = F.apply_blockwise_pair(*leaves, num_prefix_tokens=prefix)
    expected = torch.autograd.grad(outs, leaves, (gq, gk))
    got = OPS.apply_blockwise_pair_backward(gq, gk, q, k, rot, prefix)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "layout", ["shared", "shared heads", "per sample", "per sample, shared heads", "few tokens"]
)
def test_application_backward_ops_equal_autograd_on_every_layout(layout):
    from liere import functional as F

    tokens = 4 if layout == "few tokens" else 12
    positions = grid_positions(3, 4) if tokens == 12 else grid_positions(2, 2)
    heads = 1 if "shared heads" in layout else 2
    rot = OPS.lie_rotations(positions, _bases(8, heads=heads), None, True)
    if layout.startswith("per sample"):
        rot = torch.stack([rot, rot.flip(1)])  # (b, h', n, m, s, s)
    x = randn(2, 2, tokens, 16, seed=1)
    g = randn(2, 2, tokens, 16, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, rot)]
    expected = torch.autograd.grad(F.apply_blockwise(*leaves), leaves, g)
    got = OPS.apply_blockwise_backward(g, x, rot)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    prefix = 0 if layout == "few tokens" else 1
    _assert_pair_backward_op_is_autograd(rot, batch=2, tokens=tokens, prefix=prefix)


def test_operators_ignore_the_callers_autocast():
    # a compiled graph calls the operators in the caller's autocast state: they turn it off
    positions, bases = grid_positions(4, 4) * 2, _bases(8)
    rot = OPS.lie_rotations(positions, bases, 1024.0, True)
    grad = randn(*rot.shape, seed=3)
    q, k = randn(2, 2, 17, 16, seed=1), randn(2, 2, 17, 16, seed=2)
    calls = {
        "rotations": lambda: OPS.lie_rotations(positions, bases, 1024.0, True),
        "rotations' backward, direct": lambda: OPS.lie_rotations_backward(
            grad, positions, bases, rot, 1024.0, True, False, []
        ),
        "rotations' backward, recomputed": lambda: OPS.lie_rotations_backward(
            grad, positions, bases, rot, 1024.0, True, True, []
        ),
        "pair": lambda: OPS.apply_blockwise_pair(q, k, rot, 1),
        "pair's backward": lambda: OPS.apply_blockwise_pair_backward(q, k, q, k, rot, 1),
        "application": lambda: OPS.apply_blockwise(q[:, :, 1:], rot),
        "application's backward": lambda: OPS.apply_blockwise_backward(
            q[:, :, 1:], k[:, :, 1:], rot
        ),
    }
    for name, call in calls.items():
        plain = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = call()
        for a, b in zip(
            torch.utils._pytree.tree_leaves(plain), torch.utils._pytree.tree_leaves(under)
        ):
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
