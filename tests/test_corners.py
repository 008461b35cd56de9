"""Corners users reach: empty inputs, meta init, broadcasting, decoding with a KV cache, the
few-token path, re-orthogonalisation past the training range, causal attention, lazy
submodules."""

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_fast_matches_reference, randn

import liere
from liere import AxialRoPE, LieRE, MixedRoPE, RotaryAttention, grid_positions
from liere import functional as F
from liere.models import VisionTransformer

ENCODINGS = {
    "axial": lambda a=2: AxialRoPE(16, a),
    "mixed": lambda a=2: MixedRoPE(16, a, num_heads=2),
    "liere2": lambda a=2: LieRE(16, a, num_heads=2, block_size=2),
    "liere8": lambda a=2: LieRE(16, a, num_heads=2, block_size=8),
    "dense": lambda a=2: LieRE(16, a, num_heads=2, block_size=16),
}


def make(name, a=2, method="auto"):
    torch.manual_seed(0)
    enc = ENCODINGS[name](a)
    if method != "auto":
        enc.exp_method = method
    return enc


def reference_paths(name):
    return ["auto", "matrix_exp"] if name.startswith(("liere", "dense")) else ["auto"]


# -- empty inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENCODINGS))
@pytest.mark.parametrize("axes", [2, 3])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize(
    "batch, tokens, prefix", [(2, 0, 0), (0, 5, 0), (2, 0, 1), (0, 0, 0)], ids=str
)
def test_empty_inputs_give_empty_outputs(name, axes, per_sample, batch, tokens, prefix):
    for method in reference_paths(name):
        enc = make(name, axes, method)
        q = randn(batch, 2, tokens + prefix, 16, seed=1).requires_grad_()
        k = randn(batch, 2, tokens + prefix, 16, seed=2)
        pos = randn(batch, tokens, axes) if per_sample else randn(tokens, axes)
        q_out, k_out = enc(q, k, pos, num_prefix_tokens=prefix)
        assert q_out.shape == q.shape and k_out.shape == k.shape
        assert torch.equal(q_out, q) and torch.equal(k_out, k)  # prefix tokens only, or none
        q_out.sum().backward()
        assert q.grad is not None and q.grad.shape == q.shape
        assert enc.rotate(q, pos, num_prefix_tokens=prefix).shape == q.shape


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_lie_rotations_of_no_tokens(per_sample):
    bases = LieRE(16, 2, num_heads=2).bases()
    pos = torch.zeros(3, 0, 2) if per_sample else torch.zeros(0, 2)
    for method in ("auto", "taylor", "matrix_exp"):
        out = F.lie_rotations(pos, bases, method=method)
        assert out.shape == ((3, 2, 0, 2, 8, 8) if per_sample else (2, 0, 2, 8, 8))


def test_attention_with_only_the_prefix_tokens():
    torch.manual_seed(0)
    attn = RotaryAttention(32, 2, pos_enc=LieRE(16, 2, num_heads=2), num_prefix_tokens=1)
    plain = RotaryAttention(32, 2, num_prefix_tokens=1)
    plain.load_state_dict(attn.state_dict(), strict=False)
    x = randn(2, 1, 32)
    torch.testing.assert_close(attn(x, torch.zeros(0, 2)), plain(x))
    assert attn(randn(0, 5, 32), grid_positions(2, 2)).shape == (0, 5, 32)


# -- meta-device construction ------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        *ENCODINGS.values(),
        lambda: RotaryAttention(32, 2, pos_enc=LieRE(16, 2, num_heads=2), num_prefix_tokens=1),
        lambda: VisionTransformer(8, 4, 3, dim=32, depth=2, num_heads=2, pos_enc="liere"),
        lambda: VisionTransformer(8, 4, 3, dim=32, depth=1, num_heads=2, pos_enc="absolute"),
        lambda: VisionTransformer(8, 4, 3, dim=32, depth=1, num_heads=2, pos_enc="rope-axial"),
    ],
    ids=[*ENCODINGS, "attention", "vit-liere", "vit-absolute", "vit-axial"],
)
def test_meta_init_then_to_empty_and_reset_parameters(factory):
    with torch.device("meta"):
        module = factory()
    assert all(p.is_meta for p in module.parameters())
    module = module.to_empty(device="cpu")
    module.reset_parameters()
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    with torch.no_grad():
        if isinstance(module, VisionTransformer):
            out = module(randn(2, 3, 8, 8))
        elif isinstance(module, RotaryAttention):
            out = module(randn(2, 5, 32), grid_positions(2, 2))
        else:
            out = module(randn(2, 2, 4, 16), randn(2, 2, 4, 16), grid_positions(2, 2))[0]
    assert bool(torch.isfinite(out).all())


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_positions_of_batch_one_broadcast(name):
    enc = make(name)
    q, k = randn(3, 2, 9, 16, seed=1), randn(3, 2, 9, 16, seed=2)
    pos = grid_positions(3, 3)
    expected = enc(q, k, pos)
    for out, ref in zip(enc(q, k, pos.unsqueeze(0)), expected):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_one_axis_positions_may_be_a_vector(name):
    enc = make(name, a=1)
    q = randn(2, 2, 6, 16, seed=1)
    pos = torch.arange(6.0) / 5
    for out, ref in zip(enc(q, q, pos), enc(q, q, pos.unsqueeze(-1))):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # rotate(q) runs the product with half the columns of forward's q-and-k product, and a BLAS
    # may pick another kernel for it (MKL on an AVX2 CPU does: 1-ulp differences), so rotate
    # equals forward to rounding, not bit for bit
    torch.testing.assert_close(enc.rotate(q, pos), enc(q, q, pos)[0], atol=1e-6, rtol=1e-6)
    assert enc.rotation_matrices(pos).shape[1] == 6
    attn = RotaryAttention(32, 2, pos_enc=enc)
    torch.testing.assert_close(attn(randn(1, 6, 32), pos), attn(randn(1, 6, 32), pos[:, None]))


def test_layout_mistake_is_named():
    enc = LieRE(16, 2)  # shared by heads: the head count cannot catch it
    q = randn(2, 9, 4, 16)  # (batch, tokens, heads, head_dim) by mistake
    with pytest.raises(ValueError, match=r"is q laid out \(batch, tokens, heads, head_dim\)\?"):
        enc(q, q, grid_positions(3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_positions_warn_with_the_reason(dtype):
    enc = LieRE(16, 2)
    q = randn(1, 1, 9, 16)
    with pytest.warns(UserWarning, match=r"positions are torch\.\w+16, which keeps only"):
        enc(q, q, grid_positions(3, 3).to(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(q, q, grid_positions(3, 3))


# -- decoding with a KV cache -------------------------------------------------------------------


def test_forward_without_k_points_to_rotate():
    enc = LieRE(16, 1)
    with pytest.raises(ValueError, match=r"k is None.*encoding\.rotate\(x, positions\)"):
        enc(randn(1, 1, 2, 16), None, torch.zeros(2, 1))


@pytest.mark.parametrize("name", ["axial", "liere8", "dense"])
def test_kv_cache_decoding_matches_full_causal_attention(name):
    """The documented pattern (docs/decoding.md): rotate each step's new query and key with
    ``rotate`` at their own positions, append the key to the cache, never rotate it again.
    Every step's output equals the matching row of full causal attention."""
    enc = make(name, a=1)
    length, b, h, d = 7, 2, 2, 16
    q, k, v = (randn(b, h, length, d, seed=s) for s in (1, 2, 3))
    positions = torch.arange(length, dtype=torch.float32) / 511  # docs: index / (context - 1)
    q_rot, k_rot = enc(q, k, positions)
    full = torch.nn.functional.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True)
    cache_k, cache_v = [], []
    for t in range(length):
        step = positions[t : t + 1]
        cache_k.append(enc.rotate(k[:, :, t : t + 1], step))
        cache_v.append(v[:, :, t : t + 1])
        q_t = enc.rotate(q[:, :, t : t + 1], step)
        out = torch.nn.functional.scaled_dot_product_attention(
            q_t, torch.cat(cache_k, dim=2), torch.cat(cache_v, dim=2)
        )
        torch.testing.assert_close(out, full[:, :, t : t + 1], atol=2e-6, rtol=0)


# -- the few-token path (Note [few tokens]) ---------------------------------------------------


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("tokens, axes, per_sample", [(1, 1, False), (3, 2, False), (2, 3, True)])
def test_few_token_path_matches_the_reference(block, tokens, axes, per_sample):
    torch.manual_seed(0)
    q, k = randn(2, 2, tokens, 16, seed=1), randn(2, 2, tokens, 16, seed=2)
    pos = randn(2, tokens, axes, seed=3) if per_sample else randn(tokens, axes, seed=3)
    assert pos.shape[:-1].numel() <= F.FEW_TOKENS
    assert_fast_matches_reference(axes, block, q, k, pos, randn(2, 2, tokens, 16, seed=4))


def test_few_token_path_gradcheck_float64():
    bases = F.skew_symmetric(randn(2, 1, 2, 6, seed=1, dtype=torch.float64), 4)
    pos = randn(3, 1, seed=2, dtype=torch.float64) * 3
    bases.requires_grad_()
    pos.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, b: F.lie_rotations(p, b), (pos, bases))
    assert torch.autograd.gradgradcheck(lambda p, b: F.lie_rotations(p, b), (pos, bases))


# -- re-orthogonalisation past the training range (Note [re-orthogonalisation]) ---------------


def norm_drift(rot):
    x = randn(512, rot.shape[-1], seed=5, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.einsum("...ij,vj->...vi", rot.double(), x)
    return float((y.norm(dim=-1) - 1).abs().max())


def test_dense_rotations_keep_norms_at_8x_the_training_range():
    torch.manual_seed(0)
    bases = LieRE(64, 2, num_heads=6, block_size=64).bases().detach()
    far = grid_positions(14, 14) * 8
    assert norm_drift(F.lie_rotations(far, bases)) <= 1e-4
    assert norm_drift(F.lie_rotations(far, bases, reorthogonalize_above=None)) > 1e-4


def test_reorthogonalisation_leaves_the_training_range_untouched():
    torch.manual_seed(0)
    bases = LieRE(64, 2, num_heads=2, block_size=64).bases().detach()
    pos = grid_positions(14, 14)
    assert F.lie_rotations(pos, bases, reorthogonalize_above=None).equal(
        F.lie_rotations(pos, bases)
    )


def test_reorthogonalize_corrects_only_blocks_past_the_threshold():
    rot = torch.linalg.matrix_exp(F.skew_symmetric(randn(4, 28, seed=1), 8)) * 1.001
    bound = torch.tensor([10.0, 2000.0, 10.0, 3000.0])
    out = F.reorthogonalize(rot, bound, 1024.0)
    assert torch.equal(out[[0, 2]], rot[[0, 2]])
    eye = torch.eye(8, dtype=torch.float64)
    fixed = out[[1, 3]].double()
    assert float((fixed.mT @ fixed - eye).abs().max()) < 1e-5
    assert F.reorthogonalize(rot, bound, None) is rot


def test_reorthogonalize_gradients_follow_the_newton_schulz_step():
    rot = torch.linalg.matrix_exp(F.skew_symmetric(randn(3, 28, seed=1), 8)) * 1.001
    bound = torch.tensor([10.0, 2000.0, 3000.0])
    weights = randn(3, 8, 8, seed=2)
    rot.requires_grad_()
    (F.reorthogonalize(rot, bound, 1024.0) * weights).sum().backward()
    ref = rot.detach().clone().requires_grad_()
    fixed = ref - 0.5 * ref @ (ref.mT @ ref - torch.eye(8))
    plain = torch.cat((ref[:1], fixed[1:]))
    (plain * weights).sum().backward()
    torch.testing.assert_close(rot.grad, ref.grad, atol=1e-5, rtol=1e-5)


# -- causal attention -------------------------------------------------------------------------


def test_is_causal_masks_the_future():
    torch.manual_seed(0)
    attn = RotaryAttention(32, 2, pos_enc=LieRE(16, 1, num_heads=2))
    x = randn(2, 6, 32, seed=1)
    pos = torch.arange(6.0) / 5
    causal = attn(x, pos, is_causal=True)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(causal, attn(x, pos, attn_mask=mask), atol=1e-6, rtol=0)
    changed = x.clone()
    changed[:, -1] += 1.0  # the last token changes: no earlier output may move
    torch.testing.assert_close(attn(changed, pos, is_causal=True)[:, :-1], causal[:, :-1])
    assert not torch.allclose(attn(changed, pos)[:, :-1], attn(x, pos)[:, :-1])


# -- submodules -------------------------------------------------------------------------------


def test_submodules_are_reachable_lazily_without_matplotlib():
    code = (
        "import sys, liere; "
        "assert 'matplotlib' not in sys.modules; "
        "liere.models.VisionTransformer; liere.testing.assert_orthogonal; "
        "liere.viz.spatial_kernel; liere.integrations; "
        "assert 'matplotlib' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        liere.nope  # noqa: B018
