"""Vision front (models/vision.py) and image-token injection (MMMambaModel.embed)."""

from __future__ import annotations

import math

import pytest
import torch

from mmmamba.models import MMMambaForCausalLM
from mmmamba.models.image_processing import tokens_per_tile
from mmmamba.models.vision import VisionFront, pixel_shuffle

TINY_VISION = {"image_size": 28, "patch_size": 7}  # 4 x 4 patches -> 2 x 2 = 4 tokens per tile
IMG = 5


def pixel_shuffle_reference(x: torch.Tensor) -> torch.Tensor:
    """InternVL pixel shuffle v2 at scale 0.5, written out: (n, R, C, c) -> (n, R/2, C/2, 4c) where output (a, b)
    concatenates input (2a, 2b), (2a, 2b+1), (2a+1, 2b), (2a+1, 2b+1)."""
    n, R, C, c = x.shape
    out = torch.empty(n, R // 2, C // 2, 4 * c, dtype=x.dtype)
    for a in range(R // 2):
        for b in range(C // 2):
            for m in range(2):
                for k in range(2):
                    j = 2 * m + k
                    out[:, a, b, j * c : (j + 1) * c] = x[:, 2 * a + m, 2 * b + k]
    return out


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 32, 32, 8), (3, 6, 10, 5)])
def test_pixel_shuffle_matches_written_out_layout(shape):
    x = torch.randn(*shape)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (shape[0], shape[1] // 2, shape[2] // 2, 4 * shape[3])
    assert torch.equal(out, pixel_shuffle_reference(x))


def test_pixel_shuffle_of_hovle_token_sequence():
    """HoVLE shuffles (n, l, c) patch tokens (row-major grid) and flattens the 2x2 blocks row-major again."""
    n, s, c = 2, 32, 6
    tokens = torch.randn(n, s * s, c)
    ours = pixel_shuffle(tokens.reshape(n, s, s, c), 0.5).reshape(n, -1, 4 * c)
    assert ours.shape == (n, 256, 4 * c)
    # token t = a * 16 + b of the output starts with patch (2a, 2b) = input token 2a * 32 + 2b
    for a, b in ((0, 0), (3, 7), (15, 15)):
        t = a * 16 + b
        assert torch.equal(ours[:, t, :c], tokens[:, 2 * a * s + 2 * b])
        assert torch.equal(ours[:, t, 3 * c :], tokens[:, (2 * a + 1) * s + 2 * b + 1])


def _cubic_matrix(n_in: int, n_out: int, A: float = -0.75) -> torch.Tensor:
    """(n_out, n_in) 1-D bicubic resampling (Keys kernel, half-pixel centres, border-clamped taps)."""

    def w(x):
        x = abs(x)
        if x <= 1:
            return ((A + 2) * x - (A + 3)) * x * x + 1
        if x < 2:
            return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
        return 0.0

    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        t = src - i0
        for tap, dist in zip((-1, 0, 1, 2), (t + 1, t, 1 - t, 2 - t)):
            M[o, min(max(i0 + tap, 0), n_in - 1)] += w(dist)
    return M


def _front(hidden=8, **vision):
    from mmmamba import MMMambaConfig

    cfg = MMMambaConfig(vocab_size=11, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, vision_config=vision, img_context_token_id=IMG)
    torch.manual_seed(0)
    front = VisionFront(cfg)
    with torch.no_grad():
        front.position_embedding.normal_()
    return front, cfg


def test_position_table_native_grid_is_the_table():
    front, _ = _front(**TINY_VISION)
    assert torch.equal(front._positions(4, 4, torch.float32), front.position_embedding[:, 1:])


@pytest.mark.parametrize("grid", [(6, 10), (8, 8), (3, 2)])
def test_position_table_bicubic_resize_for_other_grids(grid):
    front, _ = _front(**TINY_VISION)
    gh, gw = grid
    table = front.position_embedding[0, 1:].double().reshape(4, 4, -1)  # rows = patch rows
    expect = torch.einsum("yi,ijc,xj->yxc", _cubic_matrix(4, gh), table, _cubic_matrix(4, gw)).reshape(1, gh * gw, -1)
    got = front._positions(gh, gw, torch.float32)
    assert got.shape == (1, gh * gw, 8)
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)


def test_position_resize_keeps_row_column_orientation():
    """A table that varies only along rows still does after resizing to a non-square grid."""
    front, _ = _front(**TINY_VISION)
    with torch.no_grad():
        rows = torch.arange(4.0)[:, None, None].expand(4, 4, 8)
        front.position_embedding[0, 1:] = rows.reshape(16, 8)
    got = front._positions(6, 10, torch.float32).reshape(6, 10, 8)
    assert torch.allclose(got, got[:, :1].expand_as(got))
    assert not torch.allclose(got, got[:1].expand_as(got))


def test_non_native_tile_size_runs():
    front, _ = _front(**TINY_VISION)
    out = front(torch.randn(2, 3, 56, 84))  # 8 x 12 patches -> 4 x 6 = 24 tokens
    assert out.shape == (2, 24, 8)


def test_hovle_tile_gives_256_tokens():
    front, cfg = _front(hidden=8)  # defaults: 448-pixel tiles, 14-pixel patches, ratio 0.5
    assert front.tokens_per_tile == 256 == tokens_per_tile(cfg)
    assert front.position_embedding.shape == (1, 1 + 32 * 32, 8)
    assert front.mlp[0].in_features == 32
    with torch.no_grad():
        assert front(torch.randn(2, 3, 448, 448)).shape == (2, 256, 8)


# -- injection ------------------------------------------------------------------------------------------------
@pytest.fixture
def vlm(make_config):
    torch.manual_seed(0)
    return MMMambaForCausalLM(make_config(vision_config=TINY_VISION, img_context_token_id=IMG)).eval()


def test_embed_writes_image_tokens_at_context_slots_in_order(vlm):
    px = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([[1, 2] + [IMG] * 4 + [3] + [IMG] * 4 + [4]])
    with torch.no_grad():
        emb = vlm.model.embed(ids, px)
        img = vlm.model.vision(px)
        text = vlm.model.embed_tokens(ids)
    slots = ids[0] == IMG
    assert torch.equal(emb[0, slots], img.reshape(8, -1))
    assert torch.equal(emb[0, ~slots], text[0, ~slots])
    assert torch.equal(vlm.model.embed(ids), text)  # no pixel_values: plain token embeddings


def test_embed_count_mismatch_is_an_error(vlm):
    ids = torch.tensor([[1] + [IMG] * 3 + [2]])
    with pytest.raises(ValueError, match=r"3 <IMG_CONTEXT> tokens \(id 5\).*4 image tokens from 1 tiles"):
        vlm(ids, pixel_values=torch.randn(1, 3, 28, 28))


def test_pixel_values_without_vision_front_is_an_error(make_config):
    m = MMMambaForCausalLM(make_config()).eval()
    with pytest.raises(ValueError, match="no vision front"):
        m(torch.tensor([[1, 2]]), pixel_values=torch.randn(1, 3, 28, 28))
