"""Hard inputs: fuzzing against a float64 reference, non-finite positions, extrapolation,
chunked rotation for big grids, bf16 training, mismatched checkpoints."""

import warnings
from unittest import mock

import pytest
import torch
from conftest import kernels_unusable, randn
from hypothesis import given
from hypothesis import strategies as st

from liere import AxialRoPE, LieRE, MixedRoPE, grid_positions, kernels
from liere.experiments import TrainConfig, train
from liere.functional import expm_skew_reference
from liere.models import VisionTransformer
from liere.tasks import TaskData, mnist_digits
from liere.testing import assert_orthogonal, orthogonality_tolerance
from liere.testing import strategies as lst


def expm_skew_eigh(gen):
    """exp(A) for skew-symmetric float64 A from the eigendecomposition of the Hermitian iA.

    torch.linalg.matrix_exp is not a trustworthy float64 reference: for some small generators
    it is off by ~1e-10 (2x2 block with angle 0.045: 1.6e-10), far above float64 rounding.
    """
    w, v = torch.linalg.eigh(1j * gen.to(torch.complex128))  # iA = V diag(w) V^H
    return ((v * torch.exp(-1j * w).unsqueeze(-2)) @ v.mH).real


def test_eigh_reference_is_accurate():
    t = torch.tensor(0.29468387365341187 * 0.15371140837669373, dtype=torch.float64)
    gen = torch.stack((torch.stack((0 * t, t)), torch.stack((-t, 0 * t))))
    exact = torch.stack((torch.stack((t.cos(), t.sin())), torch.stack((-t.sin(), t.cos()))))
    assert (expm_skew_eigh(gen) - exact).abs().max() < 1e-15
    a = torch.randn(5, 8, 8, dtype=torch.float64)
    gen = (a - a.mT) * 3
    torch.testing.assert_close(expm_skew_eigh(gen), expm_skew_reference(gen), atol=1e-9, rtol=0)


def reference_rotate(enc, x, positions):
    """exp(sum_a p_a A_a) x in float64, from the encoding's dense generators."""
    gens = enc.generators().detach().double()  # h a d d
    pos = positions.double()
    if pos.dim() == 2:
        rot = expm_skew_eigh(torch.einsum("na,hade->hnde", pos, gens))  # h n d d
        return torch.einsum("hnde,bhne->bhnd", rot, x.double())
    rot = expm_skew_eigh(torch.einsum("bna,hade->bhnde", pos, gens))
    return torch.einsum("bhnde,bhne->bhnd", rot, x.double())


@st.composite
def encodings(draw):
    kind = draw(st.sampled_from(["liere", "axial", "mixed"]))
    num_axes = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 1000)))
    if kind == "liere":
        head_dim, block = draw(lst.head_dims_and_block_sizes(max_head_dim=16))
        enc_heads = draw(st.sampled_from([1, heads]))
        return LieRE(head_dim, num_axes, num_heads=enc_heads, block_size=block), heads
    head_dim = 2 * draw(st.integers(num_axes, 8))
    if kind == "axial":
        return AxialRoPE(head_dim, num_axes), heads
    return MixedRoPE(head_dim, num_axes, num_heads=draw(st.sampled_from([1, heads]))), heads


@given(
    encodings(),
    lst.dtypes(),
    st.integers(1, 3),
    st.integers(1, 10),
    st.booleans(),
    st.booleans(),
    st.floats(0.1, 4.0),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_fuzz_against_float64_reference(
    enc_heads, dtype, batch, tokens, per_sample, contiguous, scale, seed, kernels_on
):
    # with the compiled kernels (when built) or on the PyTorch path
    usable = kernels.usable if kernels_on else kernels_unusable
    with mock.patch.object(kernels, "usable", usable):
        fuzz_case(enc_heads, dtype, batch, tokens, per_sample, contiguous, scale, seed)


def fuzz_case(enc_heads, dtype, batch, tokens, per_sample, contiguous, scale, seed):
    enc, heads = enc_heads
    d, a = enc.head_dim, enc.num_axes
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, d, generator=gen).transpose(1, 2)  # non-contiguous
    k = torch.randn(batch, tokens, heads, d, generator=gen).transpose(1, 2)
    if contiguous:
        q, k = q.contiguous(), k.contiguous()
    shape = (batch, tokens, a) if per_sample else (tokens, a)
    positions = torch.rand(shape, generator=gen) * scale
    q_out, k_out = enc(q.to(dtype), k.to(dtype), positions)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    # inputs are rounded to dtype first, so compare with the reference of the rounded inputs
    q_ref = reference_rotate(enc, q.to(dtype), positions)
    k_ref = reference_rotate(enc, k.to(dtype), positions)
    bound = orthogonality_tolerance(enc, positions, dtype)
    out_eps = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0
    tol = (bound + 4 * out_eps) * max(1.0, q.abs().max().item(), k.abs().max().item())
    assert (q_out.double() - q_ref).abs().max().item() <= tol
    assert (k_out.double() - k_ref).abs().max().item() <= tol


@given(encodings(), st.integers(0, 5))
def test_fuzz_bad_shapes_raise_clear_errors(enc_heads, case):
    enc, heads = enc_heads
    d, a = enc.head_dim, enc.num_axes
    q = torch.randn(2, heads, 4, d)
    positions = torch.rand(4, a)
    bad = [
        lambda: enc(q[..., :-1], q[..., :-1], positions),  # wrong head_dim
        lambda: enc(q, q, torch.rand(4, a + 1)),  # wrong axes
        lambda: enc(q, q, torch.rand(5, a)),  # wrong token count
        lambda: enc(q, q, torch.rand(3, 4, a)),  # wrong batch for per-sample positions
        lambda: enc(q[0], q[0], positions),  # 3-D q
        lambda: enc(q, q[:, :, :3], positions),  # q/k token mismatch
    ][case]
    with pytest.raises(ValueError, match="must have shape|must agree"):
        bad()


# -- non-finite positions -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "factory", [lambda: LieRE(8, 2), lambda: AxialRoPE(8), lambda: MixedRoPE(8)]
)
def test_non_finite_positions_raise(bad, factory):
    enc = factory()
    q = randn(1, 1, 4, 8)
    positions = grid_positions(2, 2)
    positions[2, 1] = bad
    with pytest.raises(ValueError, match="positions contain NaN or Inf.*check_finite = False"):
        enc(q, q, positions)


def test_finite_check_can_be_skipped():
    q, positions = randn(1, 1, 4, 8), grid_positions(2, 2)
    positions[0, 0] = float("nan")
    rope = AxialRoPE(8)
    rope.check_finite = False
    out, _ = rope(q, q, positions)  # no check: NaN flows through RoPE
    assert out[0, 0, 0].isnan().any() and not out[0, 0, 1:].isnan().any()
    liere = LieRE(8, 2)
    liere.check_finite = False
    with pytest.raises(
        ValueError, match="generators contain NaN or Inf"
    ):  # the exponential still refuses
        liere(q, q, positions)


# -- extrapolation ----------------------------------------------------------------------------


@pytest.mark.parametrize("block", [2, 8, 64])
def test_orthogonal_at_eight_times_the_training_range(block):
    torch.manual_seed(0)
    enc = LieRE(64, 2, num_heads=2, block_size=block)
    assert_orthogonal(enc, grid_positions(14, 14) * 8)


def test_warning_far_beyond_the_accurate_range():
    torch.manual_seed(0)
    enc = LieRE(64, 2, block_size=64)
    q = randn(1, 1, 4, 64)
    with pytest.warns(RuntimeWarning, match=r"lose accuracy \(error up to about"):
        enc(q, q, grid_positions(2, 2) * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(q, q, grid_positions(2, 2) * 8)  # 8x the training range: no warning


# -- chunking -------------------------------------------------------------------------------


def saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("per_sample", [False, True])
def test_chunked_rotation_matches_and_saves_less_for_backward(per_sample):
    torch.manual_seed(0)
    enc = LieRE(32, 3, num_heads=2, block_size=8)
    positions = grid_positions(4, 8, 8)  # 256 tokens
    if per_sample:
        positions = positions.expand(2, -1, -1)
    q = randn(2, 2, 256, 32, seed=1).requires_grad_(True)
    k = randn(2, 2, 256, 32, seed=2).requires_grad_(True)
    upstream = randn(2, 2, 256, 32, seed=3)
    results = []
    for chunk in (None, 64):
        enc.max_tokens_per_chunk = chunk
        enc.zero_grad()
        q.grad = k.grad = None
        nbytes, (q_out, k_out) = saved_bytes(lambda: enc(q, k, positions))
        ((q_out + k_out) * upstream).sum().backward()
        results.append((nbytes, q_out.detach(), enc.weight.grad.clone(), q.grad.clone()))
    (full_bytes, q_full, w_full, g_full), (chunk_bytes, q_chunk, w_chunk, g_chunk) = results
    tol = orthogonality_tolerance(enc, positions, torch.float32) * 5
    torch.testing.assert_close(q_chunk, q_full, atol=tol, rtol=0)
    torch.testing.assert_close(g_chunk, g_full, atol=tol, rtol=0)
    torch.testing.assert_close(w_chunk, w_full, atol=tol * 1e3, rtol=1e-3)
    assert chunk_bytes < full_bytes / 3  # only the chunk inputs are kept; rotations are recomputed


def test_chunked_rotation_without_grad():
    enc = LieRE(16, 1, block_size=8).eval()
    positions = torch.linspace(0, 8, 1000).unsqueeze(-1)
    q = randn(1, 1, 1000, 16)
    with torch.no_grad():
        full, _ = enc(q, q, positions)
        enc.max_tokens_per_chunk = 128
        chunked, _ = enc(q, q, positions)
    # chunks choose their own squaring counts: differences are rounding, bounded as usual
    tol = orthogonality_tolerance(enc, positions, torch.float32) * q.abs().max().item()
    torch.testing.assert_close(chunked, full, atol=tol, rtol=0)


# -- mixed precision --------------------------------------------------------------------------


def test_bf16_autocast_training_tracks_float32():
    digits = mnist_digits("train")
    data = TaskData(digits.inputs[:512], digits.labels[:512], 10)
    curves = {}
    for name, dtype in (("f32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = VisionTransformer(
            24, 6, 10, in_channels=1, dim=32, depth=1, num_heads=2, pos_enc="liere"
        )
        config = TrainConfig(epochs=5, batch_size=64, lr=3e-3, seed=0, autocast_dtype=dtype)
        curves[name] = train(model, data, config)
    f32, bf16 = torch.tensor(curves["f32"]), torch.tensor(curves["bf16"])
    assert torch.isfinite(bf16).all()
    assert bf16[-1] < bf16[0] - 0.2  # it learns (2.32 -> about 1.94)
    # Stated tolerance: per-epoch mean losses within 0.05 of the float32 run (measured: 0.01;
    # bf16 keeps 8 mantissa bits in the autocast matmuls; rotations stay float32).
    assert (bf16 - f32).abs().max() < 0.05


# -- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "saved, target, message",
    [
        (
            dict(num_heads=6),
            dict(num_heads=3),
            "saved with num_heads=6, num_axes=2, block_size=8, head_dim=64, "
            "but this module has num_heads=3",
        ),
        (dict(), dict(block_size=16), "block_size=8.*but this module has .*block_size=16"),
        (dict(), dict(num_axes=3), "num_axes=2.*but this module has .*num_axes=3"),
    ],
)
def test_mismatched_liere_checkpoint_names_the_mismatch(saved, target, message):
    base = dict(head_dim=64, num_axes=2, num_heads=6, block_size=8)
    state = LieRE(**{**base, **saved}).state_dict()
    with pytest.raises(RuntimeError, match=message):
        LieRE(**{**base, **target}).load_state_dict(state)


def test_mismatched_mixed_rope_checkpoint():
    state = MixedRoPE(16, 2, num_heads=4).state_dict()
    with pytest.raises(
        RuntimeError,
        match="saved with num_heads=4, num_axes=2, head_dim=16, but this module has num_heads=2",
    ):
        MixedRoPE(16, 2, num_heads=2).load_state_dict(state)


def test_mismatched_vit_checkpoint_names_the_layer():
    kwargs = dict(
        image_size=16, patch_size=4, num_classes=3, in_channels=1, dim=32, depth=2, num_heads=2
    )
    state = VisionTransformer(**kwargs, block_size=8).state_dict()
    with pytest.raises(
        RuntimeError, match="'blocks.0.attn.pos_enc.weight' was saved with .*block_size=8"
    ):
        VisionTransformer(**kwargs, block_size=4).load_state_dict(state)
