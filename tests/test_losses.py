"""Losses (model/losses.py) and the U-Net discriminator (model/discriminator.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.discriminator import UNetDiscriminatorSN
from model.losses import (
    DEFAULT_LAYER_WEIGHTS,
    VGG19_ENV,
    VGG19_FILENAME,
    VGG19_LAYER_NAMES,
    VGG19_URL,
    GANLoss,
    L1Loss,
    PerceptualLoss,
    VGG19Features,
    VGGWeightsNotFoundError,
)


@pytest.fixture(scope="module")
def percep() -> PerceptualLoss:
    return PerceptualLoss(random_weights=True, generator=torch.Generator().manual_seed(0))


def _images(n: int = 1, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    return x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------ perceptual


def test_layer_names_are_torchvision_indices():
    # BasicSR's names for torchvision's vgg19().features (conv = before the ReLU).
    assert [VGG19_LAYER_NAMES.index(n) for n in DEFAULT_LAYER_WEIGHTS] == [2, 7, 16, 25, 34]
    assert DEFAULT_LAYER_WEIGHTS == {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}


def test_perceptual_zero_for_identical_and_positive_otherwise(percep):
    x, y = _images()
    assert percep(x, x.clone()).item() == 0.0
    assert percep(x, y).item() > 0.0


def test_perceptual_gradients_reach_the_input_only(percep):
    x, y = _images()
    x.requires_grad_(True)
    y.requires_grad_(True)
    percep(x, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert y.grad is None  # the target is detached, as in BasicSR
    assert all(p.grad is None and not p.requires_grad for p in percep.parameters())


def test_perceptual_equals_manual_weighted_sum(percep):
    x, y = _images(2, seed=1)
    vgg = percep.vgg
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(img):  # plain walk through the conv stack, features before the ReLU
        out, h = {}, (img - mean) / std
        for i, m in enumerate(vgg.features):
            h = m(h)
            if VGG19_LAYER_NAMES[i] in DEFAULT_LAYER_WEIGHTS:
                out[VGG19_LAYER_NAMES[i]] = h.clone()
        return out

    with torch.no_grad():
        fx, fy = feats(x), feats(y)
        per_layer = {k: (fx[k] - fy[k]).abs().mean() for k in DEFAULT_LAYER_WEIGHTS}
        expected = sum(w * per_layer[k] for k, w in DEFAULT_LAYER_WEIGHTS.items())
        assert percep(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
        # the weights are applied per layer: reweighted loss = reweighted sum
        custom = {"conv1_2": 2.0, "conv4_4": 0.5}
        gen = torch.Generator().manual_seed(0)  # the same random VGG as the fixture's
        other = PerceptualLoss(custom, random_weights=True, generator=gen, perceptual_weight=3.0)
        want = 3.0 * (2.0 * per_layer["conv1_2"] + 0.5 * per_layer["conv4_4"])
        assert other(x, y).item() == pytest.approx(want.item(), rel=1e-5)
        assert len(other.vgg.features) == VGG19_LAYER_NAMES.index("conv4_4") + 1  # only what is needed


def test_weights_file_loads_from_argument_and_env(tmp_path, monkeypatch):
    layers = {"conv1_2": 1.0}
    donor = VGG19Features(list(layers), random_weights=True, generator=7)
    sd = {k: v.clone() for k, v in donor.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # extra torchvision keys are ignored
    path = tmp_path / VGG19_FILENAME
    torch.save(sd, path)
    a = PerceptualLoss(layers, weights_path=path)
    monkeypatch.setenv(VGG19_ENV, str(path))
    b = PerceptualLoss(layers)
    for loss in (a, b):
        assert torch.equal(loss.vgg.features[2].weight, donor.features[2].weight)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not torchvision's VGG-19"):
        PerceptualLoss(layers, weights_path=tmp_path / "bad.pth")


@pytest.mark.parametrize("how", ["argument", "env", "default"])
def test_missing_weights_file_says_how_to_get_it(tmp_path, monkeypatch, how):
    monkeypatch.delenv(VGG19_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache
    missing = tmp_path / "nowhere" / VGG19_FILENAME
    kwargs = {}
    if how == "argument":
        kwargs["weights_path"] = missing
    elif how == "env":
        monkeypatch.setenv(VGG19_ENV, str(missing))
    with pytest.raises(VGGWeightsNotFoundError) as info:
        PerceptualLoss({"conv1_2": 1.0}, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert VGG19_FILENAME in msg and VGG19_URL in msg and VGG19_ENV in msg
    expected_path = missing if how != "default" else tmp_path / "torch_home" / "hub" / "checkpoints" / VGG19_FILENAME
    assert str(expected_path) in msg


# ------------------------------------------------------------------ L1 / GAN


def test_l1_loss():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    assert L1Loss()(a, b).item() == pytest.approx(0.5)
    assert L1Loss(loss_weight=2.0)(a, b).item() == pytest.approx(1.0)


def test_gan_loss_on_known_logits():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    softplus = [math.log1p(math.exp(-v)) for v in (0.0, 2.0, -1.0, 3.0)]  # -log(sigmoid(v))
    real = sum(softplus) / 4
    fake = sum(math.log1p(math.exp(v)) for v in (0.0, 2.0, -1.0, 3.0)) / 4  # -log(1 - sigmoid(v))
    gan = GANLoss()
    assert gan.loss_weight == 0.1
    assert gan(logits, True).item() == pytest.approx(0.1 * real, rel=1e-6)  # generator: weighted
    assert gan(logits, True, is_disc=True).item() == pytest.approx(real, rel=1e-6)  # discriminator: not
    assert gan(logits, False, is_disc=True).item() == pytest.approx(fake, rel=1e-6)
    assert gan(torch.zeros(4), True, is_disc=True).item() == pytest.approx(math.log(2))
    smooth = GANLoss(loss_weight=1.0, real_label_val=0.9)
    assert smooth(logits, True).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.9)).item()
    )


# ------------------------------------------------------------------ discriminator


def test_discriminator_shape_params_and_spectral_norm():
    torch.manual_seed(0)
    d = UNetDiscriminatorSN(3, num_feat=64, skip_connection=True)
    assert sum(p.numel() for p in d.parameters()) == 4_376_897  # Real-ESRGAN's net_d
    sd = d.state_dict()
    for i in range(1, 9):  # spectral norm on conv1..conv8, Real-ESRGAN's key names
        assert {f"conv{i}.weight_orig", f"conv{i}.weight_u", f"conv{i}.weight_v"} <= set(sd)
    assert "conv0.weight" in sd and "conv9.weight" in sd and "conv0.weight_orig" not in sd
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = d(x)
    assert out.shape == (2, 1, 32, 32)
    out.mean().backward()
    assert x.grad is not None and d.conv1.weight_orig.grad is not None


def test_spectral_norm_bounds_the_weights():
    torch.manual_seed(0)
    d = UNetDiscriminatorSN(3, num_feat=8).train()
    with torch.no_grad():
        for _ in range(30):  # power iterations converge
            d(torch.rand(1, 3, 8, 8))
    for i in range(1, 9):
        w = getattr(d, f"conv{i}").weight
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.05)


def test_discriminator_without_skips():
    d = UNetDiscriminatorSN(3, num_feat=16, skip_connection=False)
    assert d(torch.rand(1, 3, 16, 24)).shape == (1, 1, 16, 24)
