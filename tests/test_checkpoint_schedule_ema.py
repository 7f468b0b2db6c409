"""Unit tests: atomic checkpoint publishing and pruning, learning-rate schedules, the EMA."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.checkpoint import Checkpointer, find_checkpoint, step_tag
from trainer.config import ConfigError, OptimizerConfig, load_config
from trainer.ema import ModelEMA, weights_without_bookkeeping
from trainer.schedule import WarmupSchedule, scheduler_factory

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


class FakeEngine:
    """Writes a file where DeepSpeed would write its checkpoint files (save_dir/tag/...)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        assert not save_latest  # `latest` is ours, written after the rename
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"value": self.value}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        if not path.is_file():
            return None, None
        self.value = torch.load(path)["value"]
        return str(path), {}


def test_checkpoints_publish_by_rename_keep_the_newest_and_resume(tmp_path):
    checkpointer = Checkpointer(tmp_path, rank=0, keep=2)
    for step in (2, 4, 6):
        folder = checkpointer.save(step, FakeEngine(step), FakeEngine(-step), {"global_step": step})
        assert folder == tmp_path / "checkpoints" / step_tag(step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert not list(root.glob(".*"))  # no temporary folder or file left

    g, d = FakeEngine(0), FakeEngine(0)
    found = checkpointer.resolve("auto")
    assert found == root / "step_00000006"
    assert checkpointer.load(found, g, d) == {"global_step": 6}
    assert (g.value, d.value) == (6, -6)
    # a run directory, its checkpoints folder, or one checkpoint
    assert find_checkpoint(tmp_path) == find_checkpoint(root) == root / "step_00000006"
    assert checkpointer.resolve(str(root / "step_00000004")) == root / "step_00000004"
    assert Checkpointer(tmp_path / "elsewhere", rank=0).resolve("auto") is None
    with pytest.raises(ConfigError, match="no 'latest' file"):
        checkpointer.resolve(str(tmp_path / "nothing"))


def test_a_killed_save_leaves_the_previous_checkpoint_and_is_replaced(tmp_path):
    checkpointer = Checkpointer(tmp_path, rank=0)
    checkpointer.save(2, FakeEngine(2), FakeEngine(2), {"global_step": 2})
    root = tmp_path / "checkpoints"
    stale = root / ".step_00000004.tmp"
    (stale / "generator").mkdir(parents=True)  # what a save killed before its rename leaves
    (stale / "generator" / "partial.pt").write_bytes(b"\0" * 10)
    assert checkpointer.resolve("auto") == root / "step_00000002"

    checkpointer.save(4, FakeEngine(4), FakeEngine(4), {"global_step": 4})
    assert not stale.exists()
    assert not (root / "step_00000004" / "generator" / "partial.pt").exists()
    assert checkpointer.resolve("auto") == root / "step_00000004"
    # saving a step that is already published (resumed, then stopped at once) leaves it as it is
    checkpointer.save(4, FakeEngine(99), FakeEngine(99), {"global_step": 4})
    engine = FakeEngine(0)
    checkpointer.load(root / "step_00000004", engine, FakeEngine(0))
    assert engine.value == 4


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000010\n")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path)


def test_warmup_then_constant_and_cosine():
    constant = WarmupSchedule("constant", warmup_steps=4, total_steps=100, min_lr_ratio=0.0)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = WarmupSchedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cosine(9) == 1.0
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cosine(110) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.1)  # stays at the floor after the end
    values = [cosine(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_scheduler_drives_the_optimizer_and_saves_its_position():
    param = nn.Parameter(torch.zeros(1))
    config = OptimizerConfig(lr=2.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    optimizer = torch.optim.AdamW([param], lr=config.lr)
    scheduler = scheduler_factory(config, total_steps=6)(optimizer)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1.0, 2.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)

    # a resumed run: a new optimizer and scheduler, loaded as DeepSpeed loads them from a checkpoint
    optimizer2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler2 = scheduler_factory(config, total_steps=6)(optimizer2)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    assert scheduler2.last_epoch == 6
    for _ in range(2):
        optimizer.step(), optimizer2.step()
        scheduler.step(), scheduler2.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.0  # past the end


def test_schedule_config_is_checked():
    config = load_config(TINY, ["optim.discriminator.schedule=cosine", "optim.discriminator.warmup_steps=5"])
    assert config.optim.discriminator.schedule == "cosine"
    assert config.optim.generator.schedule == "constant"
    with pytest.raises(ConfigError, match="schedule"):
        load_config(TINY, ["optim.generator.schedule=linear"])
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        load_config(TINY, ["optim.generator.min_lr_ratio=2"])
    with pytest.raises(ConfigError, match=r"ema\.decay"):
        load_config(TINY, ["ema.decay=1.5"])
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_config(TINY, ["train.keep_checkpoints=-1"])


def test_ema_averages_in_fp32_with_warmup_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.9, warmup=True)
    assert all(t.dtype == torch.float32 for t in ema.params.values())
    reference = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    for update in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        model(torch.randn(4, 3, dtype=torch.bfloat16))  # moves the BatchNorm running stats
        decay = min(0.9, (1 + update) / (10 + update))
        for name, p in model.named_parameters():
            reference[name] = decay * reference[name] + (1 - decay) * p.detach().float()
        ema.update(model)
    for name in reference:
        torch.testing.assert_close(ema.params[name], reference[name], rtol=1e-6, atol=1e-6)
    assert torch.equal(ema.buffers["1.running_mean"], model[1].running_mean)

    state = ema.state_dict()
    assert int(state["__ema_updates__"]) == 5
    restored = ModelEMA(model, decay=0.9)
    restored.load_state_dict(state)
    assert restored.updates == 5
    assert all(torch.equal(restored.params[k], ema.params[k]) for k in ema.params)
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    plain.load_state_dict(weights_without_bookkeeping(state))  # loads into a plain fp32 module
    with pytest.raises(ValueError, match="do not match"):
        ModelEMA(nn.Linear(3, 2), decay=0.9).load_state_dict(state)
