"""Loss terms against values worked out by hand on tiny tensors: GAN losses, feature matching, R1, lazy
regularisation, LeCam (one process and 2 gloo ranks), learned log-variance, Gram matrices, VGG19
perceptual/style losses and their weight loading. No test reaches the network."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed_utils import run_ranks
from losses.gan import (
    GAN_LOSS_KINDS,
    LearnedLogVariance,
    LeCamRegularizer,
    discriminator_adversarial_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    gradient_penalty,
    lazy_penalty_scale,
)
from losses.lpips import LPIPSWeightsUnavailable
from losses.perceptual import (
    GramStyleLoss,
    PerceptualWeightsUnavailable,
    VGG19Features,
    VGGPerceptualLoss,
    gram_matrix,
)
from losses.vgg import (
    VGG19_FILENAME,
    VGG19_LAYER_INDICES,
    VGG19_URL,
    vgg16_features,
    vgg19_features,
)

LN2, LN3, LN4, LN4_3 = math.log(2), math.log(3), math.log(4), math.log(4 / 3)


def close(actual: torch.Tensor, expected: float | list, **kw) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), **kw)


# --- adversarial losses ------------------------------------------------------------------------------


def test_discriminator_losses_by_hand():
    real = torch.tensor([[0.5], [-2.0], [3.0]])
    fake = torch.tensor([[-0.5], [1.5], [-4.0]])
    # hinge: relu(1 - real) = [0.5, 3, 0], relu(1 + fake) = [0.5, 2.5, 0]
    close(discriminator_adversarial_loss(real, fake, "hinge"), 0.5 * (3.5 / 3 + 3.0 / 3))

    real = torch.tensor([[0.0], [LN3]])
    fake = torch.tensor([[LN3], [LN3]])
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(1 + 1/3), softplus(ln 3) = ln 4
    expected = 0.5 * ((LN2 + LN4_3) / 2 + LN4)
    close(discriminator_adversarial_loss(real, fake, "vanilla"), expected)
    close(discriminator_adversarial_loss(real, fake, "non_saturating"), expected)


def test_generator_losses_by_hand():
    close(generator_adversarial_loss(torch.tensor([[0.5], [-2.0]]), "hinge"), 0.75)
    fake = torch.tensor([[LN3], [0.0]])  # sigmoid: 3/4 and 1/2
    close(generator_adversarial_loss(fake, "vanilla"), (math.log(1 / 4) + math.log(1 / 2)) / 2)  # log(1 - D)
    close(generator_adversarial_loss(fake, "non_saturating"), (LN4_3 + LN2) / 2)  # -log D


def test_gan_losses_are_fp32_and_reject_unknown_kinds():
    logits = torch.tensor([[0.5], [-2.0]], dtype=torch.bfloat16)
    for kind in GAN_LOSS_KINDS:
        assert discriminator_adversarial_loss(logits, logits, kind).dtype == torch.float32
        assert generator_adversarial_loss(logits, kind).dtype == torch.float32
    with pytest.raises(ValueError, match="hinge, vanilla, non_saturating"):
        generator_adversarial_loss(logits, "wgan")
    with pytest.raises(ValueError, match="valid kinds"):
        discriminator_adversarial_loss(logits, logits, "lsgan")


def test_feature_matching_by_hand():
    # (B, C, L): channel means over batch and L: real [4, 1], fake [1, 1] -> L1 = (3 + 0) / 2
    real_a = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[5.0, 7.0], [2.0, 2.0]]], requires_grad=True)
    fake_a = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[2.0, 2.0], [1.0, 1.0]]], requires_grad=True)
    # (B, C): real means [2, 2, 2], fake [1, 1, 4] -> L1 = (1 + 1 + 2) / 3
    real_b = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    fake_b = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 8.0]])
    loss = feature_matching_loss([real_a, real_b], [fake_a, fake_b])
    close(loss, (1.5 + 4.0 / 3) / 2)
    loss.backward()
    assert real_a.grad is None  # real features are the target
    # d/d fake_a[b, c, l] = 0.5 (layer mean) * 0.5 (channel mean) * sign(mu_fake - mu_real) / 4 (elements)
    expected = torch.zeros(2, 2, 2)
    expected[:, 0] = -0.5 * 0.5 / 4
    torch.testing.assert_close(fake_a.grad, expected)
    with pytest.raises(ValueError, match="same non-zero number"):
        feature_matching_loss([real_a], [fake_a, fake_b])


# --- R1 and lazy regularisation ----------------------------------------------------------------------


def _quadratic_discriminator(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """D(x_b) = sum(w * x_b) + 0.5 * sum(x_b^2): its input gradient is w + x_b."""
    return (w * x).sum(dim=(1, 2)) + 0.5 * x.square().sum(dim=(1, 2))


def test_r1_zero_centred_by_hand():
    w = torch.tensor([[1.0, 2.0]], requires_grad=True)
    real = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]], requires_grad=True)  # (B, 1, 2)
    # g_0 = [1, 2] (||g||^2 = 5), g_1 = [3, 0] (||g||^2 = 9)
    penalty = gradient_penalty(_quadratic_discriminator(w, real), real)
    close(penalty, 7.0)
    # create_graph: d/dw mean_b ||w + x_b||^2 = 2 (w + mean_b x_b) = 2 * ([1, 2] + [1, -1])
    penalty.backward()
    torch.testing.assert_close(w.grad, torch.tensor([[4.0, 2.0]]))


def test_r1_one_centred_by_hand():
    w = torch.tensor([[1.0, 2.0]], requires_grad=True)
    real = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]], requires_grad=True)
    # ((sqrt 5 - 1)^2 + (3 - 1)^2) / 2 = 5 - sqrt 5
    close(gradient_penalty(_quadratic_discriminator(w, real), real, center=1), 5.0 - math.sqrt(5.0))

    # A linear D(x) = a * sum(x) at a = 0 has g = 0: the penalty is 1 with a finite gradient.
    a = torch.zeros((), requires_grad=True)
    penalty = gradient_penalty(a * real.sum(dim=(1, 2)), real, center=1)
    close(penalty, 1.0)
    penalty.backward()
    assert torch.isfinite(a.grad)


def test_r1_needs_a_real_input_that_requires_grad():
    real = torch.ones(2, 3)
    with pytest.raises(ValueError, match="requires_grad_"):
        gradient_penalty(real.sum(dim=1), real)
    with pytest.raises(ValueError, match="center"):
        gradient_penalty(real.sum(dim=1), real.requires_grad_(), center=2)


def test_lazy_penalty_scale():
    assert [lazy_penalty_scale(step, 4) for step in range(9)] == [4, 0, 0, 0, 4, 0, 0, 0, 4]
    assert [lazy_penalty_scale(step, 1) for step in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="every"):
        lazy_penalty_scale(0, 0)


# --- LeCam -------------------------------------------------------------------------------------------


def test_lecam_penalty_and_ema_over_two_steps():
    lecam = LeCamRegularizer(decay=0.9)
    assert LeCamRegularizer().decay == 0.99
    real = torch.tensor([[1.0], [3.0]], requires_grad=True)
    fake = torch.tensor([[-2.0], [0.0]])
    # step 1 sets the EMAs: ema_real = 2, ema_fake = -1
    # relu(real - -1) = [2, 4] -> (4 + 16) / 2; relu(2 - fake) = [4, 2] -> (16 + 4) / 2
    penalty = lecam(real, fake)
    close(lecam.ema_real, 2.0)
    close(lecam.ema_fake, -1.0)
    close(penalty, 20.0)
    penalty.backward()
    torch.testing.assert_close(real.grad, torch.tensor([[2.0], [4.0]]))  # 2 * relu(.) / 2

    # step 2: ema_real = 0.9 * 2 + 0.1 * 1 = 1.9, ema_fake = 0.9 * -1 + 0.1 * 2 = -0.7
    # relu([0, 2] + 0.7) = [0.7, 2.7]; relu(1.9 - [1, 3]) = [0.9, 0]
    real, fake = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]])
    lecam.update(real, fake)
    close(lecam.ema_real, 1.9)
    close(lecam.ema_fake, -0.7)
    close(lecam.penalty(real, fake), (0.49 + 7.29) / 2 + (0.81 + 0.0) / 2)


def test_lecam_state_dict_round_trip_and_fp32():
    lecam = LeCamRegularizer(decay=0.9)
    lecam.update(torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0]))
    state = lecam.state_dict()
    assert set(state) == {"ema_real", "ema_fake", "initialized"}

    restored = LeCamRegularizer(decay=0.9)
    restored.load_state_dict(state)
    for module in (lecam, restored):  # the restored one keeps going (no re-initialisation)
        module.update(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]))
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in lecam.state_dict().items())
    close(restored.ema_real, 1.9)

    restored.to(torch.bfloat16)  # e.g. a bf16 engine: the EMAs stay fp32 and unrounded
    assert restored.ema_real.dtype == restored.ema_fake.dtype == torch.float32
    close(restored.ema_fake, -0.7)


def _lecam_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    # Different batch sizes per rank: the EMAs follow the global means (all elements of all ranks).
    steps = [
        ([[1.0, 3.0], [5.0, 7.0, 9.0, 11.0]], [[-2.0], [0.0, 2.0]]),  # global means 6, 0
        ([[0.0], [2.0]], [[4.0, 4.0], [1.0]]),  # global means 1, 3
    ]
    lecam = LeCamRegularizer(decay=0.9)
    for real, fake in steps:
        lecam.update(torch.tensor(real[rank]), torch.tensor(fake[rank]))
    return {"ema_real": lecam.ema_real.clone(), "ema_fake": lecam.ema_fake.clone()}


@pytest.mark.distributed
def test_lecam_ema_is_shared_across_two_ranks(tmp_path):
    results = run_ranks(_lecam_rank, tmp_path, world_size=2)
    for result in results:
        close(result["ema_real"], 0.9 * 6.0 + 0.1 * 1.0)  # 5.5
        close(result["ema_fake"], 0.9 * 0.0 + 0.1 * 3.0)  # 0.3
    assert torch.equal(results[0]["ema_real"], results[1]["ema_real"])
    assert torch.equal(results[0]["ema_fake"], results[1]["ema_fake"])


# --- learned log-variance ----------------------------------------------------------------------------


def test_learned_log_variance_by_hand():
    rec = torch.tensor([[0.5, 1.5], [2.0, 0.0]], requires_grad=True)  # mean 1
    nll = LearnedLogVariance()
    assert nll.logvar.dtype == torch.float32 and nll.logvar.requires_grad
    close(nll(rec), 1.0)

    nll = LearnedLogVariance(init=LN2)
    loss = nll(rec)
    close(loss, 1.0 / 2 + LN2)  # mean(rec) / e^ln2 + ln2
    loss.backward()
    close(nll.logvar.grad, [1.0 - 1.0 / 2])  # d/dlogvar = 1 - mean(rec) e^-logvar; a (1,) parameter
    torch.testing.assert_close(rec.grad, torch.full((2, 2), 1.0 / (4 * 2)))


# --- Gram matrices and the feature distances by hand ------------------------------------------------

# One (1, 2, 2, 2) feature: channel 0 = [1, 2, 3, 4], channel 1 = [0, 1, 0, -1] (flattened).
GRAM_FEATURE = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])


def test_gram_matrix_by_hand():
    # <c0, c0> = 30, <c0, c1> = 2 - 4 = -2, <c1, c1> = 2; divided by C * H * W = 8
    close(gram_matrix(GRAM_FEATURE), [[[3.75, -0.25], [-0.25, 0.25]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_matrix(GRAM_FEATURE).dtype == torch.float32


def test_gram_style_distance_by_hand():
    torch.manual_seed(0)
    style = GramStyleLoss({"conv1_1": 2.0}, pretrained=False)
    fake = GRAM_FEATURE.clone()
    fake[:, 1] = 0  # Gram [[3.75, 0], [0, 0]]: differences 0, -0.25, -0.25, 0.25
    close(style.loss_from_features({"conv1_1": GRAM_FEATURE}, {"conv1_1": fake}), [2.0 * 0.75 / 4])
    style.distance = "l2"
    close(style.loss_from_features({"conv1_1": GRAM_FEATURE}, {"conv1_1": fake}), [2.0 * 3 * 0.0625 / 4])


def test_perceptual_distances_by_hand():
    torch.manual_seed(0)
    # (N=2, C=2, H=1, W=2); as channel vectors per position:
    # sample 0: real [1, 0], [3, 4]; fake [0, 1], [6, 8] -> 1 - cos = 1, 0
    # sample 1: real [1, 1], [0, 0]; fake [-1, -1], [0, 0] -> 1 - cos = 2, and 0 for two zero vectors
    real = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]], [[[1.0, 0.0]], [[1.0, 0.0]]]])
    fake = torch.tensor([[[[0.0, 6.0]], [[1.0, 8.0]]], [[[-1.0, 0.0]], [[-1.0, 0.0]]]])
    loss = VGGPerceptualLoss({"conv1_1": 1.0}, distance="cosine", pretrained=False)
    close(loss.loss_from_features({"conv1_1": real}, {"conv1_1": fake}), [0.5, 1.0])
    loss.distance = "l1"  # |diff| sums 1 + 1 + 3 + 4 and 2 + 2 over 4 entries
    close(loss.loss_from_features({"conv1_1": real}, {"conv1_1": fake}), [9 / 4, 4 / 4])
    loss.distance = "l2"
    close(loss.loss_from_features({"conv1_1": real}, {"conv1_1": fake}), [27 / 4, 8 / 4])


# --- VGG19 layout ------------------------------------------------------------------------------------

# torchvision's vgg19 `features`: 3x3 convs at these indices, 2x2 max-pools at 4, 9, 18, 27 (and 36).
VGG19_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
VGG19_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)


def test_vgg19_layer_indices_and_layout():
    known = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34, "relu3_3": 15}
    assert {name: VGG19_LAYER_INDICES[name] for name in known} == known
    assert [VGG19_LAYER_INDICES[n] for n in VGG19_LAYER_INDICES if n.startswith("conv")] == list(VGG19_CONVS)
    assert all(
        VGG19_LAYER_INDICES[n.replace("conv", "relu")] == i + 1
        for n, i in VGG19_LAYER_INDICES.items()
        if n.startswith("conv")
    )

    with torch.device("meta"):
        trunk = vgg19_features()
    assert len(trunk) == 36
    assert [i for i, m in enumerate(trunk) if isinstance(m, torch.nn.MaxPool2d)] == [4, 9, 18, 27]
    expected, in_channels = {}, 3
    for i, channels in zip(VGG19_CONVS, VGG19_CHANNELS, strict=True):
        expected[f"{i}.weight"], expected[f"{i}.bias"] = (channels, in_channels, 3, 3), (channels,)
        in_channels = channels
    assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == expected

    torch.manual_seed(0)
    short = vgg19_features(num_layers=8)
    torch.manual_seed(0)
    full = vgg19_features()
    assert len(short) == 8 and all(
        torch.equal(v, full.state_dict()[k]) for k, v in short.state_dict().items()
    )


def test_unknown_layer_names_are_listed():
    with pytest.raises(ValueError, match=r"conv6_1.*valid names: conv1_1, relu1_1.*relu5_4"):
        VGGPerceptualLoss({"conv6_1": 1.0}, pretrained=False)
    with pytest.raises(ValueError, match="relu3_5"):
        GramStyleLoss({"relu3_5": 1.0}, pretrained=False)


# --- VGG19 perceptual and style losses on a random trunk ---------------------------------------------


@pytest.fixture(scope="module")
def perceptual() -> VGGPerceptualLoss:
    torch.manual_seed(0)
    return VGGPerceptualLoss(pretrained=False)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _reference_taps(
    state: dict[str, torch.Tensor], x: torch.Tensor, taps: set[int]
) -> dict[int, torch.Tensor]:
    """An independent VGG19 forward: ImageNet normalisation, convs / ReLUs / pools at torchvision's indices."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h, out = ((x + 1) / 2 - mean) / std, {}
    for i in range(max(taps) + 1):
        if i in VGG19_CONVS:
            h = F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1)
        elif i in (4, 9, 18, 27):
            h = F.max_pool2d(h, 2)
        else:
            h = F.relu(h)
        if i in taps:
            out[i] = h
    return out


def test_perceptual_loss_on_random_trunk(perceptual, images):
    x, y = images
    assert len(perceptual.backbone.features) == 26  # truncated after conv4_4
    d = perceptual(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32 and (d > 0).all()
    assert torch.equal(perceptual(x, x), torch.zeros(2))

    state = perceptual.backbone.state_dict()
    weights = {"conv1_2": 1.0, "conv2_2": 0.75, "conv3_4": 0.5, "conv4_4": 0.25}
    tx = _reference_taps(state, x, {VGG19_LAYER_INDICES[n] for n in weights})
    ty = _reference_taps(state, y, {VGG19_LAYER_INDICES[n] for n in weights})
    expected = sum(
        w * (tx[VGG19_LAYER_INDICES[n]] - ty[VGG19_LAYER_INDICES[n]]).abs().mean(dim=(1, 2, 3))
        for n, w in weights.items()
    )
    torch.testing.assert_close(d, expected)


def test_conv_layers_are_pre_activation(perceptual, images):
    features = perceptual.backbone(images[0], ["conv1_2", "relu1_2"])
    assert (features["conv1_2"] < 0).any()  # an in-place ReLU would have clipped it
    torch.testing.assert_close(features["relu1_2"], features["conv1_2"].relu())


def test_other_distances_vanish_on_identical_inputs(perceptual, images):
    x, y = images
    for distance in ("l2", "cosine"):
        loss = VGGPerceptualLoss(
            {"conv2_2": 1.0, "relu3_4": 0.5}, distance=distance, backbone=perceptual.backbone
        )
        assert torch.equal(loss(x, x), torch.zeros(2)) and (loss(x, y) > 0).all()


def test_frozen_fp32_and_gradients_reach_the_fake(perceptual, images):
    x, y = images
    backbone = perceptual.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    perceptual.train()
    assert not backbone.training
    fake = y.clone().requires_grad_()
    perceptual(x, fake).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = perceptual(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, perceptual(x.bfloat16().float(), y.bfloat16().float()))


def test_style_loss_shares_the_backbone(perceptual, images):
    x, y = images
    style = GramStyleLoss(backbone=perceptual.backbone)
    assert style.backbone is perceptual.backbone
    d = style(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.equal(style(x, x), torch.zeros(2))

    index = VGG19_LAYER_INDICES["conv3_4"]
    state = perceptual.backbone.state_dict()
    gx = gram_matrix(_reference_taps(state, x, {index})[index])
    gy = gram_matrix(_reference_taps(state, y, {index})[index])
    single = GramStyleLoss({"conv3_4": 1.0}, distance="l2", backbone=perceptual.backbone)
    torch.testing.assert_close(single(x, y), (gx - gy).square().mean(dim=(1, 2)))

    with pytest.raises(ValueError, match="beyond this backbone"):
        GramStyleLoss({"conv5_1": 1.0}, backbone=perceptual.backbone)
    with pytest.raises(TypeError, match="VGG19Features"):
        GramStyleLoss(backbone=perceptual)


# --- weight loading ----------------------------------------------------------------------------------


class Downloader:
    """Stands in for torch.hub.load_state_dict_from_url: records calls, serves `files` or fails."""

    def __init__(self) -> None:
        self.files: dict[str, dict] = {}
        self.calls: list[tuple[str, str | None, bool]] = []

    def __call__(
        self, url, model_dir=None, map_location=None, progress=True, check_hash=False, file_name=None, **kw
    ):
        self.calls.append((url, file_name, check_hash))
        if url not in self.files:
            raise OSError("network disabled in tests")
        return self.files[url]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> tuple[Path, Downloader]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub = Path(torch.hub.get_dir())
    assert hub.is_relative_to(tmp_path)
    downloader = Downloader()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", downloader)
    return hub, downloader


@pytest.fixture(scope="module")
def source() -> VGG19Features:
    torch.manual_seed(2)
    return VGG19Features(["conv2_2"], pretrained=False)


@pytest.fixture(scope="module")
def torchvision_file(source, tmp_path_factory) -> Path:
    """`source`'s trunk saved like torchvision's vgg19 file (`features.N.*` plus `classifier.*`)."""
    state = {f"features.{k}": v for k, v in source.features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("vgg19") / VGG19_FILENAME
    torch.save(state, path)
    return path


def _same_trunk(backbone: VGG19Features, source: VGG19Features, images) -> None:
    assert backbone.pretrained
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in backbone.state_dict().items())
    torch.testing.assert_close(backbone(images[0], ["conv2_2"]), source(images[0], ["conv2_2"]))


def test_loads_weights_path_without_touching_the_rng(source, torchvision_file, offline_hub, images):
    torch.manual_seed(5)
    loss = VGGPerceptualLoss({"conv2_2": 1.0}, weights_path=torchvision_file)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    _same_trunk(loss.backbone, source, images)
    assert offline_hub[1].calls == []


def test_loads_from_hub_cache_then_download(source, torchvision_file, offline_hub, images):
    hub, downloader = offline_hub
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / VGG19_FILENAME).symlink_to(torchvision_file)
    _same_trunk(GramStyleLoss({"conv2_2": 1.0}).backbone, source, images)
    assert downloader.calls == []

    (hub / "checkpoints" / VGG19_FILENAME).unlink()
    downloader.files[VGG19_URL] = torch.load(torchvision_file, weights_only=True)
    _same_trunk(VGG19Features(["conv2_2"]), source, images)
    assert downloader.calls == [(VGG19_URL, VGG19_FILENAME, True)]


def test_missing_weights_raise_listing_the_places_tried(offline_hub):
    hub, downloader = offline_hub
    with pytest.raises(PerceptualWeightsUnavailable) as error:
        VGGPerceptualLoss(download=False)
    assert isinstance(error.value, LPIPSWeightsUnavailable) and isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    for needle in (
        str(hub / "checkpoints" / VGG19_FILENAME),
        VGG19_URL,
        "download=False",
        "pretrained=False",
    ):
        assert needle in message
    assert downloader.calls == []

    with pytest.raises(PerceptualWeightsUnavailable, match="network disabled"):
        VGGPerceptualLoss()
    with pytest.raises(PerceptualWeightsUnavailable, match=r"nope\.pth"):
        GramStyleLoss(weights_path=hub / "nope.pth")


def test_a_vgg16_file_is_refused(tmp_path, offline_hub):
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    torch.save(state, tmp_path / "vgg16.pth")
    with pytest.raises(ValueError, match="another VGG"):
        VGGPerceptualLoss(weights_path=tmp_path / "vgg16.pth")
