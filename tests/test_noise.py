"""Gaussian / Poisson noise (server/degradation/noise.py): statistics, gray handling, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from server.degradation.noise import (
    _Uniforms,
    _unique_count_pow2,
    add_gaussian_noise,
    add_poisson_noise,
    poisson_sample_levels,
    rgb_to_gray,
)


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


# ---- Gaussian ---------------------------------------------------------------
def test_gaussian_std_and_mean_per_patch():
    n = 12
    x = torch.full((n, 3, 128, 128), 0.5)
    sigma = torch.linspace(1, 30, n)
    gray = torch.tensor([i % 3 == 0 for i in range(n)])
    out = add_gaussian_noise(x, sigma, gray, gen(1))
    noise = out - x
    std = noise.flatten(1).std(dim=1)
    torch.testing.assert_close(std, sigma / 255, rtol=0.02, atol=0)
    assert noise.flatten(1).mean(dim=1).abs().max() < 5 * (30 / 255) / math.sqrt(3 * 128 * 128)


def test_gaussian_gray_channels_identical_colour_not():
    x = torch.full((6, 3, 32, 32), 0.5)
    gray = torch.tensor([True, False, True, False, False, True])
    noise = add_gaussian_noise(x, torch.full((6,), 10.0), gray, gen(2)) - x
    for i in range(6):
        same = torch.equal(noise[i, 0], noise[i, 1]) and torch.equal(noise[i, 1], noise[i, 2])
        assert same == bool(gray[i])


@pytest.mark.parametrize("noise_fn", ["gaussian", "poisson"])
def test_each_patch_has_its_own_pattern_even_when_all_gray(noise_fn):
    n = 8
    x = torch.full((n, 3, 64, 64), 0.5)
    x[:, :, :, :2] = torch.linspace(0, 1, 64 * 2).view(64, 2)  # many levels -> Poisson vals 256
    gray = torch.ones(n, dtype=torch.bool)
    if noise_fn == "gaussian":
        noise = add_gaussian_noise(x, torch.full((n,), 20.0), gray, gen(3)) - x
    else:
        noise = add_poisson_noise(x, torch.full((n,), 2.0), gray, gen(3)) - x
    flat = noise[:, 0, :, 2:].flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    corr = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None, :])
    off = corr[~torch.eye(n, dtype=torch.bool)]
    assert off.abs().max() < 0.1, off.abs().max()


def test_gaussian_clamps_and_supports_out():
    x = torch.rand(4, 3, 16, 16)
    x[0] = 0.0
    x[1] = 1.0
    out = torch.empty_like(x)
    res = add_gaussian_noise(x, torch.full((4,), 30.0), torch.zeros(4, dtype=torch.bool), gen(4), out=out)
    assert res is out
    assert out.min() >= 0 and out.max() <= 1
    assert (out[0] == 0).float().mean() > 0.3 and (out[1] == 1).float().mean() > 0.3


@pytest.mark.parametrize("fn", [add_gaussian_noise, add_poisson_noise])
def test_determinism(fn):
    x = torch.rand(5, 3, 24, 20)
    p = torch.tensor([5.0, 1.0, 2.0, 3.0, 0.5])
    gray = torch.tensor([True, False, False, True, False])
    a = fn(x, p, gray, gen(7))
    b = fn(x, p, gray, gen(7))
    c = fn(x, p, gray, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = gen(9)  # the generator advances: two calls differ
    assert not torch.equal(fn(x, p, gray, g), fn(x, p, gray, g))


# ---- Poisson ----------------------------------------------------------------
def test_poisson_flat_image_variance():
    # flat image: 1 unique value -> vals = 1, X ~ Poisson(img), noise = (X - img) * scale
    n = 3
    img = 100 / 255
    x = torch.full((n, 3, 96, 96), img)
    scale = torch.tensor([0.05, 0.1, 0.15])  # small enough that clamping never bites
    noise = add_poisson_noise(x, scale, torch.zeros(n, dtype=torch.bool), gen(5)) - x
    var = noise.flatten(1).var(dim=1)
    torch.testing.assert_close(var, img / 1 * scale**2, rtol=0.05, atol=0)
    assert noise.flatten(1).mean(dim=1).abs().max() < 0.01 * scale.max()


def test_poisson_variance_with_many_levels():
    # half the image holds all 256 levels (-> vals = 256), the rest is flat at 128/255
    n = 3
    x = torch.full((n, 3, 128, 128), 128 / 255)
    x[:, :, :16, :16] = (torch.arange(256).float() / 255).view(16, 16)
    scale = torch.tensor([0.5, 1.0, 2.0])
    gray = torch.tensor([False, True, False])
    out = add_poisson_noise(x, scale, gray, gen(6))
    noise = (out - x)[:, :, 16:, :]
    var = noise.flatten(1).var(dim=1)
    img = 128 / 255
    expect = img / 256 * scale**2
    torch.testing.assert_close(var, expect, rtol=0.05, atol=0)
    assert noise.flatten(1).mean(dim=1).abs().max() < 1e-3
    assert torch.equal(noise[1, 0], noise[1, 2]) and not torch.equal(noise[0, 0], noise[0, 2])


@pytest.mark.parametrize("use_numpy", [True, False])  # False: the CUDA path's torch uniforms
def test_poisson_sampler_matches_pmf(use_numpy):
    u = _Uniforms(gen(10), torch.device("cpu"), use_numpy=use_numpy)
    n = 400_000
    for vals, level in [(256, 0), (256, 1), (256, 37), (256, 255), (4, 200), (1, 255)]:
        lam = level * vals / 255
        s = poisson_sample_levels(torch.full((n,), float(level)), vals, u)
        assert s.dtype == torch.float32 and (s == s.round()).all()
        if lam == 0:
            assert (s == 0).all()
            continue
        assert abs(s.mean().item() - lam) < 5 * math.sqrt(lam / n)
        m = int(s.max()) + 1
        hist = torch.bincount(s.long(), minlength=m).double() / n
        j = torch.arange(m, dtype=torch.float64)
        pmf = torch.exp(j * math.log(lam) - lam - torch.lgamma(j + 1))
        # every outcome's frequency within 5 binomial standard deviations (+ a floor)
        assert ((hist - pmf).abs() <= 5 * torch.sqrt(pmf * (1 - pmf) / n) + 2e-5).all(), (vals, level)


def test_unique_count_matches_torch_unique():
    g = gen(11)
    q = torch.stack([torch.randint(0, 256 if i % 2 else 9 + i, (3, 40, 40), generator=g) for i in range(6)]).float()
    q[0] = 7.0
    want = [2 ** math.ceil(math.log2(len(torch.unique(q[i])))) for i in range(6)]
    for per_patch in (True, False):  # CPU histogram and the batched (CUDA) one
        got = _unique_count_pow2(q, per_patch_bincount=per_patch)
        assert got == want and got[0] == 1


def test_poisson_matches_real_esrgan_distribution():
    """Same law as Real-ESRGAN's generate_poisson_noise_pt (torch.poisson + torch.unique)."""
    x = 0.3 + 0.4 * torch.rand(4, 3, 96, 96, generator=gen(12))  # away from clamping
    scale = torch.tensor([1.0, 2.0, 1.5, 0.5])
    gray = torch.tensor([False, True, True, False])
    ours = add_poisson_noise(x, scale, gray, gen(13)) - x

    g = gen(14)
    for i in range(4):
        img = rgb_to_gray(x[i : i + 1])[0] if gray[i] else x[i]
        img = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
        vals = 2 ** math.ceil(math.log2(len(torch.unique(img))))
        ref = (torch.poisson(img * vals, generator=g) / vals - img) * scale[i]
        expect_var = float(img.mean()) / vals * float(scale[i]) ** 2
        mine = ours[i, :1] if gray[i] else ours[i]
        assert abs(mine.var().item() - expect_var) < 0.03 * expect_var
        assert abs(ref.var().item() - expect_var) < 0.03 * expect_var
        assert abs(mine.mean().item()) < 5 * math.sqrt(expect_var / mine.numel())


def test_poisson_clamps():
    x = torch.rand(4, 3, 32, 32) * 0.05
    out = add_poisson_noise(x, torch.full((4,), 3.0), torch.tensor([False, True, False, True]), gen(15))
    assert out.min() >= 0 and out.max() <= 1


def test_generator_device_mismatch_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device kind")
    with pytest.raises(ValueError):
        add_gaussian_noise(torch.rand(1, 3, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.bool), gen(0, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise():
    x = torch.full((4, 3, 64, 64), 0.5, device="cuda")
    gray = torch.tensor([True, False, True, False])
    a = add_gaussian_noise(x, torch.full((4,), 10.0), gray, gen(1, "cuda"))
    b = add_gaussian_noise(x, torch.full((4,), 10.0), gray, gen(1, "cuda"))
    assert a.is_cuda and torch.equal(a, b)
    std = (a - x).flatten(1).std(dim=1).cpu()
    torch.testing.assert_close(std, torch.full((4,), 10 / 255), rtol=0.05, atol=0)
    p = add_poisson_noise(x, torch.ones(4), gray, gen(2, "cuda"))
    q = add_poisson_noise(x, torch.ones(4), gray, gen(2, "cuda"))
    assert p.is_cuda and torch.equal(p, q)
    assert torch.equal(p[0, 0], p[0, 2])
