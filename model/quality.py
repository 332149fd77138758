"""Full-reference image quality: PSNR and SSIM on RGB tensors in [0, 1] (N, 3, H, W).

SSIM is Wang et al. (2004) with the usual 11-tap Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, computed per channel and averaged; both metrics can
crop a border (``crop``, e.g. the scale) as SR papers do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    return x[..., crop:-crop, crop:-crop] if crop > 0 else x


def psnr(a: torch.Tensor, b: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """PSNR in dB per image (N,), for images in [0, 1]."""
    a, b = _crop(a.float(), crop), _crop(b.float(), crop)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def _gauss(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g


def ssim(a: torch.Tensor, b: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """Mean SSIM per image (N,), for images in [0, 1]."""
    a, b = _crop(a.float(), crop), _crop(b.float(), crop)
    c = a.shape[1]
    g = _gauss(device=a.device)
    kh = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable, 'valid' like the reference implementation
        return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return m.flatten(1).mean(1)
