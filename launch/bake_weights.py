"""Put the pretrained LPIPS (torchvision's VGG16 trunk + lpips' v0.1 heads) and VGG19 weights into the torch
hub cache, `$TORCH_HOME/hub/checkpoints/`, where the losses look before they download; the Docker image runs
this at build time so that jobs need no network. Local copies can stand in for the downloads:

    python launch/bake_weights.py [--vgg16 vgg16-397923af.pth] [--lpips-heads vgg.pth] [--vgg19 vgg19-dcbb9e9d.pth]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import torch

from losses.lpips import LPIPS, LPIPS_HEADS_FILENAME, load_lpips_state_dict
from losses.perceptual import VGG19Features, load_vgg19_features_state_dict
from losses.vgg import VGG16_FILENAME, VGG19_FILENAME, VGG19_LAYER_INDICES

logger = logging.getLogger("bake_weights")

FILENAMES = (VGG16_FILENAME, LPIPS_HEADS_FILENAME, VGG19_FILENAME)


def checkpoint_dir() -> Path:
    """Where the losses look for pretrained weights before downloading: `<torch.hub.get_dir()>/checkpoints`,
    which is `$TORCH_HOME/hub/checkpoints` when TORCH_HOME is set."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def place_local_file(source: str | os.PathLike, filename: str) -> Path:
    """Copy a local weights file into the hub cache under the name the losses look for."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"weights file {source} does not exist")
    _warn_on_hash_mismatch(source, filename)
    target = checkpoint_dir() / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)  # atomic: an interrupted bake never leaves a truncated file under the real name
    return target


def _warn_on_hash_mismatch(path: Path, filename: str) -> None:
    # torchvision's names end in their file's sha256 prefix; torch.hub checks it only on download, so a
    # local copy under that name is checked here (lpips' heads file carries no hash).
    prefix = Path(filename).stem.rpartition("-")[2]
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        logger.warning(
            "%s is not torchvision's %s (its sha256 does not start with %s)", path, filename, prefix
        )


def bake(
    vgg16: str | os.PathLike | None = None,
    lpips_heads: str | os.PathLike | None = None,
    vgg19: str | os.PathLike | None = None,
) -> list[Path]:
    """Fill the hub cache (local files copied, the rest downloaded by the losses' own loaders), then build
    LPIPS and the full VGG19 trunk from the cache alone, as a job does; raises if that fails."""
    for source, filename in zip((vgg16, lpips_heads, vgg19), FILENAMES, strict=True):
        if source is not None:
            place_local_file(source, filename)
    # What the cache lacks, the loaders download into it under exactly the names they look for.
    load_lpips_state_dict(download=True)
    load_vgg19_features_state_dict(download=True)
    LPIPS(pretrained=True, download=False)
    VGG19Features(layers=[max(VGG19_LAYER_INDICES, key=VGG19_LAYER_INDICES.__getitem__)], download=False)
    return [checkpoint_dir() / filename for filename in FILENAMES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vgg16", help=f"local copy of torchvision's {VGG16_FILENAME}")
    parser.add_argument("--lpips-heads", help="local copy of lpips' weights/v0.1/vgg.pth")
    parser.add_argument("--vgg19", help=f"local copy of torchvision's {VGG19_FILENAME}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        paths = bake(args.vgg16, args.lpips_heads, args.vgg19)
    except (FileNotFoundError, ValueError) as err:
        # FileNotFoundError includes the losses' *WeightsUnavailable, whose messages list where they looked.
        print(f"bake_weights: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
