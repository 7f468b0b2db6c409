"""LPIPS: metric properties, an independent forward, torchvision/lpips key names, and weight loading.

No test reaches the network: every test gets an empty torch hub dir and a downloader that fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from losses.lpips import (
    LPIPS,
    LPIPS_HEADS_FILENAME,
    LPIPS_HEADS_URL,
    LPIPSWeightsUnavailable,
    bake_lpips_weights,
    unit_normalize,
)
from losses.vgg import VGG16_FILENAME, VGG16_URL

# torchvision's vgg16 `features`: 3x3 convs at these indices, 2x2 max-pools at 4, 9, 16, 23, ReLUs elsewhere.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_INDICES = (4, 9, 16, 23)
TAPS = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> head index
HEAD_CHANNELS = (64, 128, 256, 512, 512)


class Downloader:
    """Stands in for torch.hub.load_state_dict_from_url: records calls, serves `files` or fails."""

    def __init__(self, files: dict[str, dict] | None = None) -> None:
        self.files = files or {}
        self.calls: list[tuple[str, str | None]] = []

    def __call__(
        self, url, model_dir=None, map_location=None, progress=True, check_hash=False, file_name=None, **kw
    ):
        self.calls.append((url, file_name))
        if url not in self.files:
            raise OSError("network disabled in tests")
        return self.files[url]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch) -> tuple[Path, Downloader]:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    downloader = Downloader()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", downloader)
    return hub, downloader


@pytest.fixture(scope="module")
def source() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


@pytest.fixture(scope="module")
def original_files(source, tmp_path_factory) -> tuple[Path, Path]:
    """`source`'s weights as torchvision's vgg16 file (with its classifier) and lpips' vgg.pth."""
    folder = tmp_path_factory.mktemp("original")
    state = source.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.0.weight"] = torch.zeros(4, 25088)  # torchvision's file also holds these
    torch.save(backbone, folder / VGG16_FILENAME)
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, folder / LPIPS_HEADS_FILENAME)
    return folder / VGG16_FILENAME, folder / LPIPS_HEADS_FILENAME


@pytest.fixture(scope="module")
def source_distance(source, images) -> torch.Tensor:
    return source(*images)


def link_into(folder: Path, *files: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file)


@pytest.fixture
def same_metric(source, images, source_distance):
    def check(module: LPIPS) -> None:
        assert module.pretrained
        state = module.state_dict()
        assert state.keys() == source.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
        assert torch.equal(module(*images), source_distance)

    return check


# --- the metric ---------------------------------------------------------------------------------------


def test_metric_properties(source, images):
    x, y = images
    d = source(x, y)
    assert d.shape == (3,) and d.dtype == torch.float32
    assert (d > 0).all()
    torch.testing.assert_close(source(x, x), torch.zeros(3), atol=1e-7, rtol=0)
    torch.testing.assert_close(source(y, x), d)


def test_low_precision_inputs_give_fp32(source, images):
    x, y = images
    reference = source(x.bfloat16().float(), y.bfloat16().float())
    d = source(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = source(x, y)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, source(x, y))


def test_frozen_but_gradients_reach_inputs(source, images):
    assert not any(p.requires_grad for p in source.parameters())
    source.train()
    assert not any(m.training for m in source.modules())
    x = images[0].clone().requires_grad_()
    source(x, images[1]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in source.parameters())


def test_unit_normalize_has_finite_gradient_at_zero_features():
    # lpips' sqrt(sum(x**2)) gives NaN gradients where a feature vector is all zero.
    features = torch.zeros(1, 4, 1, 2)
    features[0, :, 0, 1] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    features.requires_grad_()
    unit_normalize(features).square().sum().backward()
    assert torch.isfinite(features.grad).all()


def test_forward_matches_hand_computation(source, images):
    x, y = images
    state = source.state_dict()
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(h):
        out = []
        for i in range(30):
            if i in CONV_INDICES:
                h = F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
            elif i in POOL_INDICES:
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(h)
            if i in TAPS:
                out.append(h)
        return out

    expected = torch.zeros(x.shape[0])
    for k, (fx, fy) in enumerate(zip(taps((x - shift) / scale), taps((y - shift) / scale), strict=True)):
        fx = fx / (torch.sqrt((fx**2).sum(dim=1, keepdim=True)) + 1e-10)
        fy = fy / (torch.sqrt((fy**2).sum(dim=1, keepdim=True)) + 1e-10)
        w = state[f"lin{k}.model.1.weight"].view(-1)  # (C,)
        expected += torch.einsum("nchw,c->nhw", (fx - fy) ** 2, w).mean(dim=(1, 2))
    torch.testing.assert_close(source(x, y), expected, atol=1e-6, rtol=1e-6)


def test_state_dict_keys_match_torchvision_and_lpips(source):
    expected = {}
    in_channels = 3
    for i, channels in zip(CONV_INDICES, CONV_CHANNELS, strict=True):
        expected[f"features.{i}.weight"] = (channels, in_channels, 3, 3)
        expected[f"features.{i}.bias"] = (channels,)
        in_channels = channels
    for k, channels in enumerate(HEAD_CHANNELS):
        expected[f"lin{k}.model.1.weight"] = (1, channels, 1, 1)
    assert {k: tuple(v.shape) for k, v in source.state_dict().items()} == expected
    assert len(source.features) == 30


def test_random_weights_are_seeded_and_announced(caplog):
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="losses.lpips"):
        a = LPIPS(pretrained=False)
    assert "not perceptual distances" in caplog.text
    torch.manual_seed(3)
    b = LPIPS(pretrained=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all((head.model[1].weight >= 0).all() for head in a.heads)


# --- loading ------------------------------------------------------------------------------------------


def test_loads_torchvision_backbone_and_lpips_heads(original_files, same_metric):
    backbone, heads = original_files
    same_metric(LPIPS(weights_path=heads, backbone_weights_path=backbone))


def test_loads_combined_file_from_save_pretrained_and_bake(source, original_files, same_metric, tmp_path):
    same_metric(LPIPS(weights_path=source.save_pretrained(tmp_path / "saved" / "lpips_vgg.pth")))

    backbone, heads = original_files
    baked = bake_lpips_weights(tmp_path / "baked.pth", backbone_path=backbone, heads_path=heads)
    assert set(torch.load(baked, weights_only=True)) == set(source.state_dict())
    same_metric(LPIPS(weights_path=baked, download=False))


def test_loads_lpips_package_state_dict(source, same_metric, tmp_path):
    # `lpips.LPIPS(net="vgg").state_dict()` stores the trunk as net.sliceK.N.* with torchvision's N.
    state = {k.replace("features.", "net.slice1."): v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "lpips_package.pth")
    same_metric(LPIPS(weights_path=tmp_path / "lpips_package.pth"))


def test_loads_from_hub_cache(original_files, same_metric, offline_hub):
    hub, downloader = offline_hub
    link_into(hub / "checkpoints", *original_files)
    same_metric(LPIPS())
    assert downloader.calls == []


def test_downloads_canonical_urls_into_hub_cache(source, same_metric, offline_hub):
    _, downloader = offline_hub
    state = source.state_dict()
    downloader.files = {
        VGG16_URL: {k: v for k, v in state.items() if k.startswith("features.")},
        LPIPS_HEADS_URL: {k: v for k, v in state.items() if k.startswith("lin")},
    }
    same_metric(LPIPS())
    assert downloader.calls == [(VGG16_URL, VGG16_FILENAME), (LPIPS_HEADS_URL, LPIPS_HEADS_FILENAME)]


def test_heads_file_alone_takes_backbone_from_hub_cache(original_files, same_metric, offline_hub):
    hub, downloader = offline_hub
    backbone, heads = original_files
    link_into(hub / "checkpoints", backbone)
    same_metric(LPIPS(weights_path=heads))
    assert downloader.calls == []


def test_backbone_file_as_weights_path_is_a_clear_error(original_files):
    with pytest.raises(ValueError, match="backbone_weights_path"):
        LPIPS(weights_path=original_files[0])


# --- no weights: fail loudly --------------------------------------------------------------------------


def test_no_weights_anywhere_raises_with_the_fix(offline_hub):
    hub, downloader = offline_hub
    with pytest.raises(LPIPSWeightsUnavailable) as error:
        LPIPS()
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    for needle in (
        "pretrained: false",
        "loss.lpips.weights_path",
        VGG16_URL,
        LPIPS_HEADS_URL,
        "network disabled",
    ):
        assert needle in message
    assert str(hub / "checkpoints" / VGG16_FILENAME) in message
    assert str(hub / "checkpoints" / LPIPS_HEADS_FILENAME) in message
    assert [url for url, _ in downloader.calls] == [VGG16_URL, LPIPS_HEADS_URL]


def test_download_false_never_calls_the_downloader(offline_hub):
    _, downloader = offline_hub
    with pytest.raises(LPIPSWeightsUnavailable, match="pretrained: false"):
        LPIPS(download=False)
    assert downloader.calls == []


def test_missing_explicit_path_raises(tmp_path, offline_hub):
    missing = tmp_path / "nope.pth"
    with pytest.raises(LPIPSWeightsUnavailable, match=r"nope\.pth"):
        LPIPS(weights_path=missing)
    assert offline_hub[1].calls == []
