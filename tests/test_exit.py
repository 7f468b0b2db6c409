"""trainer.distributed.exit_process, how the command-line tools end: sys.exit without the interpreter's last
garbage collection (about 2 s per process with torch, DeepSpeed and inductor imported)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_exit_process_keeps_the_status_and_runs_atexit_handlers_on_a_frozen_heap():
    code = (
        "import atexit, gc\n"
        "from trainer.distributed import exit_process\n"
        "atexit.register(lambda: print('atexit ran; frozen objects:', gc.get_freeze_count() > 0, flush=True))\n"
        "exit_process(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.strip() == "atexit ran; frozen objects: True"
