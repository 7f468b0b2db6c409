"""Diffusers folder <-> project autoencoder, and a round trip through the whole trainer.

The reference is diffusers' own AutoencoderKLCogVideoX (installed with the test extra): folders it
writes load here, folders written here load there, and tensors survive exactly.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from safetensors.torch import load_file

from distributed_utils import BF16_CLIP_OVERRIDES, free_port, run_command
from models.convert import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    autoencoder_config_from_diffusers,
    load_diffusers_folder,
    save_diffusers_folder,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 8,
}


def diffusers_reference(folder: Path, seed: int = 0) -> AutoencoderKLCogVideoX:
    """A small random diffusers VAE (norm affine parameters random too), saved to `folder`."""
    torch.manual_seed(seed)
    model = AutoencoderKLCogVideoX(**SMALL)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(folder)
    return model


def test_diffusers_folder_loads_exactly_and_exports_back_exactly(tmp_path):
    reference = diffusers_reference(tmp_path / "reference")
    ours = load_diffusers_folder(tmp_path / "reference")
    assert ours.config.block_out_channels == SMALL["block_out_channels"]
    assert ours.config.latent_channels == SMALL["latent_channels"]
    ref_state = reference.state_dict()
    assert set(ours.state_dict()) == set(ref_state)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref_state[key]), key

    save_diffusers_folder(ours.state_dict(), ours.config, tmp_path / "exported")
    again = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "exported")
    for key, value in again.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    written = json.loads((tmp_path / "exported" / CONFIG_NAME).read_text())
    for key, value in SMALL.items():
        assert written[key] == (list(value) if isinstance(value, tuple) else value)


def test_released_architecture_config_round_trips():
    with torch.device("meta"):  # diffusers' defaults are the released CogVideoX VAE
        defaults = AutoencoderKLCogVideoX()
    ours = autoencoder_config_from_diffusers(dict(defaults.config))
    assert ours.block_out_channels == (128, 256, 256, 512) and ours.layers_per_block == 3
    assert ours.latent_channels == 16 and ours.norm_num_groups == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_quant_conv": True}, "use_quant_conv=True is not supported"),
        ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
        ({"_class_name": "AutoencoderKL"}, "expected a diffusers AutoencoderKLCogVideoX config"),
        ({"down_block_types": ["DownEncoderBlock2D"] * 4}, "down_block_types must be 4 x"),
    ],
)
def test_unsupported_diffusers_configs_are_refused(change, message):
    with torch.device("meta"):
        raw = dict(AutoencoderKLCogVideoX().config)
    with pytest.raises(ValueError, match=message):
        autoencoder_config_from_diffusers({**raw, **change})


def test_missing_or_mismatched_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_diffusers_folder(tmp_path)
    diffusers_reference(tmp_path / "reference")
    weights = load_file(tmp_path / "reference" / WEIGHTS_NAME)
    config = json.loads((tmp_path / "reference" / CONFIG_NAME).read_text())
    config["latent_channels"] = 4  # weights no longer fit
    (tmp_path / "reference" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_diffusers_folder(tmp_path / "reference")
    assert weights  # the file itself was fine


@pytest.mark.distributed
def test_init_from_lr0_training_exports_identical_tensors(tmp_path):
    """2 ranks, bf16, ZeRO-2, lr 0: the exported folder equals the diffusers folder the run started from."""
    diffusers_reference(tmp_path / "reference", seed=3)
    run_dir = tmp_path / "run"
    train = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
        "launch/train.py", "--config", "configs/tiny.json",
        f"model.init_from={tmp_path / 'reference'}",
        "deepspeed.bf16=true",  # the fp32 master weights must survive DeepSpeed's cast to bf16
        "optim.generator.lr=0", "train.max_steps=2", "train.progress_bar=false", "loss.disc_start=0",
        f"train.output_dir={run_dir}", f"data.demo.dir={tmp_path / 'demo'}",
        "data.demo.train_shards=2", "data.demo.eval_shards=1", "data.demo.clips_per_shard=2",
        "data.resolution=32", "data.batch_size=1", "data.num_workers=0", "eval.max_clips=1", "eval.batch_size=1",
        *BF16_CLIP_OVERRIDES,
    ]  # fmt: skip
    result = run_command(train, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "weights and architecture from" in result.stdout + result.stderr

    export = [
        sys.executable,
        "launch/export.py",
        "--checkpoint",
        str(run_dir),
        "--output",
        str(tmp_path / "out"),
    ]
    result = run_command(export, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    original = load_file(tmp_path / "reference" / WEIGHTS_NAME)
    exported = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == torch.float32
        assert torch.equal(exported[key], value.float()), key
    loaded = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "out")
    assert tuple(loaded.config.block_out_channels) == SMALL["block_out_channels"]


def test_export_reports_missing_checkpoints(tmp_path):
    result = run_command(
        [sys.executable, "launch/export.py", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "does not exist" in result.stderr
