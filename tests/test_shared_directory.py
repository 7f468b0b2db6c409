"""Process-group start-up on 2 real CPU ranks (gloo).

- The run folder must be one folder every rank sees (checkpoints are written by some ranks, read by all):
  checked at start-up, where it used to fail only at the first resume.
- DeepSpeed's CPU all-reduce buffers leave no names in /dev/shm (69 MB per rank were left by every run).
"""

from pathlib import Path

import deepspeed
import pytest
import torch

from distributed_utils import run_ranks
from trainer.config import ConfigError
from trainer.distributed import barrier, init_distributed, require_shared_directory, shm_buffer_path

pytestmark = pytest.mark.distributed


def _worker(rank: int, world_size: int, shared: Path, local: Path) -> dict[str, object]:
    info = init_distributed()
    # the buffers' names are gone, their mappings work: DeepSpeed's all-reduce (its shm op on one node)
    buffer_left = shm_buffer_path(rank).exists()
    total = torch.full((1024,), float(rank + 1))
    deepspeed.comm.all_reduce(total)
    require_shared_directory(shared, info)  # the same folder on both ranks: passes
    barrier()  # rank 0 removes the probe file after the others have read it
    left = sorted(p.name for p in shared.iterdir())
    # As on node-local disks: the same path names another folder on rank 1.
    folder = local / f"node{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        require_shared_directory(folder, info)
    except ConfigError as err:
        return {"left": left, "error": str(err), "buffer_left": buffer_left, "sum": total[0].item()}
    return {"left": left, "error": None, "buffer_left": buffer_left, "sum": total[0].item()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, object]]:
    """Both checks from one pair of ranks (a spawn costs several seconds)."""
    root = tmp_path_factory.mktemp("start_up")
    shared = root / "shared"
    shared.mkdir()
    return run_ranks(_worker, root / "ranks", shared, root / "local")


def test_every_rank_must_see_the_run_folder(results):
    for result in results:
        assert result["left"] == []  # the probe file is removed
        # both ranks raise (one alone would leave the other waiting in the next collective)
        assert result["error"] is not None and "is not one folder shared by every rank" in result["error"]


def test_deepspeed_shm_buffers_leave_no_names_in_dev_shm(results):
    assert [result["buffer_left"] for result in results] == [False, False]
    assert [result["sum"] for result in results] == [3.0, 3.0]
