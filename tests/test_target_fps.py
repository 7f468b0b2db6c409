"""Sampling clips at a target frame rate: the stride comes from the json's fps, else the container's."""

import io
import json
import tarfile

import pytest
import torch

from data import build_video_dataset
from data.demo import encode_mp4
from data.pipeline import _metadata_fps
from data.video import stride_for_fps, video_fps


def counting_video(frames: int, fps: int) -> bytes:
    """Frame i is a flat grey of level 10 * i, so decoded frames reveal their index."""
    levels = torch.arange(frames, dtype=torch.uint8) * 10
    return encode_mp4(levels.view(-1, 1, 1, 1).expand(frames, 32, 32, 3).contiguous(), fps=fps)


def frame_indices(clip: torch.Tensor) -> list[int]:
    # (C, T, H, W) in [-1, 1] -> the grey level of each frame / 10
    return [round((level + 1) * 127.5 / 10) for level in clip.float().mean(dim=(0, 2, 3)).tolist()]


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_stride_and_frame_rate_helpers():
    assert (
        stride_for_fps(24.0, 12.0) == 2 and stride_for_fps(30.0, 8.0) == 4 and stride_for_fps(8.0, 24.0) == 1
    )
    assert video_fps(counting_video(5, fps=12)) == pytest.approx(12.0)
    assert video_fps(b"not a video") is None
    assert _metadata_fps({"fps": 25}) == 25.0
    ffprobe = {"video_metadata": {"streams": [{"codec_type": "video", "avg_frame_rate": "30000/1001"}]}}
    assert _metadata_fps(ffprobe) == pytest.approx(29.97, abs=1e-2)
    assert _metadata_fps({"fps": "0/0"}) is None and _metadata_fps({"fps": float("inf")}) is None


def test_clips_are_sampled_at_the_target_rate(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    write_shard(
        shard,
        {
            "000000000": {"mp4": counting_video(20, fps=24)},  # the container says 24 fps: stride 3 for 8 fps
            "000000001": {
                "mp4": counting_video(20, fps=24),
                "json": json.dumps({"fps": 16}).encode(),
            },  # json wins
        },
    )
    dataset = build_video_dataset(
        str(shard), num_frames=5, resolution=32, train=False, rank=0, world_size=1, target_fps=8.0
    )
    clips = {sample["key"]: frame_indices(sample["video"]) for sample in dataset}
    assert clips == {"000000000": [0, 3, 6, 9, 12], "000000001": [0, 2, 4, 6, 8]}


def test_target_fps_replaces_the_frame_stride_in_the_config():
    from pathlib import Path

    from trainer.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
    assert load_config(tiny, ["data.target_fps=8"]).data.target_fps == 8.0
    with pytest.raises(ConfigError, match=r"replaces data\.frame_stride"):
        load_config(tiny, ["data.target_fps=8", "data.frame_stride=2"])
