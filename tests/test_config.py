"""Config loading: unknown keys, bad values and overrides fail at start with a message naming the fix."""

import json
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.json"


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def tiny_raw() -> dict:
    return json.loads(TINY.read_text())


def test_tiny_config_loads_with_the_documented_keys():
    config = load_config(TINY)
    assert isinstance(config, RunConfig)
    assert config.model.preset == "tiny"
    assert (config.data.num_frames - 1) % 4 == 0
    assert config.data.resolution % 8 == 0
    assert (
        config.deepspeed.zero_stage == 2 and config.deepspeed.bf16 is False
    )  # CPU demo: see trainer warning
    for key in ("max_steps", "output_dir", "resume", "seed", "log_every", "checkpoint_every"):
        assert hasattr(config.train, key)
    assert config.optim.generator.lr > 0 and config.optim.discriminator.lr > 0


def test_dotted_overrides_take_precedence_and_parse_json_values(tmp_path):
    config = load_config(
        TINY,
        [
            "train.max_steps=20",
            f"train.output_dir={tmp_path}/run",
            "optim.generator.lr=0.0005",
            "deepspeed.bf16=false",
            "data.demo.enabled=false",
            'data.shards=["a.tar", "b.tar"]',
        ],
    )
    assert config.train.max_steps == 20
    assert config.train.output_dir == f"{tmp_path}/run"
    assert config.optim.generator.lr == 0.0005
    assert config.deepspeed.bf16 is False
    assert config.data.shards == ["a.tar", "b.tar"]


def test_unknown_key_names_the_key_and_lists_valid_ones(tmp_path):
    raw = tiny_raw()
    raw["train"]["max_step"] = 10
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw))
    message = str(err.value)
    assert "train.max_step" in message
    assert "max_steps" in message and "output_dir" in message


def test_unknown_section_and_unknown_override_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key optimizer"):
        load_config(write(tmp_path, {**tiny_raw(), "optimizer": {}}))
    with pytest.raises(ConfigError, match=r"unknown config key loss\.kl_wieght"):
        load_config(TINY, ["loss.kl_wieght=1e-6"])


@pytest.mark.parametrize("frames", [16, 8, 0, 18])
def test_frames_not_4k_plus_1_fail_with_the_fix(frames):
    with pytest.raises(ConfigError, match=r"data.num_frames must be 4k\+1") as err:
        load_config(TINY, [f"data.num_frames={frames}"])
    assert f"got {frames}" in str(err.value) and "use " in str(err.value)


def test_resolution_not_divisible_by_8_fails():
    with pytest.raises(
        ConfigError, match=r"data\.resolution must be a positive multiple of 8.*got 100: use (96|104)"
    ):
        load_config(TINY, ["data.resolution=100"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.preset=huge", r"model.preset='huge' is unknown; choose one of .*tiny"),
        ("loss.rec_loss=l3", r"loss.rec_loss='l3' is not a valid choice"),
        ("deepspeed.zero_stage=4", r"deepspeed.zero_stage must be 0, 1, 2 or 3"),
        ("train.max_steps=ten", r"train.max_steps must be an integer"),
        ("deepspeed.bf16=1", r"deepspeed.bf16 must be true or false"),
        ("optim.generator.betas=[0.9]", r"optim.generator.betas must be a list of 2 values"),
        ("loss.kl_weight=-1", r"loss.kl_weight must be >= 0"),
        ("train.max_steps", r"must look like section.key=value"),
        # 8 px passed the checks, then failed in the first evaluation (SSIM) or step (LPIPS)
        ("data.resolution=8", r"at least 16 \(LPIPS needs 16 pixels, SSIM 11\); got 8: use 16"),
        ("data.buckets=[[16, 8]]", r"at least 16 .*got \[16, 8\]: use \[16, 16\]"),
    ],
)
def test_bad_values_fail_with_a_message(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, [override])


def test_multiscale_factors_need_a_weight():
    """Pooled frames judged by the 2D discriminators every step, weighted by 0, would be a silent waste."""
    image_set = 'discriminator.discriminators=[{"type": "magvit2d"}]'
    with pytest.raises(ConfigError, match=r"loss.multiscale_adversarial_loss_weight, which is 0"):
        load_config(TINY, [image_set, "discriminator.multiscale_factors=[2]"])
    config = load_config(
        TINY,
        [image_set, "discriminator.multiscale_factors=[2]", "loss.multiscale_adversarial_loss_weight=0.5"],
    )
    assert config.discriminator.multiscale_factors == [2]


def test_batch_arithmetic_is_checked_against_the_world_size():
    config = load_config(
        TINY, ["data.batch_size=2", "train.gradient_accumulation_steps=3", "train.global_batch_size=12"]
    )
    config.check_world_size(2)  # 2 x 3 x 2 = 12
    with pytest.raises(ConfigError, match=r"2 x 3 x 4 = 24: set train.global_batch_size=24"):
        config.check_world_size(4)


def test_real_shards_required_unless_demo(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.shards is empty"):
        load_config(TINY, ["data.demo.enabled=false"])
    with pytest.raises(ConfigError, match=r"remove data\.shards"):
        load_config(TINY, ["data.shards=x.tar"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(TINY, ["train.max_steps=7"])
    save_config(config, tmp_path / "resolved.json")
    again = load_config(tmp_path / "resolved.json")
    assert again == config


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_cluster_recipe_loads_and_its_models_build_on_the_meta_device():
    import torch

    from models import build_autoencoder

    config = load_config(REPO / "configs" / "cogvideo_vae.json")
    assert config.model.preset == "cogvideox" and config.data.num_frames == 17
    assert config.deepspeed.zero_stage == 2 and config.deepspeed.bf16
    assert config.loss.lpips.pretrained and config.loss.disc_start > 0
    assert config.ema.enabled and config.optim.generator.warmup_steps > 0
    assert config.discriminator.gradient_checkpointing
    with torch.device("meta"):
        autoencoder = build_autoencoder(config.model.preset, **config.model.autoencoder_overrides())
        discriminators = config.discriminator.build()  # the set the recipe trains
    assert discriminators.output_keys == ["3d"]
    assert sum(p.numel() for p in autoencoder.parameters()) == 215_583_907


def test_loading_a_config_does_not_import_the_compiler():
    """Checking a config builds its discriminators on the meta device; drawing their initial weights there
    went through torch's Python reference kernels, whose first use imports torch._dynamo: 1.5-1.8 s added
    to the start of every command (train, evaluate, export, reconstruct) and of every rank."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from trainer.config import load_config\n"
        f"for name in ('tiny.json', 'cogvideo_vae.json'):\n"
        f"    load_config({str(REPO / 'configs')!r} + '/' + name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout[-2000:]
