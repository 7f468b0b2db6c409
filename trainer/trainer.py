"""The training loop: builds the parts from a RunConfig, then steps, logs, evaluates and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import numpy as np
import torch

from data import DataPosition, SkippedSamples, build_dataloader, build_video_dataset, ensure_demo_shards
from data.degrade import degrade
from data.transforms import uint8_to_model_range
from models import CausalVideoAutoencoder, build_autoencoder
from models.convert import load_diffusers_folder
from trainer.build import build_loss
from trainer.checkpoint import AUTOENCODER_CONFIG_NAME, Checkpointer
from trainer.config import ConfigError, RunConfig, save_config
from trainer.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from trainer.engines import GeneratorModule, build_engines, restore_fp32_weights
from trainer.metrics import MetricAccumulator, MetricsLogger, TensorBoardLogger
from trainer.step import AdversarialStep

log = logging.getLogger("trainer")

# Names under which the step's metrics reach TensorBoard (others, like quantizer/*, keep their own).
_METRIC_NAMES = {
    "rec": "loss/rec",
    "perceptual": "loss/perceptual",
    "kl": "loss/kl",
    "logvar": "loss/logvar",
    "vgg_perceptual": "loss/vgg_perceptual",
    "style": "loss/style",
    "feature_matching": "loss/feature_matching",
    "discriminator_gan": "loss/discriminator_gan",
    "gradient_penalty": "loss/gradient_penalty",
    "lecam": "loss/lecam",
    "quantizer_aux": "loss/quantizer_aux",
    "nll": "loss/nll",
    "generator_adversarial": "loss/generator_adversarial",
    "total": "loss/generator_total",
    "discriminator": "loss/discriminator",
    "adaptive_weight": "adaptive_weight",
    "logits_real": "logits/real",
    "logits_fake": "logits/fake",
}


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class Trainer:
    """Owns the two engines, the data streams, the checkpointer and the metrics logger of one run."""

    def __init__(self, config: RunConfig, dist_info: DistInfo | None = None) -> None:
        self.config = config
        self.dist = dist_info or init_distributed()
        _setup_logging(self.dist.rank)
        config.check_world_size(self.dist.world_size)
        if config.deepspeed.bf16 and self.dist.device.type == "cpu":
            log.warning(
                "deepspeed.bf16=true on a CPU device: torch 2.13's oneDNN bf16 conv3d backward returns garbage "
                "weight gradients for small inputs (e.g. 2x4x4 feature maps) in some runs, which DeepSpeed "
                "then skips as overflow or, if finite, trains on. Use deepspeed.bf16=false on CPU."
            )
        self.run_dir = Path(config.train.output_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.json")
        barrier()

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        autoencoder = self._build_autoencoder()
        discriminator = config.discriminator.build()
        self.loss = build_loss(config.loss, discriminator.output_weights(1.0)).to(self.dist.device)
        # A learned log-variance trains with the autoencoder, in its engine (DESIGN.md decision 1).
        generator = (
            autoencoder if self.loss.logvar is None else GeneratorModule(autoencoder, self.loss.logvar)
        )
        initial_weights = None
        if config.model.init_from and config.deepspeed.bf16:
            initial_weights = {k: v.detach().clone() for k, v in generator.named_parameters()}
        self.g_engine, self.d_engine = build_engines(generator, discriminator, config, self.dist.device)
        if initial_weights is not None:
            restore_fp32_weights(self.g_engine, initial_weights)
            del initial_weights
        self.step_fn = AdversarialStep(self.g_engine, self.d_engine, self.loss)
        restoration = config.data.restoration
        self.degradation = restoration.degradation() if restoration.enabled else None
        log.info(
            "autoencoder %s: %.2fM parameters; discriminators %s: %.2fM; %d rank(s) on %s, ZeRO-%d, %s",
            config.model.init_from or config.model.preset,
            sum(p.numel() for p in autoencoder.parameters()) / 1e6,
            ", ".join(discriminator.output_keys),
            sum(p.numel() for p in discriminator.parameters()) / 1e6,
            self.dist.world_size,
            self.dist.device.type,
            config.deepspeed.zero_stage,
            "bf16" if config.deepspeed.bf16 else "fp32",
        )

        self.checkpointer = Checkpointer(self.run_dir, self.dist.rank)
        self.metrics: MetricsLogger = (
            TensorBoardLogger(self.run_dir) if self.dist.is_main else MetricsLogger()
        )
        self.accumulator = MetricAccumulator()
        self.global_step = 0  # completed optimizer steps
        self._seed_rank_rngs()
        self.data_resume_state: dict[str, Any] | None = None
        self.image_resume_state: dict[str, Any] | None = None
        self._resume()

        self.train_shards, self.eval_sets = self._resolve_shards()
        self.train_batches = self._train_batches()
        self.skipped = SkippedSamples()

    # ----------------------------------------------------------------------------------------- set-up

    def _build_autoencoder(self) -> CausalVideoAutoencoder:
        """From model.init_from (a diffusers folder) or a preset; its architecture is saved in the run dir."""
        model_cfg = self.config.model
        if model_cfg.init_from:
            try:
                autoencoder = load_diffusers_folder(model_cfg.init_from, **model_cfg.autoencoder_overrides())
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"model.init_from={model_cfg.init_from!r}: {err}") from err
            log.info("autoencoder weights and architecture from %s", model_cfg.init_from)
        else:
            autoencoder = build_autoencoder(model_cfg.preset, **model_cfg.autoencoder_overrides())
        if self.dist.is_main:
            # What export and the tools need to rebuild the autoencoder without the run config's preset.
            architecture = dataclasses.asdict(autoencoder.config)
            (self.run_dir / AUTOENCODER_CONFIG_NAME).write_text(json.dumps(architecture, indent=2) + "\n")
        return autoencoder

    def _seed_rank_rngs(self) -> None:
        """Per-rank streams for posterior noise, LPIPS frame picks and the like."""
        seed = self.config.train.seed * 1000 + self.dist.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _resume(self) -> None:
        found = self.checkpointer.resolve(self.config.train.resume)
        if found is None:
            return
        root, tag = found
        state = self.checkpointer.load(root, tag, self.g_engine, self.d_engine)
        self.global_step = int(state["global_step"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        self.data_resume_state = state.get("data")
        self.image_resume_state = state.get("image_data")
        if "lecam" in state:
            self.loss.lecam.load_state_dict(state["lecam"])
        log.info("resumed from %s/%s: continuing at step %d", root, tag, self.global_step + 1)

    def _resolve_shards(self) -> tuple[str | list[str], dict[str, str | list[str]]]:
        """Training shards, and the evaluation sets by metric prefix."""
        data = self.config.data
        if not data.demo.enabled:
            return data.shards, ({"eval": data.eval_shards} if data.eval_shards else {})

        def demo_shards():
            return ensure_demo_shards(
                data.demo.dir,
                train_shards=data.demo.train_shards,
                eval_shards=data.demo.eval_shards,
                clips_per_shard=data.demo.clips_per_shard,
            )

        if self.dist.local_rank == 0:  # one writer per node, the others wait; files are written atomically
            demo_shards()
        barrier()
        demo = demo_shards()  # present now: only reads the marker
        # eval: held-out clips of the training photographs; eval_unseen: photographs never trained on.
        return demo.train_pattern, {"eval": demo.eval_pattern, "eval_unseen": demo.unseen_pattern}

    def _train_batches(self) -> Iterator[dict[str, Any]]:
        data = self.config.data
        dataset = build_video_dataset(
            self.train_shards,
            num_frames=data.num_frames,
            resolution=data.resolution,
            frame_stride=data.frame_stride,
            target_fps=data.target_fps,
            storage_options=data.storage_options,
            train=True,
            seed=self.config.train.seed,
            shuffle_buffer=data.shuffle_buffer,
            # Resumed: the stream continues after the last batch the stopped run consumed (same ranks and
            # workers), else a new pass rather than a replay of the first clips.
            epoch_offset=self.global_step,
            resume_state=self.data_resume_state,
            uint8=True,  # converted on the device (train_step): workers ship a quarter of the bytes
        )
        # the saved position when the dataset resumes from it, else (it says so) a fresh one
        self.data_position = DataPosition.start(
            data.num_workers, self.dist.world_size, self.global_step, self.data_resume_state
        )
        self.image_batches = self._image_batches() if data.image_ratio > 0 else None
        return iter(build_dataloader(dataset, batch_size=data.batch_size, num_workers=data.num_workers))

    def _image_batches(self) -> Iterator[dict[str, Any]]:
        """Joint image-video training: 1-frame clips from data.image_shards, with their own position."""
        data = self.config.data
        dataset = build_video_dataset(
            data.image_shards,
            num_frames=1,
            resolution=data.resolution,
            storage_options=data.storage_options,
            train=True,
            seed=self.config.train.seed + 1,
            shuffle_buffer=data.shuffle_buffer,
            epoch_offset=self.global_step,
            resume_state=self.image_resume_state,
            uint8=True,
        )
        self.image_position = DataPosition.start(
            data.num_workers, self.dist.world_size, self.global_step, self.image_resume_state
        )
        batch_size = data.image_batch_size or data.batch_size
        return iter(build_dataloader(dataset, batch_size=batch_size, num_workers=data.num_workers))

    def _next_batch(self, micro_step: int) -> tuple[dict[str, Any], bool]:
        """The next micro-batch: from the image stream with probability data.image_ratio (the same draw on
        every rank, so all ranks run the same kind of step), else from the video stream."""
        ratio = self.config.data.image_ratio
        if (
            ratio > 0
            and Random(f"image/{self.config.train.seed}/{self.global_step}/{micro_step}").random() < ratio
        ):
            batch = next(self.image_batches)
            self.image_position.update(batch)
            return batch, True
        batch = next(self.train_batches)
        self.data_position.update(batch)
        return batch, False

    # ------------------------------------------------------------------------------------------ loop

    def train(self) -> None:
        """Train until train.max_steps, then save and evaluate once more."""
        cfg = self.config.train
        if self.global_step == 0 and self.eval_sets:
            self.evaluate()
        progress = None
        if self.dist.is_main and cfg.progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=cfg.max_steps, initial=self.global_step, desc="train", dynamic_ncols=True)
        last_saved = self.global_step
        while self.global_step < cfg.max_steps:
            self.train_step()
            self.global_step += 1
            if progress is not None:
                progress.update(1)
            if self.global_step % cfg.log_every == 0 or self.global_step == cfg.max_steps:
                self._log_metrics(progress)
            if self.config.eval.every and self.global_step % self.config.eval.every == 0 and self.eval_sets:
                self.evaluate()
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.global_step
        if progress is not None:
            progress.close()
        if last_saved != self.global_step:
            self.save_checkpoint()
        if self.eval_sets and not (self.config.eval.every and self.global_step % self.config.eval.every == 0):
            self.evaluate()

    def train_step(self) -> None:
        """One optimizer step of each engine (over gradient_accumulation_steps micro-batches)."""
        start = time.perf_counter()
        data_wait = 0.0
        clips = 0
        image_batches = 0
        for micro_step in range(self.config.train.gradient_accumulation_steps):
            fetch = time.perf_counter()
            batch, is_image = self._next_batch(micro_step)
            image_batches += is_image
            data_wait += time.perf_counter() - fetch
            self.skipped.update(batch)
            # uint8 (B, C, T, H, W) -> float32 in [-1, 1], on the device
            video = uint8_to_model_range(batch["video"].to(self.dist.device, non_blocking=True))
            clips += video.shape[0]
            if self.degradation is not None:  # restoration: degraded input, clean target
                metrics, recon = self.step_fn.generator_step(
                    degrade(video, self.degradation), self.global_step, target=video
                )
            else:
                metrics, recon = self.step_fn.generator_step(video, self.global_step)
            if self.loss.adversarial_active(self.global_step):
                metrics.update(self.step_fn.discriminator_step(video, recon, self.global_step))
            self.accumulator.add({_METRIC_NAMES.get(k, k): v for k, v in metrics.items()})
        elapsed = time.perf_counter() - start
        # Scalars are averaged over ranks when logged, so per-rank values x world size log as totals.
        perf = {
            "perf/clips_per_sec": clips * self.dist.world_size / elapsed,
            "perf/step_time_s": elapsed,
            "perf/data_wait_fraction": data_wait / elapsed,
            "data/image_batch_fraction": image_batches / self.config.train.gradient_accumulation_steps,
            "lr/generator": self.g_engine.get_lr()[0],
        }
        for name, engine in (("generator", self.g_engine), ("discriminator", self.d_engine)):
            norm = engine.get_global_grad_norm()
            if norm is not None and self._engine_stepped(name):
                perf[f"grad_norm/{name}"] = float(norm)
        if self.loss.adversarial_active(self.global_step):
            perf["lr/discriminator"] = self.d_engine.get_lr()[0]
        self.accumulator.add(perf)

    def _engine_stepped(self, name: str) -> bool:
        return name == "generator" or self.loss.adversarial_active(self.global_step)

    def _log_metrics(self, progress) -> None:
        scalars = self.accumulator.reduce(self.dist.device)
        scalars["data/skipped_samples"] = all_reduce_sum(float(self.skipped.total), self.dist.device)
        self.metrics.log(self.global_step, scalars)
        if self.dist.is_main:
            shown = {"rec": "loss/rec", "lpips": "loss/perceptual", "d": "loss/discriminator"}
            parts = [f"step {self.global_step}/{self.config.train.max_steps}"]
            parts += [
                f"{label} {scalars[key]:.4f}" if key in scalars else f"{label} -"
                for label, key in shown.items()
            ]
            if "loss/discriminator" in scalars:
                parts.append(f"w {scalars['adaptive_weight']:.3g}")
            parts.append(f"{scalars.get('perf/clips_per_sec', 0.0):.2f} clips/s")
            summary = " ".join(parts)
            if progress is not None:
                progress.write(summary)
            else:
                log.info(summary)

    # ----------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """PSNR and L1 of posterior-mean reconstructions of every evaluation set, averaged over ranks."""
        model = self.g_engine.module
        was_training = model.training
        model.eval()
        results: dict[str, float] = {}
        for prefix, shards in self.eval_sets.items():
            results.update(self._evaluate_set(model, prefix, shards))
        model.train(was_training)
        self.metrics.log(self.global_step, results)
        return results

    def _evaluate_set(self, model: torch.nn.Module, prefix: str, shards: str | list[str]) -> dict[str, float]:
        cfg, data = self.config.eval, self.config.data
        # Every rank reads the same eval stream and takes every world_size-th batch, so the ranks stay
        # in step (a forward on some ranks only would hang under ZeRO-3).
        dataset = build_video_dataset(
            shards,
            num_frames=data.num_frames,
            resolution=data.resolution,
            frame_stride=data.frame_stride,
            target_fps=data.target_fps,
            storage_options=data.storage_options,
            train=False,
            rank=0,
            world_size=1,
        )
        loader = build_dataloader(dataset, batch_size=cfg.batch_size, num_workers=0, drop_last=False)
        max_batches = math.ceil(cfg.max_clips / cfg.batch_size)
        max_batches = max(self.dist.world_size, max_batches - max_batches % self.dist.world_size)
        totals = torch.zeros(3, dtype=torch.float64, device=self.dist.device)  # psnr sum, l1 sum, clips
        for index, batch in enumerate(loader):
            if index >= max_batches:
                break
            if index % self.dist.world_size != self.dist.rank:
                continue
            video = batch["video"].to(self.dist.device).float()
            inputs = video
            if self.degradation is not None:  # the same degradation for every evaluation
                noise = torch.Generator(device=video.device).manual_seed(index)
                inputs = degrade(video, self.degradation, noise)
            recon = model(inputs.to(self.step_fn.g_dtype), sample_posterior=False).recon.float().clamp(-1, 1)
            mse = (recon - video).pow(2).flatten(1).mean(dim=1)
            # Peak-to-peak range of [-1, 1] is 2, so PSNR = 10 log10(2^2 / MSE).
            totals[0] += (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).sum().double()
            totals[1] += (recon - video).abs().flatten(1).mean(dim=1).sum().double()
            totals[2] += video.shape[0]
        if torch.distributed.is_initialized() and self.dist.world_size > 1:
            torch.distributed.all_reduce(totals)
        if totals[2] == 0:
            log.warning("evaluation found no clips in %s", shards)
            return {}
        psnr, l1 = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        log.info(
            "%s at step %d: PSNR %.2f dB, L1 %.4f over %d clips",
            prefix,
            self.global_step,
            psnr,
            l1,
            int(totals[2]),
        )
        return {f"{prefix}/psnr": psnr, f"{prefix}/l1": l1}

    # ---------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.global_step,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            # regulariser state of the loss (LeCam EMAs, identical on every rank)
            "lecam": self.loss.lecam.state_dict(),
            # where this rank's data stream is, so a resumed run sees the clips an uninterrupted one would
            "data": self.data_position.state(),
            **({"image_data": self.image_position.state()} if self.image_batches is not None else {}),
        }
        return self.checkpointer.save(self.global_step, self.g_engine, self.d_engine, state)

    def close(self) -> None:
        self.step_fn.last_layer.remove()
        self.metrics.close()
