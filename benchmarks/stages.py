"""Per-stage timings of the image stages (blur, USM, noise, JPEG).

Run ``python -m benchmarks.stages`` (``--quick`` for fewer patches/repeats,
no slow references).
Every stage is timed on real photographs (scikit-image sample images): 128
patches of 360x360 for blur and USM (the HR size), 207x207 for noise and JPEG
(a typical first-order size after the random resize), once with
``torch.set_num_threads(1)`` (the engine's one-thread-per-worker setting) and
once with torch's default thread count.  Each number is the best of a few
repeats, in seconds per batch.  Fast paths are also checked against the plain
formula (max abs difference printed).  References and DiffJPEG on CPU are
timed once (after one warm-up run); fast paths are the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from server.degradation.config import SINC
from server.degradation.kernels import build_kernels

PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "chelsea")


def photo_patches(n: int, size: int = 360, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` float32 crops in [0, 1] of scikit-image photographs
    (random positions and flips; images smaller than ``size`` are skipped)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    imgs = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        if a.ndim == 3 and a.shape[2] >= 3 and min(a.shape[:2]) >= size:
            imgs.append(a[..., :3])
    if not imgs:  # pragma: no cover - every scikit-image ships astronaut (512x512)
        raise RuntimeError(f"no sample photograph of at least {size}x{size}")
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        a = imgs[i % len(imgs)]
        y = rng.integers(0, a.shape[0] - size + 1)
        x = rng.integers(0, a.shape[1] - size + 1)
        crop = a[y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255).contiguous()


def random_kernels(n: int, seed: int = 0, order: int = 1, sinc_prob: float = 0.1):
    """Kernels drawn as in spec section 5 (kernel1 for ``order=1``, kernel2 for 2).

    Returns ``(kernels (n, 21, 21), kind, size)``.  For tests and benchmarks
    only: the engine has its own seeded sampler.
    """
    g = torch.Generator().manual_seed(seed)

    def u(a, b):
        return a + (b - a) * torch.rand(n, generator=g, dtype=torch.float64)

    size = torch.randint(0, 8, (n,), generator=g) * 2 + 7
    probs = torch.tensor([0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    kind = torch.multinomial(probs, n, replacement=True, generator=g)
    kind[torch.rand(n, generator=g) < sinc_prob] = SINC
    smax = 3.0 if order == 1 else 1.5
    sx, sy, th = u(0.2, smax), u(0.2, smax), u(-math.pi, math.pi)
    bg = torch.where(torch.rand(n, generator=g) < 0.5, u(0.5, 1), u(1, 4))
    bp = torch.where(torch.rand(n, generator=g) < 0.5, u(1, 1), u(1, 2))
    beta = torch.where(kind >= 4, bp, bg)
    omega = torch.where(size < 13, u(math.pi / 3, math.pi), u(math.pi / 5, math.pi))
    return build_kernels(kind, size, sx, sy, th, beta, omega), kind, size


def _best(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def poisson_noise_reference(x: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator) -> torch.Tensor:
    """Real-ESRGAN ``add_poisson_noise_pt`` as written there (colour noise always
    computed, per-patch ``torch.unique`` loops, ``torch.poisson``), for timing."""
    from server.degradation.noise import rgb_to_gray

    b = x.shape[0]

    def noise_of(img):
        img = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
        vals = [2 ** math.ceil(math.log2(len(torch.unique(img[i])))) for i in range(b)]
        v = img.new_tensor(vals).view(b, 1, 1, 1)
        return torch.poisson(img * v, generator=generator) / v - img

    noise = noise_of(x)
    if bool(gray.any()):
        g = gray.view(b, 1, 1, 1).float()
        noise = noise * (1 - g) + noise_of(rgb_to_gray(x)).expand_as(x) * g
    return torch.clamp(x + noise * scale.view(b, 1, 1, 1), 0, 1)


def _rows(n_hr: int, n_lr: int, repeats: int, include_reference: bool):
    from server.degradation.filters import blur, blur_reference, usm_sharpen, usm_sharpen_reference
    from server.degradation.jpeg import jpeg_roundtrip
    from server.degradation.noise import add_gaussian_noise, add_poisson_noise

    hr = photo_patches(n_hr, 360, seed=1)
    lr = torch.nn.functional.interpolate(photo_patches(n_lr, 360, seed=2), size=(207, 207), mode="area")
    k1, _, size1 = random_kernels(n_hr, seed=3, order=1)
    k2, _, size2 = random_kernels(n_hr, seed=4, order=2)
    gsig = torch.empty(n_lr).uniform_(1, 30, generator=torch.Generator().manual_seed(4))
    pscale = torch.empty(n_lr).uniform_(0.05, 3, generator=torch.Generator().manual_seed(5))
    gray = torch.rand(n_lr, generator=torch.Generator().manual_seed(6)) < 0.4
    qual = torch.randint(30, 96, (n_lr,), generator=torch.Generator().manual_seed(7))
    out_hr = torch.empty_like(hr)

    rows = []  # (stage, method, fn, max error vs reference, is_reference)
    for name, k, size in (("blur kernel1 (21x21 pad)", k1, size1), ("blur kernel2 (21x21 pad)", k2, size2)):
        ref = blur_reference(hr, k)
        for m in ("auto", "separable", "fft"):
            err = (blur(hr, k, size, method=m) - ref).abs().max().item()
            rows.append((name, m, lambda k=k, size=size, m=m: blur(hr, k, size, method=m, out=out_hr), err, False))
        if include_reference:
            rows.append((name, "reference", lambda k=k: blur_reference(hr, k), None, True))
        del ref
    usm_err = None
    if include_reference:
        usm_err = (usm_sharpen(hr[:32]) - usm_sharpen_reference(hr[:32])).abs().max().item()
    rows.append(("USM 51x51", "fast", lambda: usm_sharpen(hr, out=out_hr), usm_err, False))
    if include_reference:
        rows.append(("USM 51x51", "reference", lambda: usm_sharpen_reference(hr), None, True))
    gen = torch.Generator()
    rows.append(("gaussian noise (40% gray)", "fast", lambda: add_gaussian_noise(lr, gsig, gray, gen.manual_seed(1)), None, False))
    rows.append(("poisson noise (40% gray)", "fast", lambda: add_poisson_noise(lr, pscale, gray, gen.manual_seed(1)), None, False))
    if include_reference:
        rows.append(("poisson noise (40% gray)", "Real-ESRGAN", lambda: poisson_noise_reference(lr, pscale, gray, gen.manual_seed(1)), None, True))
    rows.append(("jpeg q30-95", "libjpeg", lambda: jpeg_roundtrip(lr, qual, impl="libjpeg"), None, False))
    rows.append(("jpeg q30-95", "diffjpeg", lambda: jpeg_roundtrip(lr, qual.float(), impl="diffjpeg"), None, True))
    results = []
    for stage, how, fn, err, is_ref in rows:
        times = []
        for threads in (1, None):
            old = torch.get_num_threads()
            if threads is not None:
                torch.set_num_threads(threads)
            try:
                times.append(_best(fn, 1 if is_ref else repeats))
            finally:
                torch.set_num_threads(old)
        results.append((stage, how, times[0], times[1], err))
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 patches, 1 repeat, no slow references")
    ap.add_argument("--patches", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    n = 32 if args.quick else args.patches
    repeats = 1 if args.quick else args.repeats
    default_threads = torch.get_num_threads()
    res = _rows(n, n, repeats, include_reference=not args.quick)
    print(f"{n} patches: blur/USM at 360x360, noise/JPEG at 207x207; seconds per batch (best of {repeats})")
    print(f"{'stage':30s} {'method':10s} {'1 thread':>10s} {f'{default_threads} threads':>10s} {'max|fast-ref|':>14s}")
    for stage, how, t1, tn, err in res:
        e = "" if err is None else f"{err:.2e}"
        print(f"{stage:30s} {how:10s} {t1:10.3f} {tn:10.3f} {e:>14s}")


if __name__ == "__main__":
    main()
