"""Real-ESRGAN's U-Net discriminator with spectral normalisation (``UNetDiscriminatorSN``),
the discriminator VCISR's GAN stage trains.

Three stride-2 4x4 convolutions down (64 -> 128 -> 256 -> 512 channels), three
bilinear x2 upsamplings each followed by a 3x3 convolution, with skip additions
from the encoder, two more 3x3 convolutions and a 1-channel 3x3 head: a
per-pixel realness logit map at the input resolution. LeakyReLU(0.2) after
every convolution but the last; spectral norm on every convolution except the
first and the last.

Spectral norm is ``torch.nn.utils.spectral_norm`` (one power iteration per
training forward), so the state dict keys are Real-ESRGAN's
(``conv1.weight_orig``, ``conv1.weight_u``, ``conv1.weight_v``, ...) and its
released discriminator weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

__all__ = ["UNetDiscriminatorSN"]


class UNetDiscriminatorSN(nn.Module):
    """U-Net discriminator with spectral norm. Input ``(B, C, H, W)`` with H and W
    multiples of 8; output ``(B, 1, H, W)`` logits."""

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True) -> None:
        super().__init__()
        self.skip_connection = skip_connection
        f = num_feat

        def sn_conv(cin: int, cout: int, k: int, stride: int) -> nn.Module:
            return spectral_norm(nn.Conv2d(cin, cout, k, stride, 1, bias=False))

        self.conv0 = nn.Conv2d(num_in_ch, f, 3, 1, 1)
        # encoder
        self.conv1 = sn_conv(f, 2 * f, 4, 2)
        self.conv2 = sn_conv(2 * f, 4 * f, 4, 2)
        self.conv3 = sn_conv(4 * f, 8 * f, 4, 2)
        # decoder
        self.conv4 = sn_conv(8 * f, 4 * f, 3, 1)
        self.conv5 = sn_conv(4 * f, 2 * f, 3, 1)
        self.conv6 = sn_conv(2 * f, f, 3, 1)
        # head
        self.conv7 = sn_conv(f, f, 3, 1)
        self.conv8 = sn_conv(f, f, 3, 1)
        self.conv9 = nn.Conv2d(f, 1, 3, 1, 1)

    @staticmethod
    def _act(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, negative_slope=0.2)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, up = self._act, self._up
        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))

        y = act(self.conv4(up(x3)))
        if self.skip_connection:
            y = y + x2
        y = act(self.conv5(up(y)))
        if self.skip_connection:
            y = y + x1
        y = act(self.conv6(up(y)))
        if self.skip_connection:
            y = y + x0

        y = act(self.conv7(y))
        y = act(self.conv8(y))
        return self.conv9(y)
