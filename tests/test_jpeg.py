"""JPEG round trip (server/degradation/jpeg.py): libjpeg-turbo and kornia DiffJPEG."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.stages import photo_patches
from server.degradation.jpeg import from_uint8, jpeg_backend, jpeg_roundtrip, to_uint8


def psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-20))


@pytest.fixture(scope="module")
def crops():
    x = photo_patches(6, 360, seed=21)
    return torch.nn.functional.interpolate(x, size=(120, 120), mode="area").clamp(0, 1)


@pytest.mark.parametrize("impl", ["libjpeg", "diffjpeg"])
def test_changes_pixels_and_quality_orders_psnr(crops, impl):
    lo = jpeg_roundtrip(crops, torch.full((6,), 30.0), impl=impl)
    hi = jpeg_roundtrip(crops, torch.full((6,), 95.0), impl=impl)
    assert lo.shape == crops.shape and lo.dtype == crops.dtype
    assert (lo - crops).abs().max() > 0.05
    assert (hi - crops).abs().max() > 1 / 255
    p_lo, p_hi = psnr(lo, crops), psnr(hi, crops)
    print(f"\n{impl}: PSNR q30 {p_lo:.2f} dB, q95 {p_hi:.2f} dB")
    assert p_lo + 3 < p_hi
    assert 0 <= lo.min() and lo.max() <= 1


@pytest.mark.parametrize("impl", ["libjpeg", "diffjpeg"])
def test_odd_sizes_and_per_patch_quality(impl):
    x = torch.rand(3, 3, 45, 37, generator=torch.Generator().manual_seed(1))
    q = torch.tensor([30.0, 60.0, 95.0])
    out = jpeg_roundtrip(x, q, impl=impl)
    assert out.shape == x.shape
    single = torch.cat([jpeg_roundtrip(x[i : i + 1], q[i : i + 1], impl=impl) for i in range(3)])
    torch.testing.assert_close(out, single, rtol=0, atol=1e-6)  # per-patch quality really is per patch
    assert psnr(out[0], x[0]) < psnr(out[2], x[2])


def test_libjpeg_and_diffjpeg_agree(crops):
    q = torch.full((6,), 90.0)
    a = jpeg_roundtrip(crops, q, impl="libjpeg")
    b = jpeg_roundtrip(crops, q, impl="diffjpeg")
    p = psnr(a, b)
    print(f"\nPSNR(libjpeg, diffjpeg) at q90: {p:.2f} dB")
    assert p > 30


@pytest.mark.parametrize("impl", ["libjpeg", "diffjpeg"])
def test_deterministic(crops, impl):
    q = torch.tensor([31.0, 47.5, 52.0, 77.0, 88.0, 95.0])
    assert torch.equal(jpeg_roundtrip(crops, q, impl=impl), jpeg_roundtrip(crops, q, impl=impl))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_libjpeg_is_420_and_rounds_input():
    from torchvision.io import encode_jpeg

    x = to_uint8(torch.rand(3, 48, 40))
    data = bytes(encode_jpeg(x, quality=80).numpy())
    sof = data.find(b"\xff\xc0")  # baseline SOF0
    assert sof > 0 and data[sof + 9] == 3
    factors = [data[sof + 11 + 3 * c] for c in range(3)]
    assert factors == [0x22, 0x11, 0x11]  # Y 2x2, Cb 1x1, Cr 1x1: 4:2:0 like DiffJPEG
    # input clamped and rounded to uint8 first: values outside [0, 1] behave like 0 / 1
    y = torch.rand(1, 3, 32, 32)
    wild = y * 1.6 - 0.3
    torch.testing.assert_close(
        jpeg_roundtrip(wild, [75]), jpeg_roundtrip(wild.clamp(0, 1), [75]), rtol=0, atol=0
    )
    assert to_uint8(torch.tensor([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 1.0, 2.0])).tolist() == [0, 0, 0, 2, 255, 255]


def test_from_uint8_is_the_correctly_rounded_quotient():
    values = torch.arange(256, dtype=torch.uint8)
    exact = (torch.arange(256, dtype=torch.float64) / 255).to(torch.float32)
    assert torch.equal(from_uint8(values), exact)
    # the CPU's float32 true division gives the same bits: CPU results are unchanged by the table
    assert torch.equal(values.float() / 255.0, exact)
    assert torch.equal(from_uint8(values, torch.float64), torch.arange(256, dtype=torch.float64) / 255)
    img = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = torch.empty(2, 3, 5, 7)
    assert from_uint8(img, out=out) is out and torch.equal(out, exact[img.long()])
    assert torch.equal(from_uint8(img.permute(0, 2, 3, 1)), exact[img.permute(0, 2, 3, 1).long()])
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(img.float())


def test_from_uint8_same_bits_on_the_device(device):
    """Run with ``--device cuda``: CUDA's division by 255.0 is a multiplication
    by the reciprocal (1 ulp off for some values); the table is not."""
    values = torch.arange(256, dtype=torch.uint8)
    got = from_uint8(values.to(device))
    assert got.device.type == device.type and torch.equal(got.cpu(), from_uint8(values))


def test_pillow_fallback_matches_torchvision(crops, monkeypatch):
    import server.degradation.jpeg as J

    q = torch.tensor([30.0, 50.0, 70.0, 80.0, 90.0, 95.0])
    a = jpeg_roundtrip(crops, q)
    monkeypatch.setattr(J, "_USE_PILLOW", True)
    b = jpeg_roundtrip(crops, q)
    assert psnr(a, b) > 45  # both libjpeg(-turbo), 4:2:0; decoders may differ in upsampling


def test_quality_validation_and_scalar_quality():
    x = torch.rand(2, 3, 16, 16)
    assert jpeg_roundtrip(x, 50).shape == x.shape
    with pytest.raises(ValueError):
        jpeg_roundtrip(x, torch.tensor([50.0, 101.0]))
    with pytest.raises(ValueError):
        jpeg_roundtrip(x, torch.tensor([50.0, 60.0, 70.0]))
    with pytest.raises(ValueError):
        jpeg_roundtrip(x, 50, impl="mozjpeg")
    with pytest.raises(ValueError):
        jpeg_roundtrip(torch.rand(2, 1, 16, 16), 50)
    assert jpeg_backend("cpu", "libjpeg") == "libjpeg-turbo"
    assert jpeg_backend("cpu", "diffjpeg") == "kornia-diffjpeg"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs(crops):
    x = crops.cuda()
    q = torch.full((6,), 70.0)
    for impl in ("libjpeg", "diffjpeg"):
        out = jpeg_roundtrip(x, q, impl=impl)
        assert out.is_cuda and out.shape == x.shape
    torch.testing.assert_close(jpeg_roundtrip(x, q).cpu(), jpeg_roundtrip(crops, q), rtol=0, atol=0)
    assert psnr(jpeg_roundtrip(x, q, impl="diffjpeg").cpu(), jpeg_roundtrip(crops, q, impl="diffjpeg")) > 50
