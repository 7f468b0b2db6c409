"""TensorBoard media: input | reconstruction written as an animated GIF image summary (no moviepy) and a
still strip, read back from the event file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.metrics import MetricsLogger, TensorBoardLogger, encode_gif, side_by_side_frames


def read_images(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def frames_of(gif: bytes) -> list[np.ndarray]:
    image = Image.open(io.BytesIO(gif))
    frames = []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append(np.asarray(image.convert("RGB")))
    return frames


def flat_video(levels: list[list[int]], channels: int = 3, height: int = 16, width: int = 24) -> torch.Tensor:
    """A batch (B, C, T, H, W) in [-1, 1] whose frames are flat grey `levels` (uint8 values, per clip and
    frame): GIF's palette keeps so few colours exact."""
    values = torch.tensor(levels, dtype=torch.float32) / 127.5 - 1  # (B, T)
    return values[:, None, :, None, None].expand(-1, channels, -1, height, width).contiguous()


def test_gif_summary_roundtrip(tmp_path):
    # 2 clips of 5 frames, 16x24: every frame differs from the one before, so Pillow keeps all 5.
    levels_in = [[0, 60, 128, 190, 255], [230, 200, 170, 140, 110]]
    levels_out = [[10, 70, 135, 180, 245], [220, 205, 160, 150, 100]]
    inputs, recons = flat_video(levels_in), flat_video(levels_out)
    logger = TensorBoardLogger(tmp_path)
    logger.log_media(7, "eval/val/media", inputs, recons, fps=4)
    logger.close()

    events = read_images(tmp_path)
    assert {"eval/val/media/gif", "eval/val/media/frames"} <= set(events.Tags()["images"])
    (event,) = events.Images("eval/val/media/gif")
    assert event.step == 7
    assert event.encoded_image_string[:6] == b"GIF89a"
    assert (event.width, event.height) == (2 * 24, 2 * 16)  # input | recon, one row per clip

    gif = Image.open(io.BytesIO(event.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (48, 32)
    assert gif.info["duration"] == 250 and gif.info["loop"] == 0
    frames = frames_of(event.encoded_image_string)
    for t, frame in enumerate(frames):
        for clip in range(2):
            rows = frame[clip * 16 : (clip + 1) * 16]
            assert (rows[:, :24] == levels_in[clip][t]).all()
            assert (rows[:, 24:] == levels_out[clip][t]).all()


def test_still_strip_shows_input_over_recon(tmp_path):
    levels_in, levels_out = [0, 60, 128, 190, 255], [10, 70, 135, 180, 245]
    inputs, recons = flat_video([levels_in]), flat_video([levels_out])
    logger = TensorBoardLogger(tmp_path)
    logger.log_media(3, "media", inputs, recons, still_frames=3)  # frames 0, 2, 4
    logger.close()
    (event,) = read_images(tmp_path).Images("media/frames")
    strip = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert strip.shape == (2 * 16, 3 * 24, 3)
    for k, t in enumerate([0, 2, 4]):
        assert (strip[:16, k * 24 : (k + 1) * 24] == levels_in[t]).all()
        assert (strip[16:, k * 24 : (k + 1) * 24] == levels_out[t]).all()


def test_single_grayscale_clip_and_max_width(tmp_path):
    torch.manual_seed(0)
    clip = torch.rand(1, 3, 32, 64) * 2 - 1  # (C, T, H, W), one channel
    frames = side_by_side_frames(clip, clip.flip(-1), max_width=None)
    assert frames.shape == (3, 32, 128, 3) and frames.dtype == np.uint8
    assert (frames[..., 0] == frames[..., 1]).all()  # grey shown as RGB
    assert side_by_side_frames(clip, clip, max_width=64).shape == (3, 16, 64, 3)  # area-shrunk by 2

    logger = TensorBoardLogger(tmp_path)
    logger.log_media(0, "media", clip, -clip, fps=8, max_width=64, still_frames=0)
    logger.close()
    events = read_images(tmp_path)
    assert events.Tags()["images"] == ["media/gif"]
    gif = Image.open(io.BytesIO(events.Images("media/gif")[0].encoded_image_string))
    assert gif.n_frames == 3 and gif.size == (64, 16)


def test_log_is_unchanged_beside_media(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log(1, {"loss": 0.5})
    logger.log_media(1, "media", torch.zeros(3, 2, 16, 16), torch.ones(3, 2, 16, 16))
    logger.log(2, {"loss": 0.25})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert [s.value for s in read_images(tmp_path).Scalars("loss")] == [0.5, 0.25]


def test_base_logger_is_a_no_op_and_bad_inputs_raise():
    assert MetricsLogger().log_media(0, "media", torch.zeros(3, 2, 16, 16), torch.zeros(3, 2, 16, 16)) is None
    with pytest.raises(ValueError, match="same shape"):
        side_by_side_frames(torch.zeros(3, 2, 16, 16), torch.zeros(3, 2, 16, 8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        side_by_side_frames(torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16, 16))


def test_encode_gif_frame_count_and_timing():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 8, 10, 3), dtype=np.uint8)
    gif = Image.open(io.BytesIO(encode_gif(frames, fps=10)))
    assert gif.n_frames == 4 and gif.size == (10, 8) and gif.info["duration"] == 100
