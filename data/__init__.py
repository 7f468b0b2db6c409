"""Video data: webdataset shards -> decoded, cropped clips (C, T, H, W) in [-1, 1], batched in the
DataLoader workers (square crops or aspect-ratio buckets; epoch or resampled shard streams); demo shards."""

from data.demo import DemoShards, ensure_demo_shards, write_demo_shards
from data.pipeline import (
    MODES,
    SKIP_REASONS,
    DataPosition,
    SkipCounter,
    SkippedSamples,
    VideoShardDataset,
    build_dataloader,
    build_video_dataset,
    collate_clips,
    expand_shards,
)
from data.transforms import crop, resize_shorter_side, to_model_range, video_to_clip_tensor
from data.video import VideoDecodeError, VideoTooShortError, clip_span, decode_clip, decode_frames

__all__ = [
    "MODES",
    "SKIP_REASONS",
    "DataPosition",
    "DemoShards",
    "SkipCounter",
    "SkippedSamples",
    "VideoDecodeError",
    "VideoShardDataset",
    "VideoTooShortError",
    "build_dataloader",
    "build_video_dataset",
    "clip_span",
    "collate_clips",
    "crop",
    "decode_clip",
    "decode_frames",
    "ensure_demo_shards",
    "expand_shards",
    "resize_shorter_side",
    "to_model_range",
    "video_to_clip_tensor",
    "write_demo_shards",
]
