"""The autoencoder's latent regulariser: KL (default), FSQ or LFQ, from the model config to a training run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import AutoencoderConfig, build_autoencoder
from models.convert import save_diffusers_folder
from models.quantizers import FSQ, LFQ
from trainer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def video(seed: int = 0, frames: int = 9, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, frames, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize(
    ("regularizer", "quantizer", "latent_channels", "kind"),
    [("fsq", {"levels": [8, 5, 5, 5]}, 4, FSQ), ("lfq", {}, 16, LFQ)],
)
def test_quantized_autoencoder_encodes_to_codes_and_trains_through_them(
    regularizer, quantizer, latent_channels, kind
):
    torch.manual_seed(0)
    model = build_autoencoder(
        "tiny", regularizer=regularizer, quantizer=quantizer, latent_channels=latent_channels
    )
    assert isinstance(model.quantizer, kind) and model.quantizer.dim == latent_channels
    # The encoder outputs the latent itself (not mean and log-variance); nothing else in the state dict
    # changes: the quantizers have no parameters.
    kl_model = build_autoencoder("tiny", latent_channels=latent_channels)
    assert model.encoder.conv_out.conv.out_channels == latent_channels
    assert kl_model.encoder.conv_out.conv.out_channels == 2 * latent_channels
    assert set(model.state_dict()) == set(kl_model.state_dict())

    x = video()
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.logvar is None
    assert out.mean.shape == (2, latent_channels, 3, 4, 4)  # the latent before quantization
    latent = model.encode(x)
    codes = model.quantizer.indices_to_codes(latent.indices)
    assert torch.equal(latent.mode(), codes)  # the decoder sees exactly the codes of the indices
    assert torch.equal(out.recon, model.decode(codes))
    assert {"codebook_usage", "perplexity"} <= set(out.metrics)

    # Straight-through: the reconstruction loss reaches the encoder through the rounding.
    (out.recon.square().mean() + out.aux_loss).backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.conv.weight.grad.abs().sum() > 0


def test_lfq_auxiliary_loss_is_the_quantizers_on_the_encoder_latent():
    torch.manual_seed(0)
    model = build_autoencoder("tiny", regularizer="lfq", quantizer={"entropy_loss_weight": 0.2})
    x = video(1)
    out = model(x)
    expected = model.quantizer(model.encoder(x))
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.requires_grad
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=1e-6, atol=1e-7)
    assert out.aux_loss.item() != 0.0
    # KL models return an aux loss of zero and no quantizer metrics
    kl_out = build_autoencoder("tiny")(x)
    assert kl_out.aux_loss.item() == 0.0 and kl_out.metrics == {} and kl_out.logvar is not None


def test_tiled_reconstruction_of_a_quantized_model_matches_whole_clip():
    torch.manual_seed(0)
    model = build_autoencoder(
        "tiny", regularizer="fsq", quantizer={"levels": [7, 5, 5, 5, 5]}, latent_channels=5
    )
    model.eval()
    x = video(2, frames=5, size=32)
    whole = model.reconstruct(x)
    # one tile covering the frame is the whole-clip path, numerically identical
    assert torch.equal(model.reconstruct(x, tiled=True, tile_size=32, tile_overlap=0), whole)
    tiled = model.reconstruct(x, tiled=True, tile_size=16, tile_overlap=8)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regularizer": "vq"}, "regularizer must be one of"),
        ({"quantizer": {"levels": [8, 5]}}, "given with regularizer='kl'"),
        ({"regularizer": "fsq"}, "needs quantizer.levels, a list of 16 levels"),
        ({"regularizer": "fsq", "quantizer": {"levels": [8, 5, 5]}}, "one entry per latent channel"),
        ({"regularizer": "lfq", "quantizer": {"dim": 18}}, "LFQ dim=18 must equal latent_channels=16"),
        ({"regularizer": "lfq", "quantizer": {"temperature": 1.0}}, "unknown arguments ['temperature']"),
    ],
)
def test_bad_regularizer_settings_say_how_to_fix_them(fields, message):
    with pytest.raises(ValueError) as err:
        AutoencoderConfig(**fields)
    assert message in str(err.value)


def test_fsq_without_levels_takes_the_recommended_set_for_its_width():
    config = AutoencoderConfig(regularizer="fsq", latent_channels=6)
    assert config.build_quantizer().levels == (8, 8, 8, 5, 5, 5)


def test_model_config_section_builds_quantized_models_and_checks_them_at_load(tmp_path):
    config = load_config(
        REPO / "configs/tiny.json",
        ["model.regularizer=fsq", "model.quantizer.levels=[8,5,5,5]", "model.latent_channels=4"],
    )
    assert config.model.autoencoder_overrides()["quantizer"] == {"levels": [8, 5, 5, 5]}
    with pytest.raises(ConfigError, match="model: FSQ levels"):
        load_config(REPO / "configs/tiny.json", ["model.regularizer=fsq", "model.quantizer.levels=[8,5]"])
    with pytest.raises(ConfigError, match=r"model\.init_from loads a diffusers"):
        load_config(REPO / "configs/tiny.json", [f"model.init_from={tmp_path}", "model.regularizer=lfq"])
    with pytest.raises(ConfigError, match=r"model\.quantizer must be a JSON object"):
        load_config(REPO / "configs/tiny.json", ["model.regularizer=lfq", "model.quantizer=3"])


def test_export_to_diffusers_refuses_a_quantized_autoencoder_before_writing(tmp_path):
    model = build_autoencoder("tiny", regularizer="lfq")
    with pytest.raises(ValueError, match="has no diffusers equivalent"):
        save_diffusers_folder(model.state_dict(), model.config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_lfq_training_run_logs_the_auxiliary_loss_and_codebook_statistics(tmp_path):
    """A short single-process run of the whole trainer with an LFQ latent (adversarial terms on)."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "launch/train.py",
        "--config",
        "configs/tiny.json",
        "model.regularizer=lfq",
        "model.latent_channels=8",
        "loss.quantizer_aux_loss_weight=0.5",
        "data.demo.train_shards=2",
        "data.demo.eval_shards=1",
        "data.demo.clips_per_shard=4",
        "data.resolution=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "loss.disc_start=1",
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "eval.every=4",
        "eval.max_clips=2",
        "eval.batch_size=2",
        f"train.output_dir={run_dir}",
        f"data.demo.dir={tmp_path / 'demo'}",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    architecture = json.loads((run_dir / "autoencoder.json").read_text())
    assert architecture["regularizer"] == "lfq" and architecture["latent_channels"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if "loss/rec" in record]
    assert [record["step"] for record in train] == [2, 4]
    for record in train:
        assert "loss/kl" not in record
        for key in ("loss/quantizer_aux", "quantizer/codebook_entropy", "quantizer/codebook_usage"):
            assert math.isfinite(record[key]), key
        assert 0 < record["quantizer/codebook_usage"] <= 1
    assert "loss/discriminator" in train[-1]
    assert any(math.isfinite(record.get("eval/psnr", math.nan)) for record in records)
