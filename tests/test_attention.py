import pytest
import torch
import torch.nn.functional as F
from conftest import randn

from liere import AxialRoPE, LieRE, MixedRoPE, RotaryAttention, grid_positions
from liere.testing import assert_permutation_equivariant


def plain_mha(attn: RotaryAttention, x: torch.Tensor, rotate=None) -> torch.Tensor:
    """Reference multi-head attention written out by hand."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    if rotate is not None:
        q, k = rotate(q, k)
    scores = q @ k.transpose(-1, -2) / d**0.5
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, h * d))


def test_no_pos_enc_is_plain_attention():
    torch.manual_seed(0)
    attn = RotaryAttention(24, 3)
    x = randn(2, 7, 24, seed=1)
    torch.testing.assert_close(attn(x), plain_mha(attn, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn(x, grid_positions(7, 1)), attn(x))  # positions ignored


@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_prefix_tokens_are_not_rotated(prefix):
    torch.manual_seed(0)
    enc = LieRE(8, 2, num_heads=3, block_size=4)
    attn = RotaryAttention(24, 3, pos_enc=enc, num_prefix_tokens=prefix)
    x = randn(2, prefix + 6, 24, seed=1)
    pos = grid_positions(2, 3)

    def rotate(q, k):
        q_rot, k_rot = enc(q[:, :, prefix:], k[:, :, prefix:], pos)
        return (torch.cat((q[:, :, :prefix], q_rot), 2), torch.cat((k[:, :, :prefix], k_rot), 2))

    torch.testing.assert_close(attn(x, pos), plain_mha(attn, x, rotate), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "enc_factory",
    [
        lambda: LieRE(8, 2, num_heads=3, block_size=8),
        lambda: LieRE(8, 2, num_heads=1, block_size=2),
        lambda: AxialRoPE(8, 2),
        lambda: MixedRoPE(8, 2, num_heads=3),
    ],
    ids=["liere", "liere2", "axial", "mixed"],
)
@pytest.mark.parametrize("prefix", [0, 2])
def test_permutation_equivariant_when_tokens_move_with_positions(enc_factory, prefix):
    torch.manual_seed(0)
    attn = RotaryAttention(24, 3, pos_enc=enc_factory(), num_prefix_tokens=prefix)
    x = randn(2, prefix + 12, 24, seed=1)
    assert_permutation_equivariant(attn, x, grid_positions(3, 4), num_prefix_tokens=prefix)
    assert_permutation_equivariant(attn, x, randn(2, 12, 2, seed=2), num_prefix_tokens=prefix)


def test_attn_mask_is_forwarded():
    torch.manual_seed(0)
    attn = RotaryAttention(16, 2, pos_enc=AxialRoPE(8, 1))
    x = randn(1, 5, 16, seed=1)
    pos = torch.arange(5.0).unsqueeze(-1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out = attn(x, pos, attn_mask=causal)
    # causal: the first token's output cannot depend on later tokens
    x2 = x.clone()
    x2[:, 1:] += 1.0
    torch.testing.assert_close(attn(x2, pos, attn_mask=causal)[:, 0], out[:, 0])
    assert not torch.allclose(attn(x2, pos)[:, 0], attn(x, pos)[:, 0])


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = RotaryAttention(16, 2, pos_enc=AxialRoPE(8), attn_drop=0.5, proj_drop=0.5).eval()
    x, pos = randn(1, 4, 16), grid_positions(2, 2)
    assert torch.equal(attn(x, pos), attn(x, pos))


def test_qkv_layout_matches_timm_attention():
    """Weights of timm's Attention (qkv: (3*dim, dim), q/k/v then heads) load unchanged."""
    torch.manual_seed(0)
    attn = RotaryAttention(12, 2)
    assert attn.qkv.weight.shape == (36, 12) and attn.proj.weight.shape == (12, 12)
    x = randn(1, 3, 12)
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, 2, 6).permute(2, 0, 3, 1, 4)  # timm's reshape
    ref = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, c)
    torch.testing.assert_close(attn(x), attn.proj(ref))


def test_errors():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        RotaryAttention(10, 3)
    with pytest.raises(
        ValueError, match="pos_enc has head_dim=8, but dim=24 with num_heads=2 gives head_dim=12"
    ):
        RotaryAttention(24, 2, pos_enc=LieRE(8))
    with pytest.raises(ValueError, match="pos_enc has num_heads=4; expected 1 .* or 2"):
        RotaryAttention(16, 2, pos_enc=LieRE(8, num_heads=4, block_size=4))
    with pytest.raises(ValueError, match="num_prefix_tokens must be >= 0"):
        RotaryAttention(16, 2, num_prefix_tokens=-1)
    attn = RotaryAttention(16, 2, pos_enc=AxialRoPE(8), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, 16\); got \(5, 16\)"):
        attn(randn(5, 16))
    with pytest.raises(ValueError, match="forward needs positions"):
        attn(randn(1, 5, 16))
    with pytest.raises(
        ValueError,
        match="5 tokens minus 1 prefix tokens = 4 tokens; got positions of shape \\(5, 2\\)",
    ):
        attn(randn(1, 5, 16), torch.zeros(5, 2))
