"""The training loop: builds the parts from a RunConfig, then steps, logs, evaluates and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from data import DataPosition, SkippedSamples, build_dataloader, build_video_dataset, ensure_demo_shards
from data.degrade import degrade
from data.transforms import uint8_to_model_range
from losses.lpips import LPIPS, LPIPSWeightsUnavailable
from models import CausalVideoAutoencoder, build_autoencoder
from models.convert import load_diffusers_folder
from trainer.build import build_loss
from trainer.checkpoint import AUTOENCODER_CONFIG_NAME, Checkpointer, step_tag
from trainer.config import ConfigError, RunConfig, save_config
from trainer.distributed import (
    DistInfo,
    all_ranks_true,
    all_reduce_max,
    barrier,
    cpu_bf16_warning,
    init_distributed,
    peak_memory_bytes,
    require_shared_directory,
)
from trainer.ema import ModelEMA
from trainer.engines import (
    GeneratorModule,
    apply_configured_schedules,
    build_engines,
    compile_autoencoder,
    restore_fp32_weights,
)
from trainer.metrics import MetricAccumulator, MetricsLogger, TensorBoardLogger
from trainer.quality import QualityMetrics
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


def _parameter_count(module: torch.nn.Module) -> int:
    """Parameters of `module`, also once ZeRO-3 has partitioned them (their local tensors are then empty)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


class NonFiniteTrainingError(FloatingPointError):
    """Too many steps in a row were skipped for NaN/Inf losses or gradients (train.max_consecutive_skips)."""


class Trainer:
    """Owns the two engines, the data streams, the checkpointer and the metrics logger of one run."""

    def __init__(self, config: RunConfig, dist_info: DistInfo | None = None) -> None:
        self.config = config
        self.dist = dist_info or init_distributed()
        _setup_logging(self.dist.rank)
        config.check_world_size(self.dist.world_size)
        if config.deepspeed.bf16 and self.dist.device.type == "cpu":
            log.warning(cpu_bf16_warning())
        self.run_dir = Path(config.train.output_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.json")
        barrier()
        require_shared_directory(self.run_dir, self.dist)

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        autoencoder = self._build_autoencoder()
        if config.train.compile:
            compile_autoencoder(autoencoder)
            log.info("autoencoder forward compiled with torch.compile (the first steps compile it)")
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
            _parameter_count(autoencoder) / 1e6,
            ", ".join(discriminator.output_keys),
            _parameter_count(discriminator) / 1e6,
            self.dist.world_size,
            self.dist.device.type,
            config.deepspeed.zero_stage,
            "bf16" if config.deepspeed.bf16 else "fp32",
        )

        self.checkpointer = Checkpointer(
            self.run_dir, self.dist.rank, local_rank=self.dist.local_rank, keep=config.train.keep_checkpoints
        )
        self.ema = (
            ModelEMA(self.step_fn.autoencoder, config.ema.decay, warmup=config.ema.warmup)
            if config.ema.enabled
            else None
        )
        self.metrics: MetricsLogger = (
            TensorBoardLogger(self.run_dir) if self.dist.is_main else MetricsLogger()
        )
        self.accumulator = MetricAccumulator()
        self.global_step = 0  # completed optimizer steps
        self.skipped_steps = 0  # steps whose update a NaN/Inf loss or gradient norm skipped
        self.consecutive_skips = 0
        self._eval_lpips: torch.nn.Module | None = None  # built on first use when the loss has none
        self.stop_signal: int | None = None  # SIGTERM/SIGUSR1 received: save and stop after this step
        self._seed_rank_rngs()
        self.data_resume_state: dict[str, Any] | None = None
        self.image_resume_state: dict[str, Any] | None = None
        self._resume()

        self.train_shards, self.eval_sets = self._resolve_shards()
        self._install_signal_handlers()  # before the DataLoader workers fork (see there)
        self.train_batches = self._train_batches()
        # skipped-sample counts of the video and the image stream (their worker ids overlap)
        self.skipped = SkippedSamples()
        self.image_skipped = SkippedSamples()

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
        checkpoint = self.checkpointer.resolve(self.config.train.resume)
        if checkpoint is None:
            return
        state = self.checkpointer.load(checkpoint, self.g_engine, self.d_engine)
        # The checkpoint brought back the learning-rate schedules it was saved with: the config's again.
        for name, changes in apply_configured_schedules(self.g_engine, self.d_engine, self.config).items():
            if changes:
                log.info("optim.%s differs from the checkpoint's: %s", name, ", ".join(changes))
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
            if "device_rng" in state and self.dist.device.type != "cpu":
                get_accelerator().set_rng_state(state["device_rng"], self.dist.local_rank)
            random.setstate(state["python_rng"])
            np.random.set_state(state["numpy_rng"])
        else:  # a rank the checkpoint has no state for (more ranks now): streams of its own
            self._reseed_rank_rngs(self.global_step)
        self.data_resume_state = state.get("data")
        self.image_resume_state = state.get("image_data")
        if "lecam" in state:
            self.loss.lecam.load_state_dict(state["lecam"])
        if self.ema is not None:
            ema_state = self.checkpointer.load_ema(checkpoint)
            if ema_state is None:
                log.warning("%s has no EMA weights: the EMA starts from the resumed weights", checkpoint)
                self.ema = ModelEMA(
                    self.step_fn.autoencoder, self.config.ema.decay, warmup=self.config.ema.warmup
                )
            else:
                self.ema.load_state_dict(ema_state)
        log.info("resumed from %s: continuing at step %d", checkpoint, self.global_step + 1)

    def _reseed_rank_rngs(self, step: int) -> None:
        """Random streams for this rank at `step`, a function of (train.seed, rank, step) only: different on
        every rank, and the same when the same resume is run again."""
        seed = Random(f"rng/{self.config.train.seed}/{self.dist.rank}/{step}").getrandbits(63)
        torch.manual_seed(seed)  # every device's generator too
        random.seed(seed)
        np.random.seed(seed % 2**32)

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
            mode=data.mode,
            buckets=data.buckets,
        )
        # the saved position when the dataset resumes from it, else (it says so) a fresh one
        self.data_position = DataPosition.start(
            data.num_workers, self.dist.world_size, self.global_step, self.data_resume_state, mode=data.mode
        )
        self.image_batches = self._image_batches() if data.image_ratio > 0 else None
        # Starting a DataLoader draws its base seed from the global torch RNG; the clips do not depend on
        # it (the pipeline seeds itself), so it must not shift the stream a resumed run restored.
        with torch.random.fork_rng(devices=[]):
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
            mode=data.mode,
        )
        self.image_position = DataPosition.start(
            data.num_workers, self.dist.world_size, self.global_step, self.image_resume_state, mode=data.mode
        )
        batch_size = data.image_batch_size or data.batch_size
        with torch.random.fork_rng(devices=[]):  # see _train_batches
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

    def train(self) -> str:
        """Train until train.max_steps, then save and evaluate once more. Returns why it stopped: "done",
        or "signal" when SIGTERM/SIGUSR1 asked it to (after saving a checkpoint). Raises
        NonFiniteTrainingError after train.max_consecutive_skips skipped steps in a row (after saving)."""
        cfg = self.config.train
        if self.global_step == 0 and self.eval_sets:
            self.evaluate()
        progress = None
        if self.dist.is_main and cfg.progress_bar:
            from tqdm import tqdm

            # tqdm's bar shows the rate and the ETA from it
            progress = tqdm(total=cfg.max_steps, initial=self.global_step, desc="train", dynamic_ncols=True)
        last_saved = self.global_step
        try:
            while self.global_step < cfg.max_steps:
                self.train_step()
                self.global_step += 1
                if progress is not None:
                    progress.update(1)
                if self.global_step % cfg.log_every == 0 or self.global_step == cfg.max_steps:
                    self._log_metrics(progress)
                if self._stop_requested():
                    name = signal.Signals(self.stop_signal or signal.SIGTERM).name
                    log.warning(
                        "%s received: saving a checkpoint at step %d and stopping", name, self.global_step
                    )
                    if last_saved != self.global_step:
                        self.save_checkpoint()
                    return "signal"
                if cfg.max_consecutive_skips and self.consecutive_skips >= cfg.max_consecutive_skips:
                    self._stop_non_finite(last_saved)
                if (
                    self.config.eval.every
                    and self.global_step % self.config.eval.every == 0
                    and self.eval_sets
                ):
                    self.evaluate()
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.global_step
        finally:
            if progress is not None:
                progress.close()
        if last_saved != self.global_step:
            self.save_checkpoint()
        if self.eval_sets and not (self.config.eval.every and self.global_step % self.config.eval.every == 0):
            self.evaluate()
        return "done"

    def _stop_non_finite(self, last_saved: int) -> None:
        # The skipped steps did not change the weights: this checkpoint holds the last good ones, with the
        # data position past the batches that went wrong.
        if last_saved != self.global_step:
            self.save_checkpoint()
        raise NonFiniteTrainingError(
            f"{self.consecutive_skips} steps in a row (up to step {self.global_step}) had a NaN/Inf loss or "
            f"gradient norm and were skipped ({self.skipped_steps} in all); stopping. The checkpoint "
            f"{step_tag(self.global_step)} holds the last good weights. Lower the learning rates, check the "
            f"data, or raise train.max_consecutive_skips"
        )

    # --------------------------------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> None:
        """SIGTERM and SIGUSR1 (preemption, SLURM's --signal) ask for a checkpoint and a clean stop after
        the current step. A signal sent to the whole process group also reaches the DataLoader workers:
        they ignore SIGTERM (data.pipeline's worker_init_fn; torch's own worker handler would die of it)
        and inherit this handler for SIGUSR1, installed before they fork."""
        self._previous_handlers: dict[int, Any] = {}

        def on_signal(signum: int, frame) -> None:
            self.stop_signal = signum

        try:
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                self._previous_handlers[signum] = signal.signal(signum, on_signal)
        except ValueError:  # not the main thread (e.g. an embedding program): leave signals alone
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not save a checkpoint")

    def _restore_signal_handlers(self) -> None:
        for signum, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (one small all-reduce, so every rank stops together)."""
        return not all_ranks_true(self.stop_signal is None, self.dist.device)

    # ------------------------------------------------------------------------------------------ step

    def train_step(self) -> None:
        """One optimizer step of each engine (over gradient_accumulation_steps micro-batches).

        A step whose update either engine skipped (a NaN/Inf loss or gradient norm on any rank: see
        trainer/step.py) is counted, its losses stay out of the logged averages, and the EMA is not
        updated; the decision is the same on every rank."""
        start = time.perf_counter()
        data_wait = 0.0
        clips = 0
        image_batches = 0
        adversarial = self.loss.adversarial_active(self.global_step)
        step_metrics: list[dict[str, Any]] = []
        # the learning rates this step trains with (each engine's step moves its schedule on to the next)
        lr = {"lr/generator": self.g_engine.get_lr()[0], "lr/discriminator": self.d_engine.get_lr()[0]}
        for micro_step in range(self.config.train.gradient_accumulation_steps):
            fetch = time.perf_counter()
            batch, is_image = self._next_batch(micro_step)
            image_batches += is_image
            data_wait += time.perf_counter() - fetch
            (self.image_skipped if is_image else self.skipped).update(batch)
            # uint8 (B, C, T, H, W) -> float32 in [-1, 1], on the device
            video = uint8_to_model_range(batch["video"].to(self.dist.device, non_blocking=True))
            clips += video.shape[0]
            if self.degradation is not None:  # restoration: degraded input, clean target
                metrics, recon = self.step_fn.generator_step(
                    degrade(video, self.degradation), self.global_step, target=video
                )
            else:
                metrics, recon = self.step_fn.generator_step(video, self.global_step)
            if adversarial:
                metrics.update(self.step_fn.discriminator_step(video, recon, self.global_step))
            step_metrics.append({_METRIC_NAMES.get(k, k): v for k, v in metrics.items()})
        applied = bool(self.step_fn.generator_applied) and (
            not adversarial or bool(self.step_fn.discriminator_applied)
        )
        applied = all_ranks_true(applied, self.dist.device)
        if applied:
            self.consecutive_skips = 0
            for metrics in step_metrics:
                self.accumulator.add(metrics)
            if self.ema is not None:
                self.ema.update(self.step_fn.autoencoder)
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning(
                "step %d skipped: NaN/Inf loss or gradient norm (%d in a row, %d in all)",
                self.global_step + 1,
                self.consecutive_skips,
                self.skipped_steps,
            )
        elapsed = time.perf_counter() - start
        # Scalars are averaged over ranks when logged, so per-rank values x world size log as totals.
        perf = {
            "perf/clips_per_sec": clips * self.dist.world_size / elapsed,
            "perf/step_time_s": elapsed,
            "perf/data_wait_fraction": data_wait / elapsed,
            "data/image_batch_fraction": image_batches / self.config.train.gradient_accumulation_steps,
            "lr/generator": lr["lr/generator"],
        }
        for name, engine in (("generator", self.g_engine), ("discriminator", self.d_engine)):
            norm = engine.get_global_grad_norm()
            if norm is not None and applied and self._engine_stepped(name):
                perf[f"grad_norm/{name}"] = float(norm)
        if adversarial:
            perf["lr/discriminator"] = lr["lr/discriminator"]
        self.accumulator.add(perf)

    def _engine_stepped(self, name: str) -> bool:
        return name == "generator" or self.loss.adversarial_active(self.global_step)

    def _log_metrics(self, progress) -> None:
        scalars = self.accumulator.reduce(self.dist.device)
        scalars.update(self._skipped_sample_scalars())
        scalars["train/skipped_steps"] = float(self.skipped_steps)  # the same on every rank
        scalars["perf/peak_memory_gib"] = (
            all_reduce_max(peak_memory_bytes(self.dist.device), self.dist.device) / 2**30
        )
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

    def _skipped_sample_scalars(self) -> dict[str, float]:
        """Samples skipped so far (bad input), summed over ranks and both streams: the total and one
        scalar per reason (every reason on every rank, so the reduction lines up)."""
        video, image = self.skipped.by_reason(), self.image_skipped.by_reason()
        reasons = sorted(video)
        counts = torch.tensor(
            [float(video[r] + image.get(r, 0)) for r in reasons], dtype=torch.float64, device=self.dist.device
        )
        if torch.distributed.is_initialized() and self.dist.world_size > 1:
            torch.distributed.all_reduce(counts)
        scalars = {
            f"data/skipped/{reason}": value for reason, value in zip(reasons, counts.tolist(), strict=True)
        }
        scalars["data/skipped_samples"] = float(counts.sum().item())
        return scalars

    # ----------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    @torch.random.fork_rng(devices=[])  # training's random streams are the same with or without evaluation
    def evaluate(self) -> dict[str, float]:
        """PSNR, SSIM, L1 and LPIPS of posterior-mean reconstructions of every evaluation set (with the
        EMA weights when ema.enabled), averaged over ranks; reconstructions of the first clips to
        TensorBoard as input|reconstruction GIFs."""
        model, uses_engine = self._evaluation_model()
        was_training = model.training
        model.eval()
        quality = QualityMetrics(self._evaluation_lpips())
        results: dict[str, float] = {}
        for prefix, shards in self.eval_sets.items():
            results.update(self._evaluate_set(model, quality, prefix, shards, uses_engine))
        model.train(was_training)
        self.metrics.log(self.global_step, results)
        return results

    def _evaluation_model(self) -> tuple[torch.nn.Module, bool]:
        """(the autoencoder to evaluate, whether it is the engine's): with EMA, a plain copy holding the
        averaged weights (not partitioned, so every rank runs it on its own)."""
        if self.ema is None:
            return self.step_fn.autoencoder, True
        model = CausalVideoAutoencoder(self.step_fn.autoencoder.config)
        model.load_state_dict(self.ema.weights())
        return model.to(self.dist.device, self.step_fn.g_dtype), False

    def _evaluation_lpips(self) -> torch.nn.Module | None:
        """The loss's LPIPS network, or one built from loss.lpips for evaluation; None when eval.lpips is
        off or its weights cannot be found (said once)."""
        if not self.config.eval.lpips:
            return None
        if self.loss.lpips is not None:
            return self.loss.lpips
        if self._eval_lpips is None:
            settings = self.config.loss.lpips
            try:
                self._eval_lpips = LPIPS(
                    pretrained=settings.pretrained,
                    weights_path=settings.weights_path,
                    backbone_weights_path=settings.backbone_weights_path,
                    download=settings.download,
                ).to(self.dist.device)
            except LPIPSWeightsUnavailable as err:
                log.warning("evaluation without LPIPS: %s", err)
                self.config.eval.lpips = False
                return None
        return self._eval_lpips

    def _evaluate_set(
        self,
        model: torch.nn.Module,
        quality: QualityMetrics,
        prefix: str,
        shards: str | list[str],
        uses_engine: bool,
    ) -> dict[str, float]:
        cfg, data = self.config.eval, self.config.data
        # Every rank reads the same eval stream and takes every world_size-th batch, so the ranks stay
        # in step (with the engine's model under ZeRO-3 a forward on some ranks only would hang).
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
        totals = quality.accumulator(self.dist.device)
        media_inputs, media_recons = [], []
        read, last = 0, None  # batches read (by every rank), the last of them
        for index, batch in enumerate(loader):
            if index >= max_batches:
                break
            read, last = index + 1, batch
            if index % self.dist.world_size != self.dist.rank:
                continue
            video = batch["video"].to(self.dist.device).float()
            inputs = video
            if self.degradation is not None:  # the same degradation for every evaluation
                noise = torch.Generator(device=video.device).manual_seed(index)
                inputs = degrade(video, self.degradation, noise)
            recon = model(inputs.to(self.step_fn.g_dtype), sample_posterior=False).recon.float().clamp(-1, 1)
            totals.add(quality(recon, video))
            wanted = cfg.media_clips - sum(len(v) for v in media_inputs)
            if self.dist.is_main and wanted > 0:
                media_inputs.append(video[:wanted].cpu())
                media_recons.append(recon[:wanted].cpu())
        # A set whose batches do not split evenly leaves the ranks after the first `read % world_size`
        # one forward short. The engine's forward under ZeRO-3 gathers parameters with collectives (a rank
        # that skips it hangs the others), so those ranks run one on a batch they read, and count nothing.
        short = read % self.dist.world_size and self.dist.rank >= read % self.dist.world_size
        if short and uses_engine and self.config.deepspeed.zero_stage == 3:
            model(last["video"].to(self.dist.device).to(self.step_fn.g_dtype), sample_posterior=False)
        reduced = totals.reduce()
        clips = reduced.pop("clips")
        if clips == 0:
            log.warning("evaluation found no clips in %s", shards)
            return {}
        if media_inputs:
            self.metrics.log_media(
                self.global_step, f"{prefix}/reconstruction", torch.cat(media_inputs), torch.cat(media_recons)
            )
        log.info(
            "%s at step %d%s: %s over %d clips",
            prefix,
            self.global_step,
            "" if uses_engine else " (EMA weights)",
            ", ".join(f"{name} {value:.4f}" for name, value in reduced.items()),
            clips,
        )
        return {f"{prefix}/{name}": value for name, value in reduced.items()}

    # ---------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        state = {
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "torch_rng": torch.get_rng_state(),
            # the accelerator's generator (posterior samples on a GPU are drawn from it)
            **(
                {"device_rng": get_accelerator().get_rng_state(self.dist.local_rank)}
                if self.dist.device.type != "cpu"
                else {}
            ),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            # regulariser state of the loss (LeCam EMAs, identical on every rank)
            "lecam": self.loss.lecam.state_dict(),
            # where this rank's data stream is, so a resumed run sees the clips an uninterrupted one would
            "data": self.data_position.state(),
            **({"image_data": self.image_position.state()} if self.image_batches is not None else {}),
        }
        ema_state = self.ema.state_dict() if self.ema is not None else None
        return self.checkpointer.save(self.global_step, self.g_engine, self.d_engine, state, ema_state)

    def close(self) -> None:
        self._restore_signal_handlers()
        self.step_fn.last_layer.remove()
        self.metrics.close()
