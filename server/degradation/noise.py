"""Gaussian and Poisson noise (spec 3.3 / 4.3), per patch, batched in torch.

* :func:`add_gaussian_noise` - Real-ESRGAN ``add_gaussian_noise_pt`` with the
  spec's fix: every patch, gray or colour, gets its own noise pattern.
* :func:`add_poisson_noise` - Real-ESRGAN ``add_poisson_noise_pt`` /
  ``generate_poisson_noise_pt``, with an exact but much faster Poisson sampler
  (Walker/Vose alias tables, see :func:`poisson_sample_levels`).

Random numbers are drawn patch by patch, in patch order, from the given
``torch.Generator`` (on ``x``'s device), and only those that are used (one
channel for gray patches), so the result is a deterministic function of
(x, parameters, generator state).  On CPU the Poisson sampler's uniforms come
from a NumPy PCG64 stream seeded by one draw of the torch generator (NumPy's
float64 uniforms are ~3x faster than torch's); on CUDA they come from the
torch generator directly.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

__all__ = [
    "GRAY_WEIGHTS",
    "add_gaussian_noise",
    "add_poisson_noise",
    "poisson_alias_table",
    "poisson_sample_levels",
    "rgb_to_gray",
]

#: Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601 with the
#: 0.2989 red weight), which Real-ESRGAN's ``generate_poisson_noise_pt`` uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

#: elements processed per step (keeps temporaries in cache on CPU)
_CHUNK_ELEMS = 1 << 17


def _per_patch(v, n: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.as_tensor(v, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    return t.reshape(n).to(dtype)


def _runs(flags: list[bool], per_patch: int, device: torch.device):
    """Consecutive index ranges with the same flag, split to ~_CHUNK_ELEMS
    elements on CPU (cache-sized steps; whole runs on other devices)."""
    step = max(1, _CHUNK_ELEMS // max(per_patch, 1)) if device.type == "cpu" else len(flags)
    i, n = 0, len(flags)
    while i < n:
        j = i + 1
        while j < n and flags[j] == flags[i] and j - i < step:
            j += 1
        yield i, j, flags[i]
        i = j


def _check(x: torch.Tensor, generator: torch.Generator | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    if generator is not None and torch.device(generator.device).type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, x on {x.device}")


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W) -> (B, 1, H, W)``: ``0.2989 R + 0.587 G + 0.114 B``
    (torchvision ``rgb_to_grayscale``, as used by Real-ESRGAN)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


# ----------------------------------------------------------------------------
# Gaussian
# ----------------------------------------------------------------------------
def add_gaussian_noise(
    x: torch.Tensor,
    sigma,
    gray,
    generator: torch.Generator | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``clamp(x + randn * sigma / 255, 0, 1)`` per patch (Real-ESRGAN
    ``add_gaussian_noise_pt`` with ``clip=True, rounds=False``).

    ``sigma (B,)`` on the 0-255 scale, ``gray (B,)`` bool: a gray patch gets one
    channel of noise repeated on all channels.  Every patch gets its own
    pattern (Real-ESRGAN shares one gray pattern per batch: spec fix).
    Same distribution as the reference; exact formula.
    """
    _check(x, generator)
    bsz, c, h, w = x.shape
    s = _per_patch(sigma, bsz, x.device) / 255.0
    flags = _per_patch(gray, bsz, "cpu", torch.bool).tolist()
    if out is None:
        out = torch.empty_like(x)
    noise_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    for i, j, is_gray in _runs(flags, c * h * w, x.device):
        nch = 1 if is_gray else c
        n = torch.randn((j - i, nch, h, w), generator=generator, device=x.device, dtype=noise_dtype)
        n.mul_(s[i:j].view(-1, 1, 1, 1).to(noise_dtype))
        o = out[i:j]
        torch.add(x[i:j], n, out=o)
        o.clamp_(0, 1)
    return out


# ----------------------------------------------------------------------------
# Poisson: exact sampler for rates q * vals / 255, q = 0..255
# ----------------------------------------------------------------------------
_TABLES: dict = {}
_TABLES_LOCK = threading.Lock()


def _alias_rows(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method, vectorised over the rows of ``p`` (each sums to 1).

    Returns ``prob, alias`` with: ``i ~ U{0..L-1}``, ``X = i if U(0,1) < prob[i]
    else alias[i]`` has law ``p`` (exactly, up to float64 rounding).
    """
    rows_n, size = p.shape
    q = p * size
    prob = np.ones((rows_n, size))
    alias = np.tile(np.arange(size), (rows_n, 1))
    is_small = q < 1.0
    small = np.argsort(~is_small, axis=1, kind="stable")  # smalls first (index order)
    large = np.argsort(is_small, axis=1, kind="stable")  # larges first
    ns = is_small.sum(axis=1)
    nl = size - ns
    ps = np.zeros(rows_n, dtype=np.int64)
    pl = np.zeros(rows_n, dtype=np.int64)
    rows = np.arange(rows_n)
    while True:
        act = (ps < ns) & (pl < nl)
        if not act.any():
            break
        r = rows[act]
        s = small[r, ps[r]]
        lg = large[r, pl[r]]
        prob[r, s] = q[r, s]
        alias[r, s] = lg
        q[r, lg] -= 1.0 - q[r, s]
        ps[r] += 1
        became = q[r, lg] < 1.0
        rb = r[became]
        small[rb, ns[rb]] = lg[became]
        ns[rb] += 1
        pl[rb] += 1
    return prob, alias


def poisson_alias_table(vals: int, device=None) -> tuple[torch.Tensor, int]:
    """Alias table for ``Poisson(q * vals / 255)``, ``q = 0..255`` (cached).

    Returns ``(enc (256*L,) float64, L)``: row ``q`` starts at ``q*L`` and entry
    ``i`` packs ``alias[i] + prob[i]`` (``prob`` in [0, 1); entries that never
    alias store ``i`` itself, so either branch gives ``i``).  The support is
    cut at ``L = ceil(v + 12 sqrt(v) + 30)`` (the dropped tail has probability
    < 1e-30 and is renormalised away).
    """
    key = (int(vals), str(torch.device(device) if device is not None else "cpu"))
    with _TABLES_LOCK:
        hit = _TABLES.get(key)
    if hit is not None:
        return hit
    v = float(vals)
    size = int(math.ceil(v + 12.0 * math.sqrt(v) + 30.0))
    lam = torch.arange(256, dtype=torch.float64) * v / 255.0
    j = torch.arange(size, dtype=torch.float64)
    logp = j.view(1, -1) * torch.log(lam.clamp_min(1e-300)).view(-1, 1) - lam.view(-1, 1) - torch.lgamma(j + 1).view(1, -1)
    p = torch.exp(logp)
    p[0] = 0.0
    p[0, 0] = 1.0  # rate 0
    p = p / p.sum(dim=1, keepdim=True)
    prob, alias = _alias_rows(p.numpy())
    col = np.broadcast_to(np.arange(size, dtype=np.float64), prob.shape)
    enc = np.where(prob >= 1.0, col, alias + prob)
    res = (torch.from_numpy(np.ascontiguousarray(enc).reshape(-1)).to(device), size)
    with _TABLES_LOCK:
        _TABLES[key] = res
    return res


class _Uniforms:
    """float64 U[0,1) stream for the Poisson sampler (see module docstring)."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, use_numpy: bool | None = None):
        self.device = device
        self.generator = generator
        self.np_rng = None
        if use_numpy is None:
            use_numpy = device.type == "cpu"
        if use_numpy:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
            self.np_rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, n: int) -> torch.Tensor:
        if self.np_rng is not None:
            return torch.from_numpy(self.np_rng.random(n))
        return torch.rand(n, generator=self.generator, device=self.device, dtype=torch.float64)


def poisson_sample_levels(levels: torch.Tensor, vals: int, uniforms) -> torch.Tensor:
    """Exact ``Poisson(levels * vals / 255)`` samples (float32), ``levels`` an
    integer-valued float tensor in ``0..255``; ``uniforms(n)`` returns float64
    U[0,1).

    One uniform per sample (Walker/Vose alias method): ``v = u L``,
    ``i = floor(v)``, ``X = i if frac(v) < prob[i] else alias[i]`` in the row
    of the level.  The only approximations are float64 rounding and the
    < 1e-30 tail cut: the law is Poisson to ~1e-15 per outcome.
    """
    enc, size = poisson_alias_table(vals, levels.device)
    row = levels.reshape(-1).to(torch.float64).mul_(size)  # row start q*L
    v = uniforms(levels.numel()).to(levels.device).mul_(size).add_(row)
    iv = torch.floor(v)
    frac = v.sub_(iv)
    t = enc.take(iv.long())
    a = torch.floor(t)
    p = t.sub_(a)
    col = iv.sub_(row)
    return torch.where(frac < p, col, a).to(torch.float32).view(levels.shape)


def _unique_count_pow2(q: torch.Tensor, per_patch_bincount: bool | None = None) -> list[int]:
    """``2 ** ceil(log2(#distinct values))`` per patch of integer-valued ``q (n, ...)`` in 0..255
    (a 256-bin histogram instead of Real-ESRGAN's per-patch ``torch.unique``)."""
    n = q.shape[0]
    if per_patch_bincount is None:
        per_patch_bincount = q.device.type == "cpu"
    if per_patch_bincount:  # uint8 bincount is the fastest CPU histogram
        q8 = q.to(torch.uint8).reshape(n, -1)
        counts = [int((torch.bincount(q8[k], minlength=256) > 0).sum()) for k in range(n)]
    else:
        seen = torch.zeros((n, 256), dtype=torch.bool, device=q.device)
        seen.scatter_(1, q.reshape(n, -1).long(), True)
        counts = seen.sum(dim=1).tolist()
    return [1 << max(0, math.ceil(math.log2(cnt))) for cnt in counts]


def add_poisson_noise(
    x: torch.Tensor,
    scale,
    gray,
    generator: torch.Generator | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real-ESRGAN ``add_poisson_noise_pt`` (``clip=True, rounds=False``), per patch.

    ``img = x`` (colour) or ``rgb_to_gray(x)`` (gray patch);
    ``q = clamp(round(img * 255), 0, 255)``; ``vals = 2**ceil(log2(#unique q))``
    (per patch, over all its channels); ``noise = (Poisson(q/255 * vals) / vals
    - q/255) * scale`` (gray noise repeated on all channels);
    ``out = clamp(x + noise, 0, 1)``.  The Poisson draws are exact (alias
    method, :func:`poisson_sample_levels`); the unique count uses a 256-bin
    presence table instead of ``torch.unique``.
    """
    _check(x, generator)
    bsz, c, h, w = x.shape
    sc = _per_patch(scale, bsz, x.device)
    flags = _per_patch(gray, bsz, "cpu", torch.bool).tolist()
    if out is None:
        out = torch.empty_like(x)
    uniforms = _Uniforms(generator, x.device)
    for i, j, is_gray in _runs(flags, c * h * w, x.device):
        xs = x[i:j].float()
        img = rgb_to_gray(xs) if (is_gray and c == 3) else xs
        q = (img * 255.0).round_().clamp_(0, 255)
        vals = _unique_count_pow2(q)
        noise = torch.empty_like(q)
        for v in sorted(set(vals)):  # one alias table per distinct vals (mostly 256), patch order kept
            sel = [k for k in range(j - i) if vals[k] == v]
            if len(sel) == j - i:
                noise = poisson_sample_levels(q, v, uniforms)
            else:
                idx = torch.as_tensor(sel, device=x.device)
                noise.index_copy_(0, idx, poisson_sample_levels(q.index_select(0, idx), v, uniforms))
        # noise = (X / vals - q / 255) * scale
        vt = torch.tensor(vals, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
        noise.div_(vt).sub_(q.div_(255.0)).mul_(sc[i:j].view(-1, 1, 1, 1))
        o = out[i:j]
        if o.dtype == torch.float32:
            torch.add(xs, noise, out=o)
        else:
            o.copy_(xs + noise)
        o.clamp_(0, 1)
    return out
