import os
import sys
from pathlib import Path

# The repository root on sys.path, so tests run from a checkout as well as from an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
