"""Resuming with changes: from an earlier checkpoint of the same run, with other learning-rate settings,
on more ranks.

- Unit level (fake engines): a checkpoint left by an earlier run at the same step is replaced, never the
  one this run resumed from; a kill at any point of the replace leaves a complete checkpoint to resume;
  pruning keeps what an abandoned branch left; a ZeRO-2 checkpoint on another number of ranks is a
  ConfigError; a restored LambdaLR takes the configured schedule at its position.
- The real Trainer in one process (ZeRO-0, demo shards): a cosine run of 4 steps, then the same folder
  resumed from its step 2 with max_steps 5 and new learning rates; the logged learning rates are those
  each step trained with, from the config in force; the resumed run's step 4 replaces the first run's.
- Two ranks resuming a one-rank checkpoint: distinct random streams; at ZeRO-2, a clear ConfigError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trainer.checkpoint as checkpoint_module
from distributed_utils import SMALL_DEMO_RUN, run_ranks
from trainer.checkpoint import Checkpointer, check_zero_world_size, find_checkpoint
from trainer.config import ConfigError, OptimizerConfig, load_config
from trainer.schedule import WarmupSchedule, apply_schedule, scheduler_factory

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


class FakeEngine:
    """Writes a file where DeepSpeed would write its checkpoint files (save_dir/tag/...)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"value": self.value}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        self.value = torch.load(path)["value"]
        return str(path), {}


def _save(checkpointer: Checkpointer, step: int, value: float) -> Path:
    return checkpointer.save(step, FakeEngine(value), FakeEngine(-value), {"global_step": step})


def _value(checkpoint: Path) -> float:
    engine = FakeEngine(0)
    engine.load_checkpoint(str(checkpoint), "generator")
    return engine.value


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_checkpoint_left_by_an_earlier_run_is_replaced_but_not_the_resumed_one(tmp_path):
    root = tmp_path / "checkpoints"
    first = Checkpointer(tmp_path, rank=0)
    for step in (2, 4):
        _save(first, step, step)
    # a second run resumes from step 2 and trains on with other settings: its step 4 is another state
    second = Checkpointer(tmp_path, rank=0)
    second.load(second.resolve(str(root / "step_00000002")), FakeEngine(0), FakeEngine(0))
    assert _save(second, 2, 99) == root / "step_00000002"  # the resumed checkpoint is this state: kept
    assert _value(root / "step_00000002") == 2
    _save(second, 4, 40)
    assert _value(root / "step_00000004") == 40
    assert find_checkpoint(tmp_path) == root / "step_00000004"
    assert _entries(root) == ["latest", "step_00000002", "step_00000004"]  # nothing set aside is left
    _save(second, 4, 41)  # saved by this run already: not written again
    assert _value(root / "step_00000004") == 40


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_kill_at_any_point_of_a_replace_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Kills the publish of a replacing save after each of its file-system operations in turn: the
    checkpoint `latest` leads to is always complete, the old or the new state, and the next save leaves
    the folder clean. (Why: the new state is complete in the temporary folder before anything is
    renamed; the old folder is only renamed aside, never deleted, until `latest` names the new one; in
    the moment between the two renames, find_checkpoint takes the old one from where it was set aside.)"""
    operations = {"rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}
    kill_after = [0]

    def counted(name):
        def operation(*args, **kwargs):
            if kill_after[0] == 0:
                raise Killed
            kill_after[0] -= 1
            return operations[name](*args, **kwargs)

        return operation

    outcomes = []
    for kills in range(20):
        run_dir = tmp_path / f"kill{kills}"
        root = run_dir / "checkpoints"
        first = Checkpointer(run_dir, rank=0)
        for step in (2, 4):
            _save(first, step, step)
        second = Checkpointer(run_dir, rank=0)
        second.load(root / "step_00000002", FakeEngine(0), FakeEngine(0))
        kill_after[0] = kills
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint_module.os, "rename", counted("rename"))
            patch.setattr(checkpoint_module.os, "replace", counted("replace"))
            patch.setattr(checkpoint_module.shutil, "rmtree", counted("rmtree"))
            try:
                _save(second, 4, 40)
                killed = False
            except Killed:
                killed = True
        found = find_checkpoint(run_dir)
        assert checkpoint_module.is_checkpoint(found), kills
        outcomes.append(_value(found))
        assert outcomes[-1] in (4, 40), kills
        # the run that resumes from it saves its next checkpoint: no leftovers, nothing lost
        third = Checkpointer(run_dir, rank=0)
        third.load(found, FakeEngine(0), FakeEngine(0))
        _save(third, 6, 60)
        assert _entries(root) == ["latest", "step_00000002", "step_00000004", "step_00000006"], kills
        if not killed:
            break
    assert outcomes[0] == 4 and outcomes[-1] == 40 and killed is False


def test_pruning_keeps_what_an_abandoned_branch_left_newer(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    first = Checkpointer(tmp_path, rank=0)
    for step in (2, 4, 6):
        _save(first, step, step)
    second = Checkpointer(tmp_path, rank=0, keep=1)
    second.load(root / "step_00000002", FakeEngine(0), FakeEngine(0))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _save(second, 4, 40)
    # step 2 pruned (keep 1 up to the newest save); step 6 of the first run kept, said once
    assert _entries(root) == ["latest", "step_00000004", "step_00000006"]
    assert "step_00000006: newer than step_00000004" in caplog.text
    assert find_checkpoint(tmp_path) == root / "step_00000004"
    _save(second, 6, 60)
    assert _entries(root) == ["latest", "step_00000006"] and _value(root / "step_00000006") == 60


def test_a_zero_checkpoint_from_another_number_of_ranks_is_a_config_error(tmp_path):
    checkpoint = _save(Checkpointer(tmp_path, rank=0), 2, 2)

    class Engine:
        dp_world_size = 2

        def __init__(self, stage: int) -> None:
            self.stage = stage

        def zero_optimization_stage(self) -> int:
            return self.stage

    check_zero_world_size(checkpoint, Engine(0))  # ZeRO-0 keeps no optimizer partitions
    with pytest.raises(ConfigError, match=r"saved by 1 rank\(s\) at ZeRO-2, this run has 2.*ds_to_universal"):
        check_zero_world_size(checkpoint, Engine(2))


def test_a_restored_schedule_takes_the_configured_settings_at_its_position():
    saved = OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=1)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=saved.lr)
    scheduler = scheduler_factory(saved, total_steps=2)(optimizer)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0  # the end of the saved schedule

    # resumed as DeepSpeed resumes: fresh objects, then the checkpoint's states loaded into them
    config = OptimizerConfig(lr=2e-3, schedule="cosine", warmup_steps=1)
    resumed_optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=config.lr)
    resumed = scheduler_factory(config, total_steps=6)(resumed_optimizer)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.lr_lambdas[0].total_steps == 2  # what the fix is for

    changes = apply_schedule(resumed, config, total_steps=6)
    assert changes == ["total_steps 2 -> 6", "lr 0.001 -> 0.002"]
    expected = WarmupSchedule("cosine", 1, 6, 0.0)
    for step in range(2, 6):  # the lr of optimizer step `step + 1`
        assert resumed.last_epoch == step
        assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * expected(step))
        assert resumed_optimizer.param_groups[0]["initial_lr"] == 2e-3
        resumed_optimizer.step()
        resumed.step()
    assert apply_schedule(resumed, config, total_steps=6) == []  # nothing differs any more


# ---------------------------------------------------------------------------------------- Trainer

COMMON = [
    *SMALL_DEMO_RUN,
    "data.num_workers=0",
    "data.num_frames=5",
    "deepspeed.zero_stage=0",
    "loss.disc_start=2",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "eval.every=0",
    "eval.max_clips=1",
    "eval.batch_size=1",
    "eval.media_clips=0",
    "eval.lpips=false",
    "optim.generator.schedule=cosine",
]


def _overrides(root: Path, *extra: str) -> list[str]:
    return [*COMMON, f"data.demo.dir={root / 'demo'}", *extra]


def _train(overrides: list[str]) -> None:
    from trainer.trainer import Trainer

    trainer = Trainer(load_config(TINY, overrides))
    trainer.evaluate = lambda: {}  # nothing here depends on it, and it leaves the random streams alone
    try:
        trainer.train()
    finally:
        trainer.close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _one_rank_worker(rank: int, world_size: int, root: Path) -> dict:
    """The one-rank runs in one process: a 4-step run, its branch from step 2 to 5, and a ZeRO-2
    checkpoint of an untrained run (step 0)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("trainer").addHandler(handler)
    run = root / "run"
    _train(_overrides(root, f"train.output_dir={run}", "train.max_steps=4", "optim.generator.lr=1e-3"))
    generator_file = run / "checkpoints" / "step_00000004" / "generator" / "mp_rank_00_model_states.pt"
    first_step4 = _md5(generator_file)
    first_messages = len(messages)
    _train(
        _overrides(
            root,
            f"train.output_dir={run}",
            f"train.resume={run / 'checkpoints' / 'step_00000002'}",
            "train.max_steps=5",
            "optim.generator.lr=2e-3",
            "optim.discriminator.lr=4e-4",
        )
    )
    from trainer.trainer import Trainer

    untrained = Trainer(
        load_config(TINY, _overrides(root, f"train.output_dir={root / 'zero2'}", "deepspeed.zero_stage=2"))
    )
    untrained.save_checkpoint()
    untrained.close()
    return {
        "first_step4": first_step4,
        "second_step4": _md5(generator_file),
        "log": messages[first_messages:],
    }


def _two_rank_worker(rank: int, world_size: int, root: Path) -> dict:
    """Two ranks resume the one-rank checkpoints: ZeRO-0 (the random streams), ZeRO-2 (the error)."""
    from trainer.trainer import Trainer

    checkpoint = root / "run" / "checkpoints" / "step_00000002"
    trainer = Trainer(
        load_config(
            TINY, _overrides(root, f"train.output_dir={root / 'wider'}", f"train.resume={checkpoint}")
        )
    )
    result = {
        "global_step": trainer.global_step,
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1],
        "data": trainer.data_resume_state,
    }
    trainer.close()
    try:
        Trainer(
            load_config(
                TINY,
                _overrides(
                    root,
                    f"train.output_dir={root / 'wider2'}",
                    f"train.resume={root / 'zero2'}",
                    "deepspeed.zero_stage=2",
                ),
            )
        )
    except Exception as err:  # (DeepSpeed's own is a ZeRORuntimeException)
        result["zero2_error"] = f"{type(err).__name__}: {err}"
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume_changes")
    (one,) = run_ranks(_one_rank_worker, root / "one", root, world_size=1)
    two = run_ranks(_two_rank_worker, root / "two", root, world_size=2)
    return {"root": root, "one": one, "two": two}


def _logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every record with `key`, in the order logged (a resumed run logs on after them)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record[key]) for record in records if key in record]


@pytest.mark.distributed
def test_resumed_run_follows_the_new_schedule_logs_the_rates_it_trained_with_and_replaces_step_4(runs):
    root, one = runs["root"], runs["one"]
    run = root / "run"
    generator, discriminator = _logged(run, "lr/generator"), _logged(run, "lr/discriminator")
    assert [step for step, _ in generator] == [1, 2, 3, 4, 3, 4, 5]  # the first run, then the resumed
    # The first run (cosine over 4 steps, 1e-3): step k logs the rate it trained with, 1e-3 x f(k - 1),
    # not the next step's (its last step logs 1e-3 x f(3) > 0, not 0). The discriminator steps from
    # step 3 on (loss.disc_start=2) at its constant 2e-4.
    schedule = WarmupSchedule("cosine", 0, 4, 0.0)
    for step, lr in generator[:4]:
        assert lr == pytest.approx(1e-3 * schedule(step - 1), rel=1e-9), step
    assert generator[3][1] > 0
    assert discriminator[:2] == [(3, pytest.approx(2e-4, rel=1e-9)), (4, pytest.approx(2e-4, rel=1e-9))]

    # Resumed from step 2 with max_steps 5 and new rates: the new cosine (5 steps, 2e-3) from step 3 on,
    # and the discriminator's new constant 4e-4 (the restored schedules: 1e-3 down to 0 at step 4, 2e-4).
    schedule = WarmupSchedule("cosine", 0, 5, 0.0)
    for step, lr in generator[4:]:
        assert lr == pytest.approx(2e-3 * schedule(step - 1), rel=1e-9), step
    assert [step for step, _ in discriminator[2:]] == [3, 4, 5]
    assert all(lr == pytest.approx(4e-4, rel=1e-9) for _, lr in discriminator[2:])
    log = "\n".join(one["log"])
    assert "optim.generator differs from the checkpoint's: total_steps 4 -> 5, lr 0.001 -> 0.002" in log
    assert "optim.discriminator differs from the checkpoint's: total_steps 2 -> 3, lr 0.0002 -> 0.0004" in log

    # the first run's step 4 was replaced by the resumed run's (other weights), which saved 5 after it
    checkpoints = run / "checkpoints"
    assert "replacing checkpoint" in log and f"{checkpoints / 'step_00000004'}" in log
    assert one["second_step4"] != one["first_step4"]
    saved = torch.load(
        checkpoints / "step_00000004" / "generator" / "mp_rank_00_model_states.pt", weights_only=False
    )
    assert saved["lr_scheduler"]["base_lrs"] == [2e-3]  # written by the resumed run
    assert saved["lr_scheduler"]["lr_lambdas"][0]["total_steps"] == 5
    assert (checkpoints / "latest").read_text().strip() == "step_00000005"
    assert _entries(checkpoints) == ["latest", "step_00000002", "step_00000004", "step_00000005"]


@pytest.mark.distributed
def test_more_ranks_than_the_checkpoint_draw_their_own_random_streams(runs):
    ranks = runs["two"]
    assert [r["global_step"] for r in ranks] == [2, 2]
    # rank 0 continues its own streams; rank 1, which the checkpoint has none for, gets its own
    state_file = runs["root"] / "run" / "checkpoints" / "step_00000002" / "trainer" / "rank_00000.pt"
    saved = torch.load(state_file, weights_only=False)
    assert torch.equal(ranks[0]["torch"], saved["torch_rng"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert ranks[0]["python"] != ranks[1]["python"]
    assert not np.array_equal(ranks[0]["numpy"], ranks[1]["numpy"])
    # rank 0's data position is its own (one rank: the data pipeline starts a new pass); rank 1 has none
    assert ranks[0]["data"] == saved["data"] and ranks[1]["data"] is None


@pytest.mark.distributed
def test_zero2_checkpoint_resumed_on_more_ranks_is_a_config_error(runs):
    for rank in runs["two"]:
        message = rank["zero2_error"]
        assert message.startswith("ConfigError: "), message
        assert "saved by 1 rank(s) at ZeRO-2, this run has 2" in message
        assert "Resume with 1 rank(s)" in message and "ds_to_universal" in message
