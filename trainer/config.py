"""Typed run configuration: nested dataclasses loaded from one JSON file plus dotted overrides.

Precedence: dataclass defaults < JSON file < command-line overrides (`train.max_steps=20`).
Unknown keys and bad values raise `ConfigError` (a ValueError) with the fix in the message.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from data.degrade import Degradation
from models import AUTOENCODER_PRESETS
from models.discriminator_set import (
    DISCRIMINATOR_SIZES,
    DISCRIMINATOR_TYPES,
    DiscriminatorSet,
    build_discriminator_set,
)


class ConfigError(ValueError):
    """A config file, override or value that cannot run; the message says how to fix it."""


# The smallest frame side: LPIPS' VGG needs 16 pixels and SSIM's window 11 (8 px frames passed the checks,
# then failed in the first evaluation or step).
MIN_SIDE = 16
_MIN_SIDE_WHY = "LPIPS needs 16 pixels, SSIM 11"


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The step loop: length, output, resume, seeds and how often to log, evaluate and save."""

    max_steps: int = 1000
    output_dir: str = "runs/default"
    # "auto": continue from the latest checkpoint in output_dir if there is one; "none": start fresh;
    # anything else: a path to a run directory or a checkpoint directory to continue from.
    resume: str = "auto"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    gradient_accumulation_steps: int = 1
    # Optional check: data.batch_size x gradient_accumulation_steps x world size must equal it.
    global_batch_size: int | None = None
    progress_bar: bool = True
    # Published checkpoints to keep (the newest ones); 0 keeps all.
    keep_checkpoints: int = 3
    # A step whose loss or gradient norm is NaN/Inf is skipped on every rank; after this many skips in
    # a row the run saves a checkpoint (its weights are the last good ones) and stops. 0: never stop.
    max_consecutive_skips: int = 20
    # torch.compile the autoencoder's forward (and so its backward), static shapes; the discriminators
    # stay eager. Same losses as eager (tests/test_compile.py); ZeRO stages 0-2. For GPUs, where it
    # fuses norms and activations; on the 2-core CPU it measured slower (bench/RESULTS.md).
    compile: bool = False

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(
            self.checkpoint_every >= 0,
            f"train.checkpoint_every must be >= 0 (0 saves only at the end), got {self.checkpoint_every}",
        )
        _require(
            self.gradient_accumulation_steps >= 1,
            f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}",
        )
        _require(self.output_dir != "", "train.output_dir must not be empty")
        _require(
            self.keep_checkpoints >= 0,
            f"train.keep_checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}",
        )
        _require(
            self.max_consecutive_skips >= 0,
            f"train.max_consecutive_skips must be >= 0 (0 never stops), got {self.max_consecutive_skips}",
        )


@dataclass(kw_only=True, slots=True)
class DemoDataConfig:
    """Built-in demo shards (camera moves over scikit-image photographs), generated when absent."""

    enabled: bool = False
    dir: str = "demo_data"
    train_shards: int = 8
    eval_shards: int = 2
    clips_per_shard: int = 16


@dataclass(kw_only=True, slots=True)
class RestorationConfig:
    """Restoration (e.g. VAE super-resolution) training: the model sees a degraded copy of each clip
    (blur, bicubic down/up by `scale`, noise, JPEG) and the losses compare its output with the clean clip."""

    enabled: bool = False
    blur_sigma: float = 1.0
    scale: int = 4
    noise_std: float = 0.0
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        try:
            self.degradation()
        except ValueError as err:
            raise ConfigError(f"data.restoration: {err}") from None

    def degradation(self) -> Degradation:
        return Degradation(
            blur_sigma=self.blur_sigma,
            scale=self.scale,
            noise_std=self.noise_std,
            jpeg_quality=self.jpeg_quality,
        )


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where clips come from and how they are cut: 4k+1 frames, square crops (or aspect-ratio buckets),
    values in [-1, 1]."""

    # A brace pattern ("shards/train-{000000..000099}.tar"), a glob, or a list of paths.
    shards: str | list[str] = ""
    eval_shards: str | list[str] = ""
    # Joint image-video training: image shards (KEY.jpg/png/webp, 1-frame clips) and the fraction of
    # micro-batches taken from them (drawn per micro-batch from the seed, the same on every rank).
    image_shards: str | list[str] = ""
    image_ratio: float = 0.0
    image_batch_size: int | None = None  # None: data.batch_size
    # fsspec options for s3:// gs:// http(s):// shards, e.g. {"client_kwargs": {"endpoint_url": ...}};
    # credentials otherwise come from the environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)
    storage_options: dict[str, Any] = field(default_factory=dict)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    restoration: RestorationConfig = field(default_factory=RestorationConfig)
    num_frames: int = 17
    resolution: int = 256
    frame_stride: int = 1
    # sample frames at (about) this rate instead of every frame_stride-th: stride = round(source fps / it)
    target_fps: float | None = None
    batch_size: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 64
    # "epoch": each pass visits every shard once (shards split over ranks and workers); "resampled": an
    # endless stream, each worker drawing shards with replacement from a seeded RNG (any shard count).
    mode: Literal["epoch", "resampled"] = "epoch"
    # Aspect-ratio buckets, [height, width] each (multiples of 8): a clip takes the bucket nearest its
    # aspect ratio and a batch holds one bucket; empty: square crops of `resolution`.
    buckets: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(
            self.num_frames >= 1 and (self.num_frames - 1) % 4 == 0,
            f"data.num_frames must be 4k+1 (1, 5, 9, 13, 17, ...) so that the first frame is kept and the "
            f"rest compress 4x in time; got {self.num_frames}: use {_nearest_4k1(self.num_frames)}",
        )
        _require(
            self.resolution >= MIN_SIDE and self.resolution % 8 == 0,
            f"data.resolution must be a positive multiple of 8 (8x spatial compression) and at least "
            f"{MIN_SIDE} ({_MIN_SIDE_WHY}); got {self.resolution}: use {_side_for(self.resolution)}",
        )
        _require(self.frame_stride >= 1, f"data.frame_stride must be >= 1, got {self.frame_stride}")
        _require(0 <= self.image_ratio < 1, f"data.image_ratio must be in [0, 1), got {self.image_ratio}")
        _require(
            (self.image_ratio > 0) == bool(self.image_shards),
            "data.image_ratio > 0 and data.image_shards go together: give both (joint image-video training) "
            "or neither",
        )
        _require(
            self.image_batch_size is None or self.image_batch_size >= 1,
            f"data.image_batch_size must be >= 1, got {self.image_batch_size}",
        )
        if self.target_fps is not None:
            _require(
                self.target_fps > 0 and self.frame_stride == 1,
                f"data.target_fps must be > 0 and replaces data.frame_stride (leave it at 1); got target_fps="
                f"{self.target_fps}, frame_stride={self.frame_stride}",
            )
        if self.restoration.enabled:
            _require(
                self.resolution % self.restoration.scale == 0,
                f"data.resolution={self.resolution} must be divisible by data.restoration.scale="
                f"{self.restoration.scale}",
            )
            _require(
                all(
                    h % self.restoration.scale == 0 and w % self.restoration.scale == 0
                    for h, w in self.buckets
                ),
                f"data.buckets {self.buckets} must be divisible by data.restoration.scale={self.restoration.scale}",
            )
        _require(self.batch_size >= 1, f"data.batch_size (per rank) must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        for height, width in self.buckets:
            _require(
                min(height, width) >= MIN_SIDE and height % 8 == 0 and width % 8 == 0,
                f"data.buckets sizes must be positive multiples of 8 (8x spatial compression) and at least "
                f"{MIN_SIDE} ({_MIN_SIDE_WHY}); got [{height}, {width}]: use "
                f"[{_side_for(height)}, {_side_for(width)}]",
            )
        _require(
            len(set(map(tuple, self.buckets))) == len(self.buckets),
            f"data.buckets has a size twice: {self.buckets}",
        )
        if self.demo.enabled:
            _require(
                not self.shards and not self.eval_shards,
                "data.demo.enabled trains on the generated demo shards: remove data.shards and "
                "data.eval_shards, or set data.demo.enabled=false",
            )
        else:
            _require(
                bool(self.shards),
                "data.shards is empty: give a shard pattern such as 'shards/train-{000000..000009}.tar', "
                "or set data.demo.enabled=true to train on the built-in demo data",
            )


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The autoencoder: a named preset (see models.AUTOENCODER_PRESETS), or a diffusers folder to start from."""

    preset: str = "tiny"
    # A local diffusers AutoencoderKLCogVideoX folder (config.json + safetensors): the run starts from its
    # weights and takes its architecture from its config.json (model.preset is then not used).
    init_from: str | None = None
    gradient_checkpointing: bool = False
    # The latent's regulariser: "kl" (diffusers' format), or the "fsq" / "lfq" quantizer with constructor
    # arguments `quantizer` (e.g. {"levels": [8, 5, 5, 5]} for FSQ; LFQ takes its dim from latent_channels).
    regularizer: Literal["kl", "fsq", "lfq"] = "kl"
    quantizer: dict[str, Any] = field(default_factory=dict)
    # Override the preset's latent width (a quantizer's dim must equal it); None keeps the preset's.
    latent_channels: int | None = None
    # Temporal chunks of encode and decode (part of the model's definition: GroupNorm is per chunk);
    # None keeps the preset's (diffusers' 8 frames and 2 latents).
    encode_frame_chunk: int | None = None
    decode_latent_chunk: int | None = None

    def __post_init__(self) -> None:
        _require_choice("model.preset", self.preset, AUTOENCODER_PRESETS)
        if self.init_from:
            fixed = [name for name in ("latent_channels",) if getattr(self, name) is not None]
            _require(
                self.regularizer == "kl" and not self.quantizer and not fixed,
                "model.init_from loads a diffusers AutoencoderKLCogVideoX (KL, its own latent width): "
                "drop model.regularizer/quantizer/latent_channels, or start from a preset",
            )
            return
        try:  # the architecture is checked now, not when the model is built after the ranks start
            dataclasses.replace(AUTOENCODER_PRESETS[self.preset], **self.autoencoder_overrides())
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None

    def autoencoder_overrides(self) -> dict[str, Any]:
        """The AutoencoderConfig fields this section sets on top of the preset (or the init_from folder)."""
        overrides: dict[str, Any] = {"gradient_checkpointing": self.gradient_checkpointing}
        for name in ("latent_channels", "encode_frame_chunk", "decode_latent_chunk"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        if not self.init_from:
            overrides.update(regularizer=self.regularizer, quantizer=dict(self.quantizer))
        return overrides


@dataclass(kw_only=True, slots=True)
class DiscriminatorSpec:
    """One discriminator: its type (see models.DISCRIMINATOR_TYPES), loss weight, width and overrides."""

    type: str = "3d"
    weight: float = 1.0
    # "tiny" or "default" widths; None takes discriminator.preset
    size: str | None = None
    # the output key in logs and checkpoints; None: the type (give one when a type appears twice)
    name: str | None = None
    # constructor arguments of the discriminator's class, on top of its size's
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_choice("discriminator.discriminators[].type", self.type, DISCRIMINATOR_TYPES)
        _require(self.weight >= 0, f"discriminator weight must be >= 0, got {self.weight}")
        if self.size is not None:
            _require_choice("discriminator.discriminators[].size", self.size, DISCRIMINATOR_SIZES[self.type])


@dataclass(kw_only=True, slots=True)
class DiscriminatorConfig:
    """The discriminators, any combination with a weight each, trained together in one engine."""

    # widths of every discriminator without its own `size`: "tiny" (CPU tests, demos) or "default"
    preset: str = "default"
    gradient_checkpointing: bool = True
    discriminators: list[DiscriminatorSpec] = field(default_factory=lambda: [DiscriminatorSpec()])
    # frames per clip the 2D discriminators judge (random, distinct); 0: every frame
    image_frames: int = 1
    # extra scales for the 2D discriminators (frames average-pooled by each factor), weighted by
    # loss.multiscale_adversarial_loss_weight
    multiscale_factors: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require_choice("discriminator.preset", self.preset, DISCRIMINATOR_SIZES["3d"])
        _require(
            bool(self.discriminators), "discriminator.discriminators must name at least one discriminator"
        )
        _require(self.image_frames >= 0, f"discriminator.image_frames must be >= 0, got {self.image_frames}")
        _require(
            all(f >= 2 for f in self.multiscale_factors),
            f"discriminator.multiscale_factors must be integers >= 2, got {self.multiscale_factors}",
        )
        try:  # unknown options, duplicate names: found now, on the meta device (no memory)
            with torch.device("meta"):
                self.build()
        except ValueError as err:
            raise ConfigError(f"discriminator: {err}") from None

    def specs(self) -> list[dict[str, Any]]:
        specs = []
        for spec in self.discriminators:
            entry = {
                "type": spec.type,
                "weight": spec.weight,
                "size": spec.size or self.preset,
                "options": dict(spec.options),
            }
            if spec.name is not None:
                entry["name"] = spec.name
            specs.append(entry)
        return specs

    def build(self) -> DiscriminatorSet:
        return build_discriminator_set(
            self.specs(),
            gradient_checkpointing=self.gradient_checkpointing,
            image_frames=self.image_frames,
            multiscale_factors=tuple(self.multiscale_factors),
        )


@dataclass(kw_only=True, slots=True)
class VGGLossConfig:
    """The VGG19 perceptual and Gram style losses: layers with their weights, distances, weights file."""

    layers: dict[str, float] = field(
        default_factory=lambda: {"conv1_2": 1.0, "conv2_2": 0.75, "conv3_4": 0.5, "conv4_4": 0.25}
    )
    distance: Literal["l1", "l2", "cosine"] = "l1"
    style_distance: Literal["l1", "l2"] = "l1"
    pretrained: bool = True
    # torchvision's vgg19-dcbb9e9d.pth; else the torch hub cache, else the download
    weights_path: str | None = None
    download: bool = True


@dataclass(kw_only=True, slots=True)
class LPIPSConfig:
    """LPIPS weights: a local file, else the torch hub cache, else the canonical download."""

    pretrained: bool = True
    weights_path: str | None = None
    backbone_weights_path: str | None = None
    download: bool = True


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The perceptual-adversarial objective (losses.VideoAutoencoderLoss; DESIGN.md decision 2)."""

    rec_loss: Literal["l1", "mse"] = "l1"
    # learned scalar log-variance: rec / exp(logvar) + logvar, trained with the autoencoder
    learn_logvar: bool = False
    logvar_init: float = 0.0
    perceptual_weight: float = 1.0  # LPIPS
    # LPIPS, VGG and style losses are computed on this many random frames per clip; 0 means every frame.
    perceptual_frames: int = 1
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    vgg_perceptual_weight: float = 0.0
    style_weight: float = 0.0
    vgg: VGGLossConfig = field(default_factory=VGGLossConfig)
    # LDM's meaning (taming/SGM: reconstruction summed over each clip's elements, KL over the latent's):
    # the loss adds kl_weight * KL / (C*T*H*W), as its reconstruction term is a per-element mean
    kl_weight: float = 1e-6
    # weight of the quantizer's auxiliary loss (LFQ: entropy + commitment terms; FSQ has none)
    quantizer_aux_loss_weight: float = 1.0
    # the generator's adversarial weight (times the adaptive weight); 0 turns the GAN off
    adversarial_loss_weight: float = 0.1
    multiscale_adversarial_loss_weight: float = 0.0
    gan_loss: Literal["hinge", "vanilla", "non_saturating"] = "hinge"
    feature_matching_weight: float = 0.0
    # the adversarial terms (generator and discriminator) start here; the generator's weight then ramps
    # up linearly over adversarial_warmup_steps
    disc_start: int = 0
    adversarial_warmup_steps: int = 0
    adaptive_weight: bool = True
    adaptive_weight_eps: float = 1e-4
    adaptive_weight_min: float = 0.0
    adaptive_weight_max: float = 1e4
    # R1 on real clips: center 0 (zero-centred, default) or 1; applied every N steps, scaled by N
    grad_penalty_loss_weight: float = 0.0
    grad_penalty_center: Literal[0, 1] = 0
    grad_penalty_every: int = 1
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99

    def __post_init__(self) -> None:
        for name in (
            "perceptual_weight",
            "vgg_perceptual_weight",
            "style_weight",
            "kl_weight",
            "quantizer_aux_loss_weight",
            "adversarial_loss_weight",
            "multiscale_adversarial_loss_weight",
            "feature_matching_weight",
            "grad_penalty_loss_weight",
            "lecam_weight",
            "adaptive_weight_min",
        ):
            value = getattr(self, name)
            _require(value >= 0, f"loss.{name} must be >= 0, got {value}")
        for name in ("perceptual_frames", "disc_start", "adversarial_warmup_steps"):
            value = getattr(self, name)
            _require(value >= 0, f"loss.{name} must be >= 0, got {value}")
        _require(
            self.adaptive_weight_eps > 0,
            f"loss.adaptive_weight_eps must be > 0, got {self.adaptive_weight_eps}",
        )
        _require(
            self.adaptive_weight_max >= max(self.adaptive_weight_min, 1e-12),
            f"loss.adaptive_weight_max must be > 0 and >= adaptive_weight_min, got {self.adaptive_weight_max}",
        )
        _require(
            self.grad_penalty_every >= 1,
            f"loss.grad_penalty_every must be >= 1 (1: every step), got {self.grad_penalty_every}",
        )
        _require(0 <= self.lecam_decay < 1, f"loss.lecam_decay must be in [0, 1), got {self.lecam_decay}")


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW settings and learning-rate schedule for one engine; grad_clip 0 disables clipping.

    The schedule counts the engine's own optimizer steps (the discriminator's start at loss.disc_start):
    a linear warm-up over `warmup_steps` to `lr`, then `constant`, or `cosine` down to lr x min_lr_ratio
    at the end of training (train.max_steps, less disc_start for the discriminator)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {list(self.betas)}",
        )
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Separate optimizers for the autoencoder (generator) and the discriminator."""

    generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    """What goes into both engines' DeepSpeed configs."""

    zero_stage: int = 2
    bf16: bool = True

    def __post_init__(self) -> None:
        _require(
            self.zero_stage in (0, 1, 2, 3),
            f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}",
        )


@dataclass(kw_only=True, slots=True)
class EMAConfig:
    """An fp32 exponential moving average of the autoencoder's weights, updated after every optimizer step
    and used for evaluation and export. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the
    first updates when `warmup` is set, so early averages do not hold on to the initial weights."""

    enabled: bool = False
    decay: float = 0.999
    warmup: bool = True

    def __post_init__(self) -> None:
        _require(0 < self.decay < 1, f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Held-out reconstruction quality (PSNR, SSIM, LPIPS; with the EMA weights when ema.enabled), every
    `every` steps; 0 evaluates only at start and end. The first `media_clips` clips of each evaluation
    set are logged to TensorBoard as animated input|reconstruction GIFs."""

    every: int = 0
    max_clips: int = 32
    batch_size: int = 4
    media_clips: int = 2
    lpips: bool = True

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _require(self.media_clips >= 0, f"eval.media_clips must be >= 0, got {self.media_clips}")
        _require(self.max_clips >= 1, f"eval.max_clips must be >= 1, got {self.max_clips}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything one run needs; written resolved into the run directory as config.json."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(
            not (self.train.compile and self.deepspeed.zero_stage == 3),
            "train.compile=true is supported with deepspeed.zero_stage 0, 1 or 2, not 3 (ZeRO-3 gathers "
            "each submodule's parameters in hooks around its forward; that is not compiled or tested "
            "here): set train.compile=false or deepspeed.zero_stage=2",
        )
        factors, weight = self.discriminator.multiscale_factors, self.loss.multiscale_adversarial_loss_weight
        _require(
            not factors or weight > 0,
            f"discriminator.multiscale_factors={factors} would run the 2D discriminators on pooled frames "
            "every step for nothing: their outputs are weighted by loss.multiscale_adversarial_loss_weight, "
            "which is 0; set it > 0 or remove the factors",
        )

    def check_world_size(self, world_size: int) -> None:
        """Batch arithmetic that needs the world size: micro-batch x accumulation x ranks = global batch."""
        micro, accum = self.data.batch_size, self.train.gradient_accumulation_steps
        implied = micro * accum * world_size
        global_batch = self.train.global_batch_size
        if global_batch is not None and global_batch != implied:
            raise ConfigError(
                f"train.global_batch_size={global_batch} but data.batch_size x "
                f"train.gradient_accumulation_steps x world size = {micro} x {accum} x {world_size} = "
                f"{implied}: set train.global_batch_size={implied}, or change data.batch_size or "
                f"train.gradient_accumulation_steps so that the product is {global_batch}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a JSON config, apply `a.b.c=value` overrides (values parsed as JSON, else strings), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return from_dict(RunConfig, raw)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def from_dict(cls: type, raw: Any, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and mistyped values."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            + (f" (and {', '.join(prefix + k for k in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; valid keys in {where}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        # A __post_init__ check: its message already names the key.
        raise ConfigError(str(err)) from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{key}={value!r} is not a valid choice; choose one of {', '.join(map(repr, args))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a JSON object, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # internal: a field type we cannot load


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. train.max_steps=20")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # bare strings: paths, names
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _side_for(side: int) -> int:
    """The nearest frame side the checks accept: a multiple of 8, at least MIN_SIDE."""
    return max(MIN_SIDE, round(side / 8) * 8)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_choice(key: str, value: str, choices: typing.Mapping[str, Any]) -> None:
    _require(value in choices, f"{key}={value!r} is unknown; choose one of {', '.join(sorted(choices))}")


def _nearest_4k1(frames: int) -> int:
    k = max(0, round((frames - 1) / 4))
    return 4 * k + 1
