"""JPEG round trip (spec 3.4 and the V1 ending of 4.4), per patch quality.

Two implementations (the swap is the one change of method the spec allows;
the engine records which one ran):

* ``libjpeg`` - a real codec: libjpeg-turbo through ``torchvision.io``
  (``encode_jpeg`` / ``decode_jpeg``), baseline, 4:2:0 chroma subsampling
  (libjpeg's default; checked by ``tests/test_jpeg.py`` in the SOF0 header),
  integer quality.  The input is clamped to [0, 1] and rounded to uint8 first.
  (torchvision 0.29 deprecates its JPEG functions; if they disappear, Pillow's
  libjpeg is used with the same settings.)
  CUDA tensors are coded on the CPU and moved back: torchvision's nvJPEG
  *encoder* is hard-wired to 4:4:4 sampling (``encode_jpegs_cuda.cpp`` sets
  ``NVJPEG_CSS_444``), which would not match DiffJPEG / libjpeg's 4:2:0.
* ``diffjpeg`` - kornia's differentiable DCT-quantise round trip
  (``kornia.enhance.jpeg_codec_differentiable``, float quality, 4:2:0 by
  antialiased bilinear chroma downsampling).  Any ``H, W``: the image is padded
  (replicate, bottom/right, as JPEG does) to a multiple of 16 and cropped
  back.  Runs on the input's device.

Both return float in [0, 1] with the input's shape, dtype and device.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["JPEG_IMPLS", "from_uint8", "jpeg_roundtrip", "jpeg_backend", "to_uint8"]

JPEG_IMPLS = ("libjpeg", "diffjpeg")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``round(clamp(x, 0, 1) * 255)`` as uint8 (the codec boundary of the spec)."""
    return x.detach().clamp(0, 1).mul(255).round_().to(torch.uint8)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _u8_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``v / 255`` for ``v = 0..255``: divided in float64, rounded once to ``dtype``."""
    key = (dtype, device)
    table = _TABLES.get(key)
    if table is None:
        table = (torch.arange(256, dtype=torch.float64) / 255.0).to(dtype).to(device)
        _TABLES[key] = table
    return table


def from_uint8(u8: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``u8 / 255`` as ``dtype``, the same bits on every device.

    A 256-entry table indexed by the values, not a division: CUDA divides
    by a Python scalar by multiplying with its reciprocal, which is 1 ulp
    off the correctly rounded quotient for some values (and the CPU's true
    division is not), so CUDA and CPU results would differ.  The table
    holds the correctly rounded quotients (for float32 exactly what the
    CPU's ``float32 / 255.0`` gives).  ``out``: write into this tensor
    (contiguous, ``u8``'s shape) instead of a new one.
    """
    if u8.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {u8.dtype}")
    table = _u8_table(dtype, u8.device)
    if out is None:
        out = torch.empty(u8.shape, dtype=dtype, device=u8.device)
    flat, dest = u8.reshape(-1), out.view(-1)
    # in slices, so the int32 indices never take 4 bytes per value of a whole HR chunk at once
    for lo in range(0, flat.numel(), _FROM_U8_SLICE):
        hi = min(lo + _FROM_U8_SLICE, flat.numel())
        torch.index_select(table, 0, flat[lo:hi].to(torch.int32), out=dest[lo:hi])
    return out


#: values converted per index_select in :func:`from_uint8` (16 MB of int32 indices)
_FROM_U8_SLICE = 1 << 22


def _qualities(quality, n: int) -> list[float]:
    q = torch.as_tensor(quality, dtype=torch.float64).detach().cpu()
    if q.dim() == 0:
        q = q.expand(n)
    q = q.reshape(-1)
    if q.numel() != n:
        raise ValueError(f"{q.numel()} qualities for {n} images")
    if bool(((q < 0) | (q > 100)).any()):
        raise ValueError(f"JPEG quality must be in [0, 100], got {q.tolist()}")
    return q.tolist()


def jpeg_backend(device, impl: str = "libjpeg") -> str:
    """Name of the codec :func:`jpeg_roundtrip` uses for ``impl`` on ``device``
    (for the per-patch record): ``libjpeg-turbo`` or ``kornia-diffjpeg``."""
    if impl == "libjpeg":
        return "libjpeg-turbo"
    if impl == "diffjpeg":
        return "kornia-diffjpeg"
    raise ValueError(f"unknown JPEG implementation {impl!r}; choose one of {JPEG_IMPLS}")


def jpeg_roundtrip(x: torch.Tensor, quality, impl: str = "libjpeg") -> torch.Tensor:
    """JPEG-encode then decode every patch of ``x (B, 3, H, W)`` at its own quality.

    ``quality``: ``(B,)`` tensor/list or a scalar, in [0, 100].  ``libjpeg``:
    real libjpeg-turbo round trip of ``round(clamp(x)*255)`` at quality
    ``floor(q + 0.5)`` (minimum 1), returns ``decoded / 255``
    (:func:`from_uint8`: the same bits on CPU and CUDA).  ``diffjpeg``:
    kornia's DiffJPEG of ``clamp(x, 0, 1)`` at float quality, clamped to
    [0, 1].  Deterministic.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be (B, 3, H, W), got {tuple(x.shape)}")
    bsz = x.shape[0]
    qs = _qualities(quality, bsz)
    jpeg_backend(x.device, impl)  # validates impl
    if bsz == 0:
        return x.clone()
    if impl == "libjpeg":
        return _libjpeg(x, qs)
    return _diffjpeg(x, qs)


def _codec():
    """torchvision's libjpeg-turbo bindings, or None (then Pillow's libjpeg is used)."""
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
    except (ImportError, AttributeError):  # pragma: no cover - removed in a future torchvision
        return None
    return encode_jpeg, decode_jpeg


_USE_PILLOW = False  # tests flip this to exercise the fallback


def _pillow_roundtrip(u8: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(u8.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality, subsampling=2)
    dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(dec.copy()).permute(2, 0, 1)


def _libjpeg(x: torch.Tensor, qs: list[float]) -> torch.Tensor:
    iq = [max(1, min(100, int(math.floor(q + 0.5)))) for q in qs]
    on_cpu = x.device.type == "cpu"
    if on_cpu:  # patch by patch: the conversions stay in cache
        u8 = [to_uint8(x[i]) for i in range(x.shape[0])]
    else:  # one conversion on the device, one transfer of uint8
        u8 = list(to_uint8(x).cpu().unbind(0))
    codec = None if _USE_PILLOW else _codec()
    if codec is None:
        decoded = [_pillow_roundtrip(u, q) for u, q in zip(u8, iq)]
    else:
        encode_jpeg, decode_jpeg = codec
        encoded: list = [None] * len(iq)
        by_q: dict[int, list[int]] = {}
        for i, q in enumerate(iq):
            by_q.setdefault(q, []).append(i)
        with warnings.catch_warnings():  # torchvision 0.29 deprecates (but keeps) its JPEG codec
            warnings.simplefilter("ignore", DeprecationWarning)
            for q, idx in by_q.items():  # one call per distinct quality
                enc = encode_jpeg([u8[i] for i in idx], quality=q)
                for i, e in zip(idx, enc):
                    encoded[i] = e
            decoded = decode_jpeg(encoded)
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    if on_cpu:
        out = torch.empty(x.shape, dtype=dtype)
        for i, d in enumerate(decoded):
            from_uint8(d, dtype, out=out[i])
        return out
    return from_uint8(torch.stack(decoded).to(device=x.device), dtype)  # exact: the CPU path's bits


def _diffjpeg(x: torch.Tensor, qs: list[float]) -> torch.Tensor:
    from kornia.enhance import jpeg_codec_differentiable

    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    xi = x.detach().clamp(0, 1)
    if ph or pw:
        xi = F.pad(xi, (0, pw, 0, ph), mode="replicate")
    q = torch.tensor(qs, dtype=xi.dtype if xi.dtype.is_floating_point else torch.float32, device=x.device)
    with torch.no_grad():
        y = jpeg_codec_differentiable(xi, q)
    return y[..., :h, :w].clamp(0, 1).to(x.dtype)
