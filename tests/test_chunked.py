"""Temporal chunking (diffusers' conv cache) and spatial tiling of the causal video autoencoder."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import AutoencoderConfig, CausalVideoAutoencoder, build_autoencoder
from models.layers import CausalCache, CausalConv3d, temporal_chunks


def video(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 2 - 1


def smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, T, H, W) moving sinusoids in [-0.8, 0.8]: closer to real footage than noise."""
    generator = torch.Generator().manual_seed(seed)
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    channels = []
    for _ in range(3):
        fy, fx, ft, phase = torch.rand(4, generator=generator).tolist()
        channels.append(torch.sin(2 * math.pi * (fy * y / 24 + fx * x / 24 + ft * t / 8 + phase)))
    return 0.8 * torch.stack(channels)[None]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module")
def tiny() -> CausalVideoAutoencoder:
    torch.manual_seed(0)
    return build_autoencoder("tiny").eval()


# ------------------------------------------------------------------------------------ temporal chunks


@pytest.mark.parametrize(
    ("length", "chunk", "expected"),
    [
        (1, 8, [(0, 1)]),
        (5, 8, [(0, 5)]),
        (9, 8, [(0, 9)]),
        (13, 8, [(0, 13)]),
        (17, 8, [(0, 9), (9, 17)]),
        (21, 8, [(0, 13), (13, 21)]),
        (33, 8, [(0, 9), (9, 17), (17, 25), (25, 33)]),
        (1, 2, [(0, 1)]),
        (2, 2, [(0, 2)]),
        (5, 2, [(0, 3), (3, 5)]),
        (9, 2, [(0, 3), (3, 5), (5, 7), (7, 9)]),
    ],
)
def test_temporal_chunks_are_diffusers_batches(length: int, chunk: int, expected: list) -> None:
    assert list(temporal_chunks(length, chunk)) == expected


def test_cache_chunks_do_not_see_each_others_writes() -> None:
    # gradient checkpointing re-runs a chunk in the backward: its writes must not reach the next chunk
    conv = CausalConv3d(2, 2, kernel_size=3)
    first = CausalCache()
    assert first.first_chunk and first.past_frames(conv) is None
    x = torch.randn(1, 2, 4, 3, 3)
    conv(x, first)
    second = first.next_chunk()
    assert not second.first_chunk
    stored = second.past_frames(conv)
    assert torch.equal(stored, x[:, :, -2:])
    conv(torch.randn(1, 2, 4, 3, 3), first)  # the re-run
    assert second.past_frames(conv) is stored


def test_chunked_conv_equals_whole_conv() -> None:
    conv = CausalConv3d(3, 4, kernel_size=3)
    x = torch.randn(1, 3, 11, 6, 6)
    cache, pieces = CausalCache(), []
    for start, end in [(0, 3), (3, 4), (4, 11)]:  # a 1-frame chunk too (it uses one cached frame)
        pieces.append(conv(x[:, :, start:end], cache))
        cache = cache.next_chunk()
    assert max_relative_error(torch.cat(pieces, dim=2), conv(x)) < 1e-6


@pytest.mark.parametrize(
    ("frames", "kept_frames", "kept_latents"), [(17, 9, 3), (33, 9, 3), (33, 17, 5), (21, 13, 4)]
)
def test_encoder_is_causal_at_chunk_boundaries(
    tiny: CausalVideoAutoencoder, frames: int, kept_frames: int, kept_latents: int
) -> None:
    """With 8-frame chunks, latents 0..2 cover frames 0..8 and latents 0..4 cover frames 0..16: changing
    frames after a chunk boundary leaves the latents before it unchanged, bit for bit (the first chunk
    of a 21-frame clip holds 13 frames -> latents 0..3)."""
    x = video((1, 3, frames, 16, 24))
    changed = x.clone()
    changed[:, :, kept_frames:] = video((1, 3, frames - kept_frames, 16, 24), seed=1)
    with torch.no_grad():
        before, after = tiny.encode(x), tiny.encode(changed)
        alone = tiny.encode(x[:, :, :kept_frames])  # the same chunks, without the rest of the clip
    assert torch.equal(before.mean[:, :, :kept_latents], after.mean[:, :, :kept_latents])
    assert torch.equal(before.logvar[:, :, :kept_latents], after.logvar[:, :, :kept_latents])
    assert not torch.allclose(before.mean[:, :, kept_latents:], after.mean[:, :, kept_latents:])
    assert torch.equal(alone.mean, before.mean[:, :, :kept_latents])


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize(("latents", "kept_latents", "kept_frames"), [(5, 3, 9), (9, 3, 9), (9, 7, 25)])
def test_decoder_is_causal_at_chunk_boundaries(
    tiny: CausalVideoAutoencoder, grad: bool, latents: int, kept_latents: int, kept_frames: int
) -> None:
    """With 2-latent chunks (the first takes the remainder: [0, 3), [3, 5), ...), output frames 0..8 come
    from latents 0..2 only, frames 0..24 from latents 0..6. Checked with and without gradients (with
    gradients the last conv runs once over all chunks)."""
    z = torch.randn(1, 16, latents, 3, 2, generator=torch.Generator().manual_seed(0))
    changed = z.clone()
    changed[:, :, kept_latents:] += 1.0
    with torch.set_grad_enabled(grad):
        before, after = tiny.decode(z), tiny.decode(changed)
    assert before.shape[2] == 4 * (latents - 1) + 1
    assert torch.equal(before[:, :, :kept_frames], after[:, :, :kept_frames])
    assert not torch.allclose(before[:, :, kept_frames:], after[:, :, kept_frames:])


def test_last_conv_over_all_chunks_equals_chunk_by_chunk(tiny: CausalVideoAutoencoder) -> None:
    z = torch.randn(1, 16, 9, 3, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chunk_by_chunk = tiny.decode(z)
    whole_last_conv = tiny.decode(z)  # gradients on: one conv_out call
    assert whole_last_conv.requires_grad and not chunk_by_chunk.requires_grad
    assert max_relative_error(whole_last_conv.detach(), chunk_by_chunk) < 1e-5


def test_chunks_change_the_numbers_like_diffusers(tiny: CausalVideoAutoencoder) -> None:
    # GroupNorm statistics are per chunk: one big chunk gives other latents (the chunk size is part of the
    # model's definition, hence a config field)
    whole = build_autoencoder("tiny", encode_frame_chunk=64, decode_latent_chunk=64).eval()
    whole.load_state_dict(tiny.state_dict())
    x = video((1, 3, 17, 16, 16))
    with torch.no_grad():
        chunked_mean, whole_mean = tiny.encode(x).mean, whole.encode(x).mean
    assert torch.equal(chunked_mean[:, :, :3], whole.encode(x[:, :, :9]).mean)
    assert not torch.allclose(chunked_mean[:, :, 3:], whole_mean[:, :, 3:], atol=1e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"encode_frame_chunk": 6},
            r"encode_frame_chunk must be a positive multiple of .*=4.*got 6; e\.g\. 8",
        ),
        ({"encode_frame_chunk": 0}, r"encode_frame_chunk"),
        ({"decode_latent_chunk": 0}, r"decode_latent_chunk must be a positive integer, got 0"),
    ],
)
def test_chunk_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**overrides)


# ------------------------------------------------------------------------------------- spatial tiles


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"), [(80, 112, 48, 16), (72, 136, (40, 56), (16, 8)), (64, 64, 32, 0)]
)
def test_tile_blending_is_exact_for_pointwise_networks(
    tiny: CausalVideoAutoencoder, height: int, width: int, tile, overlap
) -> None:
    # the ramps of overlapping tiles sum to one and the tiles sit where they belong: tiling a network that
    # works pixel by pixel (decode side: identity; encode side: 8x8 mean) changes nothing
    x = video((1, 3, 5, height, width))
    identity = tiny._tiled(lambda tile_x: tile_x, x, tile, overlap, in_scale=8, out_scale=8)
    assert torch.allclose(identity, x, atol=1e-6, rtol=0)
    pooled = tiny._tiled(lambda tile_x: F.avg_pool3d(tile_x, (1, 8, 8)), x, tile, overlap, in_scale=8)
    assert torch.allclose(pooled, F.avg_pool3d(x, (1, 8, 8)), atol=1e-6, rtol=0)


def test_one_tile_is_the_untiled_result(tiny: CausalVideoAutoencoder) -> None:
    x = video((1, 3, 17, 32, 48))  # two temporal chunks each way
    with torch.no_grad():
        posterior = tiny.encode(x)
        assert torch.equal(tiny.tiled_encode(x, tile_size=48, tile_overlap=16).mean, posterior.mean)
        whole = tiny.decode(posterior.mean)
        assert torch.equal(tiny.tiled_decode(posterior.mean, tile_size=(32, 64), tile_overlap=0), whole)


def test_tiled_matches_whole_within_measured_tolerance(tiny: CausalVideoAutoencoder) -> None:
    """72x136 frames in 40x56-pixel tiles overlapping by 16: non-square, and the tiles divide neither side
    (3 x 3 tiles, spread evenly: they overlap by 24 pixels down and 16 across). A tile sees zero padding at
    its edges and has its own GroupNorm statistics, so tiling changes the numbers everywhere, and tiles of
    5x7 latents are tiny for a random 4-level network. Measured on smooth video (latent mean std 0.31,
    decoded video std 0.105): mean absolute error 0.154 on the latent mean and 0.019 on the decoded
    video; max absolute error 1.02 (latent mean) and 0.59 (video), both in overlap regions. The bounds
    are about 1.5x those; a misplaced tile gives mean errors near the stds. (Measured elsewhere: 64-pixel
    tiles on 96x160 give 0.129 / 0.014; 128-pixel tiles on 160x208 give 0.048 / 0.008.)"""
    x = smooth_video(5, 72, 136)
    with torch.no_grad():
        posterior = tiny.encode(x)
        tiled_posterior = tiny.tiled_encode(x, tile_size=(40, 56), tile_overlap=16)
        decoded = tiny.decode(posterior.mode())
        tiled_decoded = tiny.tiled_decode(posterior.mode(), tile_size=(40, 56), tile_overlap=16)
    assert tiled_posterior.mean.shape == posterior.mean.shape and tiled_decoded.shape == x.shape
    latent_error, video_error = (tiled_posterior.mean - posterior.mean).abs(), (tiled_decoded - decoded).abs()
    assert latent_error.mean() < 0.2 and latent_error.max() < 1.5
    assert video_error.mean() < 0.03 and video_error.max() < 1.0


def test_reconstruct(tiny: CausalVideoAutoencoder) -> None:
    x = video((1, 3, 5, 32, 48))
    whole = tiny.reconstruct(x)
    tiled = tiny.reconstruct(x, tiled=True, tile_size=32, tile_overlap=8)
    assert whole.shape == tiled.shape == x.shape
    assert not whole.requires_grad and not tiled.requires_grad
    with torch.no_grad():
        assert torch.equal(whole, tiny.decode(tiny.encode(x).mode()))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tile_size": 20}, ValueError, r"tile_size=20 must be positive multiples of 8"),
        ({"tile_size": 32, "tile_overlap": 24}, ValueError, r"at most half the tile"),
        ({"tile_size": 32, "tile_overlap": 4}, ValueError, r"non-negative multiples of 8"),
        ({"tile_size": (32, 32, 32)}, TypeError, r"tile_size must be an int or a pair"),
    ],
)
def test_bad_tiles_raise(tiny: CausalVideoAutoencoder, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        tiny.tiled_encode(video((1, 3, 1, 32, 32)), **kwargs)
