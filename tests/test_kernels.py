"""Real-ESRGAN kernel formulas (server/degradation/kernels.py) against independent float64 closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from server.degradation.config import KERNEL_NAMES, SINC
from server.degradation.kernels import build_kernels, final_sinc_kernels, flush_subnormals, true_sizes

ISO, ANISO, GISO, GANISO, PISO, PANISO = range(6)


def one(kind, size, sx=1.0, sy=1.0, angle=0.0, beta=1.0, omega=1.0, pad_to=21, device="cpu", dtype=torch.float64):
    t = lambda v: torch.tensor([v], dtype=torch.float64, device=device)  # noqa: E731
    k = build_kernels(
        torch.tensor([kind], device=device), torch.tensor([size], device=device),
        t(sx), t(sy), t(angle), t(beta), t(omega), pad_to=pad_to, dtype=dtype,
    )
    return k[0].cpu().numpy()


def crop(k: np.ndarray, size: int) -> np.ndarray:
    c, h = k.shape[0] // 2, size // 2
    return k[c - h : c + h + 1, c - h : c + h + 1]


# ---- independent numpy references (Real-ESRGAN's matrix form) -------------
def np_quadform(size, sx, sy, theta):
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)  # xx: column offset, yy: row offset
    u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    sigma = u @ np.diag([sx**2, sy**2]) @ u.T
    inv = np.linalg.inv(sigma)
    grid = np.stack([xx, yy], axis=-1)
    return np.sum((grid @ inv) * grid, axis=-1)


def np_kernel(kind, size, sx, sy, theta, beta):
    if kind in (ISO, GISO, PISO):
        sy, theta = sx, 0.0
    q = np_quadform(size, sx, sy, theta)
    if kind in (ISO, ANISO):
        k = np.exp(-0.5 * q)
    elif kind in (GISO, GANISO):
        k = np.exp(-0.5 * np.power(q, beta))
    else:
        k = 1.0 / (np.power(q, beta) + 1.0)
    return k / k.sum()


def np_sinc(size, omega):
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = omega * scipy.special.j1(omega * r) / (2 * np.pi * r)
    k[int(c), int(c)] = omega**2 / (4 * np.pi)
    return k / k.sum()


def gauss1d(size, s):
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    g = np.exp(-(ax**2) / (2 * s * s))
    return g


# ---------------------------------------------------------------------------
def random_params(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 7, (n,), generator=g)
    size = torch.randint(0, 8, (n,), generator=g) * 2 + 7
    u = lambda a, b: a + (b - a) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    return kind, size, u(0.2, 3), u(0.2, 3), u(-math.pi, math.pi), u(0.5, 4), u(math.pi / 5, math.pi)


def test_type_codes_match_config():
    assert KERNEL_NAMES.index("iso") == ISO and KERNEL_NAMES.index("plateau_aniso") == PANISO
    assert SINC == 6 and KERNEL_NAMES[SINC] == "sinc"


def test_shape_sum_support_symmetry():
    n = 200
    kind, size, sx, sy, th, beta, om = random_params(n)
    k = build_kernels(kind, size, sx, sy, th, beta, om)
    assert k.shape == (n, 21, 21) and k.dtype == torch.float32
    assert torch.allclose(k.double().sum(dim=(1, 2)), torch.ones(n, dtype=torch.float64), atol=1e-5)
    ax = torch.arange(-10, 11).abs()
    ring = torch.maximum(ax.view(-1, 1), ax.view(1, -1))
    outside = ring.unsqueeze(0) > (size // 2).view(-1, 1, 1)
    assert (k[outside] == 0).all()
    # all Real-ESRGAN kernels are point-symmetric: K(-x, -y) = K(x, y)
    assert torch.allclose(k, k.flip(1, 2), atol=1e-7)
    assert (true_sizes(k) <= size).all()
    # no subnormal floats (they slow CPU convolutions down)
    assert not ((k != 0) & (k.abs() < torch.finfo(torch.float32).tiny)).any()


@pytest.mark.parametrize("kind", [ISO, ANISO, GISO, GANISO, PISO, PANISO])
def test_matches_numpy_closed_form(kind):
    kinds, size, sx, sy, th, beta, _ = random_params(40, seed=kind + 1)
    kinds = torch.full_like(kinds, kind)
    k = build_kernels(kinds, size, sx, sy, th, beta, torch.ones(40), dtype=torch.float64)
    for i in range(40):
        ref = np_kernel(kind, int(size[i]), float(sx[i]), float(sy[i]), float(th[i]), float(beta[i]))
        got = crop(k[i].numpy(), int(size[i]))
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)


def test_iso_gaussian_is_outer_product():
    for size, s in [(7, 0.5), (13, 1.7), (21, 3.0)]:
        g = gauss1d(size, s)
        ref = np.outer(g, g) / np.outer(g, g).sum()
        got = crop(one(ISO, size, sx=s, sy=99.0, angle=1.0), size)  # sy/angle ignored for iso
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
        assert np.allclose(got, got.T)


def test_aniso_angle0_is_separable_and_rotation_swaps_sigmas():
    size, sx, sy = 15, 2.5, 0.8
    gx, gy = gauss1d(size, sx), gauss1d(size, sy)
    ref = np.outer(gy, gx)  # rows vary with y (sigma_y), columns with x (sigma_x)
    ref /= ref.sum()
    got = crop(one(ANISO, size, sx=sx, sy=sy, angle=0.0), size)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    rot = crop(one(ANISO, size, sx=sx, sy=sy, angle=math.pi / 2), size)
    swapped = crop(one(ANISO, size, sx=sy, sy=sx, angle=0.0), size)
    np.testing.assert_allclose(rot, swapped, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(rot, got.T, rtol=1e-9, atol=1e-15)
    # rotation by pi is the identity
    np.testing.assert_allclose(crop(one(ANISO, size, sx=sx, sy=sy, angle=0.3 + math.pi), size),
                               crop(one(ANISO, size, sx=sx, sy=sy, angle=0.3), size), rtol=1e-9, atol=1e-15)


def test_generalized_beta1_equals_gaussian():
    for kind, gk in ((GISO, ISO), (GANISO, ANISO)):
        a = one(kind, 17, sx=1.3, sy=2.2, angle=0.7, beta=1.0)
        b = one(gk, 17, sx=1.3, sy=2.2, angle=0.7)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)


def test_plateau_values_at_points():
    size, s, beta = 11, 1.5, 1.6
    k = crop(one(PISO, size, sx=s, beta=beta), size)
    c = size // 2

    def raw(x, y):
        return 1.0 / (1.0 + ((x * x + y * y) / (s * s)) ** beta)

    total = sum(raw(x, y) for x in range(-c, c + 1) for y in range(-c, c + 1))
    for x, y in [(0, 0), (1, 0), (0, 3), (2, -4), (-5, 5)]:
        assert math.isclose(k[c + y, c + x], raw(x, y) / total, rel_tol=1e-12)
    assert math.isclose(k[c, c], 1.0 / total, rel_tol=1e-12)  # plateau: value 1 at the centre


def test_sinc_matches_scipy_j1():
    for size, omega in [(7, math.pi / 3), (13, 2.0), (21, math.pi / 5), (21, math.pi)]:
        got = crop(one(SINC, size, omega=omega, sx=0.0, sy=0.0), size)  # sigmas unused (0 is fine)
        np.testing.assert_allclose(got, np_sinc(size, omega), rtol=1e-12, atol=1e-15)
        fs = final_sinc_kernels(torch.tensor([omega], dtype=torch.float64), size=size, dtype=torch.float64)[0].numpy()
        np.testing.assert_allclose(fs, got, rtol=1e-14, atol=1e-17)


def test_padding_is_centred_and_pad_to_respected():
    k7 = one(ISO, 7, sx=1.0)
    assert k7.shape == (21, 21)
    np.testing.assert_array_equal(crop(k7, 7), crop(one(ISO, 7, sx=1.0, pad_to=7), 7))
    assert one(ISO, 9, pad_to=9).shape == (9, 9)
    assert int(true_sizes(torch.from_numpy(k7)[None])[0]) == 7
    tiny = one(ISO, 21, sx=0.2, dtype=torch.float32)  # outer taps underflow to exactly 0
    assert int(true_sizes(torch.from_numpy(tiny)[None])[0]) < 21


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        one(ISO, 8)
    with pytest.raises(ValueError):
        one(ISO, 23)
    with pytest.raises(ValueError):
        one(9, 7)


def test_flush_subnormals():
    t = torch.tensor([1e-40, -1e-39, 1e-30, 0.5], dtype=torch.float32)
    assert flush_subnormals(t).tolist() == [0.0, 0.0, pytest.approx(1e-30), 0.5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    params = random_params(64, seed=5)
    cpu = build_kernels(*params)
    gpu = build_kernels(*(p.cuda() for p in params))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-7)
