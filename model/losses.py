"""Training losses of VCISR / Real-ESRGAN: L1, VGG-19 perceptual, vanilla GAN.

Semantics follow BasicSR (what Real-ESRGAN and VCISR train with):

* ``L1Loss``: mean absolute error times ``loss_weight`` (1.0).
* ``PerceptualLoss``: VGG-19 features *before* the ReLU ("conv" layers) of
  ImageNet-normalised inputs in [0, 1]; sum over layers of
  ``weight * L1(features(x), features(gt))``, times ``perceptual_weight``
  (1.0). Default layers and weights: conv1_2 0.1, conv2_2 0.1, conv3_4 1,
  conv4_4 1, conv5_4 1. The ground truth goes through the network without
  gradient. No style term (VCISR's style weight is 0).
* ``GANLoss``: vanilla GAN, binary cross-entropy with logits against a constant
  real (1.0) or fake (0.0) label; the generator's term is multiplied by
  ``loss_weight`` (0.1), the discriminator's is not.

The VGG-19 weights are torchvision's ``vgg19-dcbb9e9d.pth`` state dict, read
from a local file: nothing is downloaded at run time. Where it is looked for:
the ``weights_path`` argument, else ``$DEGRADE_VGG19_WEIGHTS``, else torch
hub's cache (``~/.cache/torch/hub/checkpoints/vgg19-dcbb9e9d.pth``, where
``torchvision.models.vgg19(weights="IMAGENET1K_V1")`` would have stored it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_LAYER_WEIGHTS",
    "GANLoss",
    "L1Loss",
    "PerceptualLoss",
    "VGG19Features",
    "VGG19_ENV",
    "VGG19_FILENAME",
    "VGG19_URL",
    "VGGWeightsNotFoundError",
    "default_vgg19_path",
    "resolve_vgg19_weights",
]

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILENAME = "vgg19-dcbb9e9d.pth"
VGG19_ENV = "DEGRADE_VGG19_WEIGHTS"

#: Real-ESRGAN / VCISR perceptual layer weights.
DEFAULT_LAYER_WEIGHTS: dict[str, float] = {
    "conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0,
}  # fmt: skip

# torchvision's vgg19 "features": channels per conv, "M" = 2x2 max pool.
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_layer_names() -> list[str]:
    """Names of the entries of torchvision's ``vgg19().features`` in order: conv1_1,
    relu1_1, conv1_2, relu1_2, pool1, conv2_1, ... (index = position in ``features``)."""
    names, block, n = [], 1, 1
    for v in _VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, n = block + 1, 1
        else:
            names += [f"conv{block}_{n}", f"relu{block}_{n}"]
            n += 1
    return names


VGG19_LAYER_NAMES: tuple[str, ...] = tuple(_vgg19_layer_names())


class VGGWeightsNotFoundError(FileNotFoundError):
    """The VGG-19 weights file for the perceptual loss is missing."""


def default_vgg19_path() -> Path:
    """torch hub's checkpoint cache, where torchvision itself keeps the file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILENAME


def resolve_vgg19_weights(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """The VGG-19 weights file to use: ``weights_path``, else ``$DEGRADE_VGG19_WEIGHTS``,
    else ``default_vgg19_path()``. Raises ``VGGWeightsNotFoundError`` (saying how to get
    the file) when the chosen file does not exist."""
    if weights_path is not None:
        path, source = Path(weights_path).expanduser(), "the weights_path argument"
    elif os.environ.get(VGG19_ENV):
        path, source = Path(os.environ[VGG19_ENV]).expanduser(), f"${VGG19_ENV}"
    else:
        path, source = default_vgg19_path(), f"the default location (no weights_path, ${VGG19_ENV} unset)"
    if not path.is_file():
        default = default_vgg19_path()
        raise VGGWeightsNotFoundError(
            f"VGG-19 weights for the perceptual loss not found: {path} (from {source}).\n"
            f"The perceptual loss needs torchvision's ImageNet VGG-19 state dict, {VGG19_FILENAME} "
            f"(548 MB); nothing is downloaded at run time. Get it on a machine with internet access:\n"
            f"    curl -L --create-dirs -o {default} {VGG19_URL}\n"
            f"and either keep it at {default}, or set {VGG19_ENV}=/path/to/{VGG19_FILENAME}, "
            f"or pass its path as weights_path."
        )
    return path


class VGG19Features(nn.Module):
    """torchvision's VGG-19 ``features`` up to the deepest requested layer; returns the
    requested layers' outputs by BasicSR name (``conv3_4`` = before ``relu3_4``).

    The sub-module ``features`` has torchvision's indices, so its state dict keys are
    torchvision's (``features.34.weight`` ...). Parameters are frozen.
    """

    def __init__(
        self,
        layers: list[str] | tuple[str, ...],
        weights_path: str | os.PathLike[str] | None = None,
        *,
        random_weights: bool = False,
        generator: torch.Generator | int | None = None,
        use_input_norm: bool = True,
        range_norm: bool = False,
    ) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG19_LAYER_NAMES]
        if not layers:
            raise ValueError("VGG19Features needs at least one layer name, e.g. 'conv5_4'")
        if unknown:
            raise ValueError(f"unknown VGG-19 layer(s) {unknown}; known: {', '.join(VGG19_LAYER_NAMES)}")
        self.layers = tuple(layers)
        last = max(VGG19_LAYER_NAMES.index(n) for n in layers)
        mods: list[nn.Module] = []
        widths = iter(v for v in _VGG19_CFG if v != "M")
        cin = 3
        for name in VGG19_LAYER_NAMES[: last + 1]:
            if name.startswith("conv"):
                cout = next(widths)
                mods.append(nn.Conv2d(cin, cout, 3, 1, 1))
                cin = cout
            elif name.startswith("relu"):
                mods.append(nn.ReLU(inplace=False))  # keeps the conv output intact (it may be a feature)
            else:
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*mods)
        self._take = {VGG19_LAYER_NAMES.index(n): n for n in layers}
        self.use_input_norm = use_input_norm
        self.range_norm = range_norm
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        if random_weights:
            self._random_init(generator)
        else:
            self.weights_path = resolve_vgg19_weights(weights_path)
            self._load(self.weights_path)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _random_init(self, generator: torch.Generator | int | None) -> None:
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
        with torch.no_grad():
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
                    m.bias.normal_(0.0, 0.01, generator=generator)

    def _load(self, path: Path) -> None:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt / truncated download
            raise ValueError(f"cannot read VGG-19 weights {path}: {e}. Re-download {VGG19_URL}") from e
        if isinstance(sd, Mapping) and "state_dict" in sd:
            sd = sd["state_dict"]
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or bad:
            raise ValueError(
                f"{path} is not torchvision's VGG-19 state dict ({VGG19_FILENAME}, {VGG19_URL}): "
                f"missing {missing[:4]}, wrong shape {bad[:4]}"
            )
        self.load_state_dict({k: sd[k] for k in own}, strict=True)

    def train(self, mode: bool = True) -> VGG19Features:
        return super().train(False)  # a fixed feature extractor, whatever its parent does

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.range_norm:
            x = (x + 1) / 2
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        out = {}
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self._take:
                out[self._take[i]] = x
        return out


class PerceptualLoss(nn.Module):
    """BasicSR's ``PerceptualLoss`` with VGG-19 and an L1 criterion (see module docstring).

    ``random_weights=True`` (with ``generator``: a ``torch.Generator`` or an int seed)
    builds the network with random weights instead of reading the file - for tests only.
    """

    def __init__(
        self,
        layer_weights: Mapping[str, float] | None = None,
        weights_path: str | os.PathLike[str] | None = None,
        *,
        perceptual_weight: float = 1.0,
        use_input_norm: bool = True,
        range_norm: bool = False,
        random_weights: bool = False,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        self.layer_weights = dict(DEFAULT_LAYER_WEIGHTS if layer_weights is None else layer_weights)
        self.perceptual_weight = float(perceptual_weight)
        self.vgg = VGG19Features(
            list(self.layer_weights),
            weights_path,
            random_weights=random_weights,
            generator=generator,
            use_input_norm=use_input_norm,
            range_norm=range_norm,
        )

    def forward(self, x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        feats = self.vgg(x)
        with torch.no_grad():
            gt_feats = self.vgg(gt.detach())
        loss = x.new_zeros((), dtype=torch.float32)
        for name, w in self.layer_weights.items():
            loss = loss + F.l1_loss(feats[name].float(), gt_feats[name].float()) * w
        return loss * self.perceptual_weight


class L1Loss(nn.Module):
    """``loss_weight * mean(|pred - target|)`` (BasicSR ``L1Loss``)."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
        self.loss_weight = float(loss_weight)
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * F.l1_loss(pred, target, reduction=self.reduction)


class GANLoss(nn.Module):
    """Vanilla GAN loss (Real-ESRGAN): BCE with logits against a constant label.

    ``forward(logits, target_is_real, is_disc=False)``: the generator's loss is
    ``loss_weight * BCE(logits, real_label)``; for the discriminator (``is_disc=True``)
    the weight is not applied.
    """

    def __init__(self, loss_weight: float = 0.1, real_label_val: float = 1.0, fake_label_val: float = 0.0) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)
        self.real_label_val = float(real_label_val)
        self.fake_label_val = float(fake_label_val)

    def forward(self, logits: torch.Tensor, target_is_real: bool, is_disc: bool = False) -> torch.Tensor:
        label = self.real_label_val if target_is_real else self.fake_label_val
        loss = F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, label, dtype=torch.float32))
        return loss if is_disc else loss * self.loss_weight
