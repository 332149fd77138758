"""Distribution check: thousands of draws match every probability and range of the spec."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from server.degradation.config import CODECS, KERNEL_NAMES, PRESETS, RESIZE_MODES, DegradationConfig
from server.degradation.params import sample_batch_params
from server.degradation.seeding import make_generator

CFG = DegradationConfig()
P_MIN = 1e-3  # fixed seeds: deterministic, and a real bias of a few % fails


def chi2_ok(counts: Counter, keys, probs) -> float:
    obs = np.array([counts.get(k, 0) for k in keys], dtype=float)
    exp = np.array(probs, dtype=float) * obs.sum()
    return stats.chisquare(obs, exp).pvalue


def binom_ok(k: int, n: int, p: float) -> float:
    return stats.binomtest(k, n, p).pvalue


@pytest.fixture(scope="module")
def per_patch():
    """40 video batches x 128 patches."""
    return [sample_batch_params(CFG, 128, make_generator(0, 0, b, "params")) for b in range(40)]


@pytest.fixture(scope="module")
def per_batch():
    """3000 one-patch batches, for the values shared by a video batch."""
    return [sample_batch_params(CFG, 1, make_generator(1, 0, b, "params")) for b in range(3000)]


def _cat(attr, batches):
    return {f: torch.cat([getattr(getattr(b, attr), f) for b in batches]) for f in
            ("kind", "size", "sigma_x", "sigma_y", "angle", "beta", "omega_c")}


@pytest.mark.parametrize("which, sigma", [("kernel1", CFG.blur_sigma1), ("kernel2", CFG.blur_sigma2)])
def test_kernel_distribution(per_patch, which, sigma):
    k = _cat(which, per_patch)
    n = len(k["kind"])
    sinc = k["kind"] == 6
    assert binom_ok(int(sinc.sum()), n, 0.1) > P_MIN
    kinds = Counter(KERNEL_NAMES[i] for i in k["kind"][~sinc].tolist())
    assert chi2_ok(kinds, KERNEL_NAMES[:6], CFG.kernel_probs) > P_MIN
    sizes = Counter(k["size"].tolist())
    assert set(sizes) == set(range(7, 22, 2))
    assert chi2_ok(sizes, range(7, 22, 2), [1 / 8] * 8) > P_MIN
    ns = ~sinc
    assert k["sigma_x"][ns].min() >= sigma[0] and k["sigma_x"][ns].max() <= sigma[1]
    assert stats.kstest(((k["sigma_x"][ns] - sigma[0]) / (sigma[1] - sigma[0])).numpy(), "uniform").pvalue > P_MIN
    iso = torch.tensor([KERNEL_NAMES[i] in ("iso", "generalized_iso", "plateau_iso") for i in k["kind"].tolist()])
    assert torch.equal(k["sigma_x"][iso], k["sigma_y"][iso]) and (k["angle"][iso] == 0).all()
    aniso = torch.tensor([KERNEL_NAMES[i].endswith("aniso") for i in k["kind"].tolist()])
    assert k["angle"][aniso].min() >= -math.pi and k["angle"][aniso].max() <= math.pi
    assert k["angle"][aniso].abs().max() > 3.0
    gen = torch.tensor([KERNEL_NAMES[i].startswith("generalized") for i in k["kind"].tolist()])
    bg = k["beta"][gen]
    assert bg.min() >= 0.5 and bg.max() <= 4.0 and binom_ok(int((bg < 1).sum()), len(bg), 0.5) > P_MIN
    plat = torch.tensor([KERNEL_NAMES[i].startswith("plateau") for i in k["kind"].tolist()])
    bp = k["beta"][plat]
    assert bp.min() >= 1.0 and bp.max() <= 2.0
    assert binom_ok(int((bp == 1).sum()), len(bp), 0.5) > P_MIN  # the U[1,1] half
    om = k["omega_c"][sinc]
    small = k["size"][sinc] < 13
    assert om[small].min() >= math.pi / 3 - 1e-9 and om.max() <= math.pi
    assert om[~small].min() >= math.pi / 5 - 1e-9 and om[~small].min() < math.pi / 3


def test_per_patch_scalars(per_patch):
    j1 = Counter(torch.cat([b.jpeg1_quality for b in per_patch]).tolist())
    assert min(j1) == 30 and max(j1) == 95
    assert chi2_ok(j1, range(30, 96), [1 / 66] * 66) > P_MIN
    blur2 = torch.cat([b.blur2 for b in per_patch])
    assert binom_ok(int(blur2.sum()), len(blur2), 0.8) > P_MIN
    fs = torch.cat([b.final_sinc for b in per_patch])
    assert binom_ok(int(fs.sum()), len(fs), 0.8) > P_MIN
    om = torch.cat([b.final_sinc_omega for b in per_patch])
    assert om.min() >= math.pi / 3 and om.max() <= math.pi
    for attr, sig, poi in (("noise1", CFG.noise_sigma1, CFG.poisson_scale1),
                           ("noise2", CFG.noise_sigma2, CFG.poisson_scale2)):
        gray = torch.cat([getattr(b, attr).gray for b in per_patch])
        assert binom_ok(int(gray.sum()), len(gray), 0.4) > P_MIN
        for gaussian, rng in ((True, sig), (False, poi)):
            s = torch.cat([getattr(b, attr).strength for b in per_patch if getattr(b, attr).gaussian == gaussian])
            assert len(s) > 0 and s.min() >= rng[0] and s.max() <= rng[1]
            assert stats.kstest(((s - rng[0]) / (rng[1] - rng[0])).numpy(), "uniform").pvalue > P_MIN


def test_per_batch_choices(per_batch):
    n = len(per_batch)
    codecs = Counter(b.video.codec for b in per_batch)
    assert chi2_ok(codecs, CODECS, CFG.codec_probs) > P_MIN
    x26x = [b.video for b in per_batch if b.video.codec in ("libx264", "libx265")]
    presets = Counter(v.preset for v in x26x)
    assert chi2_ok(presets, PRESETS, CFG.preset_probs) > P_MIN
    for v in (b.video for b in per_batch):
        if v.codec == "libx264":
            assert 20 <= v.crf <= 32 and v.bitrate_kbps is None
        elif v.codec == "libx265":
            assert 25 <= v.crf <= 37 and v.bitrate_kbps is None
        else:
            assert 4000 <= v.bitrate_kbps <= 6000 and v.crf is None and v.preset is None
        if v.codec == "mpeg2video":
            assert v.fps == 25 and v.aspect_ratio == 1.0
        else:
            assert 16 <= v.fps <= 30
    crfs = Counter(v.crf for v in x26x if v.codec == "libx264")
    assert set(crfs) == set(range(20, 33))
    ar = [b.video.aspect_ratio for b in per_batch if b.video.codec != "mpeg2video"]
    cats = Counter("shrink" if a < 1 else "expand" if a > 1 else "keep" for a in ar)
    assert chi2_ok(cats, ("shrink", "expand", "keep"), (0.2, 0.4, 0.4)) > P_MIN
    assert min(ar) >= 0.85 and max(ar) <= 1.35
    endings = Counter(b.ending for b in per_batch)
    assert binom_ok(endings["v1"], n, 0.05) > P_MIN
    for attr, probs, rng in (("resize1", CFG.resize_probs1, CFG.resize_range1),
                             ("resize2", CFG.resize_probs2, CFG.resize_range2)):
        sc = [getattr(b, attr).scale for b in per_batch]
        cats = Counter("up" if s > 1 else "down" if s < 1 else "keep" for s in sc)
        assert chi2_ok(cats, ("up", "down", "keep"), probs) > P_MIN
        assert min(sc) >= rng[0] and max(sc) <= rng[1]
        modes = Counter(getattr(b, attr).mode for b in per_batch)
        assert chi2_ok(modes, RESIZE_MODES, [1 / 3] * 3) > P_MIN
    gauss = sum(b.noise1.gaussian for b in per_batch)
    assert binom_ok(gauss, n, 0.5) > P_MIN
    order = sum(b.v1_resize_first for b in per_batch)
    assert binom_ok(order, n, 0.5) > P_MIN


def test_same_triple_same_params_different_triple_different():
    a = sample_batch_params(CFG, 16, make_generator(7, 1, 2, "params"))
    b = sample_batch_params(CFG, 16, make_generator(7, 1, 2, "params"))
    c = sample_batch_params(CFG, 16, make_generator(7, 1, 3, "params"))
    assert torch.equal(a.kernel1.sigma_x, b.kernel1.sigma_x) and a.video == b.video
    assert not torch.equal(a.kernel1.sigma_x, c.kernel1.sigma_x)


def test_vcisr_code_one_kernel_per_batch():
    cfg = DegradationConfig.for_profile("vcisr-code")
    p = sample_batch_params(cfg, 32, make_generator(0, 0, 0, "params"))
    assert len(set(p.kernel1.sigma_x.tolist())) == 1 and len(set(p.kernel1.kind.tolist())) == 1
    vids = [sample_batch_params(cfg, 1, make_generator(0, 0, b, "params")).video for b in range(600)]
    assert all(3800 <= v.bitrate_kbps <= 5800 for v in vids if v.bitrate_kbps)
    assert any(v.aspect_ratio != 1.0 for v in vids if v.codec == "mpeg2video")
    assert min(v.aspect_ratio for v in vids) >= 0.8
