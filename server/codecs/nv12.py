"""RGB <-> NV12 in plain torch (runs on the GPU next to NVENC/NVDEC, and on
the CPU for tests), plus the frame geometry of the hardware round trip.

NV12 is what NVENC takes and NVDEC gives: a full-resolution Y plane followed
by one half-resolution plane of interleaved U, V samples; as a tensor,
uint8 ``(N, 3 * H // 2, W)`` (rows ``[0, H)`` are Y, rows ``[H, 3H/2)`` are
``U0 V0 U1 V1 ...``), the layout PyNvVideoCodec exchanges over DLPack.

The conversions copy what libswscale does in the software path (BT.601,
limited range, ``SWS_BICUBIC``), measured with PyAV's swscale on CPU:

* RGB -> YUV: ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``,
  ``U = 128 + (-37.797 R - 74.203 G + 112 B) / 255``,
  ``V = 128 + (112 R - 93.786 G - 18.214 B) / 255``, rounded.  Chroma is
  subsampled the way swscale does it for RGB input: the two pixels of each
  horizontal pair are averaged (so chroma sits between them), then the
  columns are downscaled 2:1 vertically with swscale's bicubic filter
  (Keys cubic, a = -0.6, stretched x2 for the downscale: 8 taps
  ``[-0.0141, -0.0422, 0.1203, 0.4359, 0.4359, 0.1203, -0.0422, -0.0141]``;
  a least-squares fit on swscale's output gives the same weights to 1e-4)
  with edges replicated.  Against swscale: Y and UV within 1 level.
* YUV -> RGB: each chroma sample serves its 2x2 block (what swscale's
  unscaled yuv420p -> rgb24 converter does: no chroma interpolation), then
  the inverse matrix.  swscale's table-based converter is about one level
  darker than the exact formula; ``rounding="swscale"`` (default) mimics it
  as ``floor(x - 1)`` (within 1 level of swscale, 70 % exact),
  ``rounding="nearest"`` gives the exactly rounded formula.

Everything is vectorised over the batch; no Python loop over pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.degradation.video import VideoParams, aspect_width

# BT.601 limited range ("studio swing"), 8 bit.
_RGB_TO_Y = (65.481 / 255, 128.553 / 255, 24.966 / 255)
_RGB_TO_U = (-37.797 / 255, -74.203 / 255, 112.0 / 255)
_RGB_TO_V = (112.0 / 255, -93.786 / 255, -18.214 / 255)
_Y_SCALE = 255 / 219
_C_SCALE = 255 / 224
# R = Y' + 1.402 V'; G = Y' - 0.344136 U' - 0.714136 V'; B = Y' + 1.772 U'
_KR, _KB = 0.299, 0.114
_KG = 1 - _KR - _KB
_V_TO_R = 2 * (1 - _KR)
_U_TO_G = -2 * (1 - _KB) * _KB / _KG
_V_TO_G = -2 * (1 - _KR) * _KR / _KG
_U_TO_B = 2 * (1 - _KB)

#: swscale's bicubic coefficient (``SWS_BICUBIC``, param C = 0.6).
SWS_BICUBIC_A = -0.6

CHROMA_FILTERS = ("swscale", "box")
ROUNDINGS = ("swscale", "nearest")


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x < 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def chroma_taps(kind: str = "swscale") -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Row offsets (relative to ``2j``) and weights of the 2:1 vertical filter
    that makes chroma row ``j``; weights sum to 1."""
    if kind == "box":
        return (0, 1), (0.5, 0.5)
    if kind != "swscale":
        raise ValueError(f"chroma filter must be one of {CHROMA_FILTERS}, got {kind!r}")
    offsets = tuple(range(-3, 5))
    # Output row j is centred at source row 2j + 0.5; the kernel is stretched x2.
    w = [_cubic((o - 0.5) / 2, SWS_BICUBIC_A) for o in offsets]
    s = sum(w)
    return offsets, tuple(v / s for v in w)


def _check_rgb(rgb: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(rgb, torch.Tensor) or rgb.dtype != torch.uint8 or rgb.ndim != 4 or rgb.shape[3] != 3:
        got = f"{rgb.dtype} {tuple(rgb.shape)}" if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"need a uint8 (N, H, W, 3) RGB tensor, got {got}")
    n, h, w, _ = rgb.shape
    if h % 2 or w % 2 or h < 2 or w < 2:
        raise ValueError(f"NV12 needs even sizes of at least 2x2, got {h}x{w}")
    return n, h, w


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8)


def _mix(c: torch.Tensor, k: tuple[float, float, float]) -> torch.Tensor:
    """``k . (R, G, B)`` over the channel dim of a (N, 3, H, W) float tensor."""
    return c[:, 0] * k[0] + c[:, 1] * k[1] + c[:, 2] * k[2]


def rgb_to_nv12(rgb: torch.Tensor, chroma_filter: str = "swscale") -> torch.Tensor:
    """uint8 RGB ``(N, H, W, 3)`` (H, W even) -> uint8 NV12 ``(N, 3H/2, W)``.

    ``chroma_filter``: ``"swscale"`` (pair average + 8-tap bicubic vertical,
    the software path's chroma) or ``"box"`` (plain 2x2 average).
    Runs on whatever device ``rgb`` is on; float32 internally.
    """
    n, h, w = _check_rgb(rgb)
    c = rgb.permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W)
    y = _round_u8(16.0 + _mix(c, _RGB_TO_Y))  # (N, H, W)

    pairs = 0.5 * (c[..., 0::2] + c[..., 1::2])  # (N, 3, H, W/2)
    offsets, weights = chroma_taps(chroma_filter)
    rows = torch.arange(h // 2, device=rgb.device) * 2
    sub = None
    for o, wt in zip(offsets, weights):
        idx = (rows + o).clamp_(0, h - 1)  # replicate the edges
        term = pairs.index_select(2, idx) * wt
        sub = term if sub is None else sub + term
    u = _round_u8(128.0 + _mix(sub, _RGB_TO_U))  # (N, H/2, W/2)
    v = _round_u8(128.0 + _mix(sub, _RGB_TO_V))
    uv = torch.stack((u, v), dim=-1).reshape(n, h // 2, w)
    return torch.cat((y, uv), dim=1).contiguous()


def _check_nv12(nv12: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(nv12, torch.Tensor) or nv12.dtype != torch.uint8 or nv12.ndim != 3:
        got = f"{nv12.dtype} {tuple(nv12.shape)}" if isinstance(nv12, torch.Tensor) else type(nv12).__name__
        raise ValueError(f"need a uint8 (N, 3H/2, W) NV12 tensor, got {got}")
    n, rows, w = nv12.shape
    if rows % 3 or w % 2:
        raise ValueError(f"not an NV12 batch: shape {tuple(nv12.shape)}")
    h = rows * 2 // 3
    if h % 2 or h < 2 or w < 2:
        raise ValueError(f"not an NV12 batch: shape {tuple(nv12.shape)}")
    return n, h, w


def nv12_planes(nv12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y ``(N, H, W)``, U and V ``(N, H/2, W/2)`` views of an NV12 batch."""
    n, h, w = _check_nv12(nv12)
    uv = nv12[:, h:].reshape(n, h // 2, w // 2, 2)
    return nv12[:, :h], uv[..., 0], uv[..., 1]


def nv12_to_rgb(nv12: torch.Tensor, rounding: str = "swscale") -> torch.Tensor:
    """uint8 NV12 ``(N, 3H/2, W)`` -> uint8 RGB ``(N, H, W, 3)``.

    Nearest chroma (each sample covers its 2x2 block), BT.601 limited
    range; ``rounding`` as in the module docstring.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    y, u, v = nv12_planes(nv12)
    yf = (y.to(torch.float32) - 16.0) * _Y_SCALE
    uf = (u.to(torch.float32) - 128.0) * _C_SCALE
    vf = (v.to(torch.float32) - 128.0) * _C_SCALE
    uf = uf.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    vf = vf.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    rgb = torch.stack((yf + _V_TO_R * vf, yf + _U_TO_G * uf + _V_TO_G * vf, yf + _U_TO_B * uf), dim=-1)
    if rounding == "swscale":
        return torch.floor(rgb - 1.0).clamp_(0, 255).to(torch.uint8)
    return _round_u8(rgb)


def nv12_to_yuv420p(nv12: torch.Tensor) -> torch.Tensor:
    """NV12 ``(N, 3H/2, W)`` -> PyAV's packed yuv420p array layout, same shape
    (the Y plane, then all of U, then all of V; lossless)."""
    y, u, v = nv12_planes(nv12)
    n = nv12.shape[0]
    flat = torch.cat((y.reshape(n, -1), u.reshape(n, -1), v.reshape(n, -1)), dim=1)
    return flat.reshape(nv12.shape)


def yuv420p_to_nv12(yuv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nv12_to_yuv420p` (lossless)."""
    n, h, w = _check_nv12(yuv)
    flat = yuv.reshape(n, -1)
    ys, cs = h * w, (h // 2) * (w // 2)
    y = flat[:, :ys].reshape(n, h, w)
    u = flat[:, ys : ys + cs].reshape(n, h // 2, w // 2)
    v = flat[:, ys + cs :].reshape(n, h // 2, w // 2)
    uv = torch.stack((u, v), dim=-1).reshape(n, h // 2, w)
    return torch.cat((y, uv), dim=1).contiguous()


# --- geometry: pad up to the hardware minimum, crop back ---------------------


def _even_up(x: int) -> int:
    return x + (x & 1)


@dataclass(frozen=True)
class HwGeometry:
    """Sizes of one hardware round trip.

    Frames ``h`` x ``w`` are resized to ``h`` x ``content_w`` (aspect ratio,
    spec section 6), padded (reflect) to the coded ``enc_h`` x ``enc_w``
    (even, and at least the encoder's and decoder's minimum), coded, cropped
    back to ``h`` x ``content_w`` and resized to ``h`` x ``w``.
    """

    h: int
    w: int
    content_w: int
    enc_w: int
    enc_h: int

    @property
    def resized(self) -> bool:
        return self.content_w != self.w

    @property
    def padded(self) -> bool:
        return self.enc_w != self.content_w or self.enc_h != self.h


def hw_geometry(h: int, w: int, params: VideoParams, min_size: tuple[int, int] = (2, 2)) -> HwGeometry:
    """Geometry for ``h`` x ``w`` frames; ``min_size`` is (width, height)."""
    content_w = aspect_width(w, params.aspect_ratio)
    enc_w = _even_up(max(content_w, int(min_size[0]), 2))
    enc_h = _even_up(max(h, int(min_size[1]), 2))
    return HwGeometry(h=h, w=w, content_w=content_w, enc_w=enc_w, enc_h=enc_h)


def reflect_index(n: int, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices ``0..size-1`` folded into ``[0, n)`` by mirror reflection without
    repeating the edge (numpy's ``"reflect"``), for any ``size`` (padding
    wider than the image reflects again, as ``np.pad`` does)."""
    i = torch.arange(size, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    j = i % period
    return torch.where(j >= n, period - j, j)


def pad_reflect(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad NHWC ``frames`` at the bottom and right to ``height`` x ``width``
    by reflection (``np.pad(mode="reflect")``); unchanged when already that
    size."""
    n, h, w = frames.shape[:3]
    if height < h or width < w:
        raise ValueError(f"cannot pad {h}x{w} down to {height}x{width}")
    if (h, w) == (height, width):
        return frames
    out = frames
    if height != h:
        out = out.index_select(1, reflect_index(h, height, frames.device))
    if width != w:
        out = out.index_select(2, reflect_index(w, width, frames.device))
    return out


def crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Top-left ``height`` x ``width`` of NHWC ``frames``."""
    return frames[:, :height, :width]


def resize_rgb(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic NHWC uint8 resize (antialiased when shrinking), torch's
    kernel: close to, not the same as, swscale's (a = -0.75 vs -0.6)."""
    if frames.shape[1:3] == (height, width):
        return frames
    t = frames.permute(0, 3, 1, 2).to(torch.float32)
    t = F.interpolate(t, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return torch.floor(t + 0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two uint8 tensors of the same shape."""
    mse = torch.mean((a.to(torch.float64) - b.to(torch.float64)) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


__all__ = [
    "CHROMA_FILTERS",
    "HwGeometry",
    "ROUNDINGS",
    "chroma_taps",
    "crop",
    "hw_geometry",
    "nv12_planes",
    "nv12_to_rgb",
    "nv12_to_yuv420p",
    "pad_reflect",
    "psnr",
    "reflect_index",
    "resize_rgb",
    "rgb_to_nv12",
    "yuv420p_to_nv12",
]
