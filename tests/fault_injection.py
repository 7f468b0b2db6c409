"""launch/train.py with a fault injected, for tests/test_fault_tolerance.py.

    FAULT=<kind> python tests/fault_injection.py --config configs/tiny.json [overrides]
    FAULT=<kind> deepspeed --num_gpus 2 tests/fault_injection.py --config ... (same as launch/train.py)

Kinds (FAULT_STEPS: comma-separated 1-based steps, FAULT_RANK: the rank it happens on, default all):
  nan:          the model input of those steps is NaN (on FAULT_RANK only, if set);
  kill_publish: SIGKILL this process while it publishes the checkpoint of the first of FAULT_STEPS
                (every rank's files written, the folder not yet renamed).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainer.checkpoint as checkpoint_module  # noqa: E402
import trainer.trainer as trainer_module  # noqa: E402


def inject() -> None:
    kind = os.environ["FAULT"]
    steps = {int(s) for s in os.environ.get("FAULT_STEPS", "").split(",") if s}
    rank = os.environ.get("FAULT_RANK")
    if rank is not None and int(os.environ.get("RANK", "0")) != int(rank):
        return
    if kind == "nan":
        original = trainer_module.uint8_to_model_range
        calls = [0]

        def nan_input(video):
            # one call per micro-batch of a training step (gradient_accumulation_steps=1 in the tests)
            calls[0] += 1
            out = original(video)
            return out * float("nan") if calls[0] in steps else out

        trainer_module.uint8_to_model_range = nan_input
    elif kind == "kill_publish":
        original_publish = checkpoint_module.Checkpointer._publish

        def killed_publish(self, tmp, final):
            if final.name == checkpoint_module.step_tag(min(steps)):
                os.kill(os.getpid(), signal.SIGKILL)
            return original_publish(self, tmp, final)

        checkpoint_module.Checkpointer._publish = killed_publish
    else:
        raise SystemExit(f"unknown FAULT={kind!r}")


def main() -> int:
    inject()
    spec = importlib.util.spec_from_file_location("train_launcher", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    return launcher.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
