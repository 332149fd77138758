"""Per-patch 2-D filtering (Real-ESRGAN ``filter2D``) and ``USMSharp``, fast.

The plain formula (``blur_reference``) is Real-ESRGAN's ``filter2D``: reflect
padding by ``K // 2`` and a grouped ``F.conv2d`` (cross-correlation) of every
patch with its own ``K x K`` kernel.  ``blur`` computes the same thing with
cheaper, equivalent formulations (spec section 3.4: any reformulation must
match the plain formula within 1/255 per pixel; ``tests/test_filters.py``
shows it; the measured error is ~2e-6):

* **support trimming**: taps outside the kernel's effective window (exact
  zeros, or outer rings whose total |mass| is below a quarter of ``tol``)
  are dropped, so a 7x7 kernel padded to 21x21 costs a 7x7 one;
* **separable / low rank** (CPU): the kernel is factored by SVD in float64,
  ``K = sum_s kv_s kh_s^T``; the rank ``R`` is the smallest one whose dropped
  part has L1 norm ``<= tol`` (default ``1e-5``: the output error is then
  ``<= 1e-5`` for inputs in [0, 1], 390x below 1/255; ``tol=1e-4`` is ~5%
  faster).  Gaussian iso kernels
  are exactly rank 1.  Each 1-D pass is a *block-banded matrix product*: the
  reflect padding is folded into the boundary blocks' matrices and the
  interior blocks all share one small Toeplitz matrix, so a pass is three
  BLAS calls with no padding copy; the vertical pass contracts all R
  components at once;
* **FFT** (CPU for high-rank kernels, CUDA for all): reflect pad, real 2-D FFT
  at a 2-3-5-smooth size, multiply by the conjugate kernel spectrum
  (cross-correlation), inverse FFT, crop.  Exact up to float32 FFT rounding.

On CPU the work is done patch by patch (or a few small patches at a time) so
the intermediates stay in cache; the choice between separable and FFT is a
measured cost model (``_block_cost`` / ``_dense_cost`` / ``_fft_cost``, per
patch, calibrated at 1 thread on AVX-512 for 54..540 pixel patches).

Tiny images: reflect padding needs ``pad < dim``.  For any pad we use the
mirror-periodic extension (``mirror_index``: reflect again at each edge), which
*equals* ``F.pad(mode="reflect")`` whenever the latter is defined; both
``blur`` and ``blur_reference`` use it, so any ``H, W >= 1`` works (a 1-pixel
dimension is replicated).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from server.degradation.kernels import flush_subnormals

__all__ = [
    "blur",
    "blur_reference",
    "decompose_kernels",
    "mirror_index",
    "mirror_pad",
    "usm_kernel_1d",
    "usm_sharpen",
    "usm_sharpen_reference",
]

#: default L1 error budget of the low-rank / trimmed kernel (output error bound
#: for inputs in [0, 1]).
DEFAULT_TOL = 1e-5
#: CPU images with at most this many pixels go straight to the FFT path.
_SMALL_FFT_ONLY = 100 * 100
#: CPU working-set target (bytes) for one chunk of patches.
_CHUNK_BYTES = 1 << 21


# ----------------------------------------------------------------------------
# padding
# ----------------------------------------------------------------------------
def mirror_index(lo: int, hi: int, n: int, device=None) -> torch.Tensor:
    """Source index of positions ``lo..hi-1`` under reflect padding of a length-``n`` axis.

    ``-1 -> 1``, ``n -> n-2`` (``reflect``: the edge sample is not repeated),
    continued periodically (period ``2(n-1)``) for pads ``>= n``; ``n == 1``
    maps everything to 0.
    """
    i = torch.arange(lo, hi, device=device)
    if n == 1:
        return torch.zeros_like(i)
    p = 2 * (n - 1)
    i = torch.remainder(i, p)
    return torch.where(i >= n, p - i, i)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, (left, right, top, bottom), mode="reflect")`` for any pad size.

    Identical to torch's reflect padding when every pad is smaller than its
    dimension; otherwise the mirror-periodic extension of :func:`mirror_index`.
    """
    h, w = x.shape[-2:]
    if top < h and bottom < h and left < w and right < w and x.dim() in (3, 4):
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom), mode="reflect")
    x = x.index_select(-2, mirror_index(-top, h + bottom, h, x.device))
    return x.index_select(-1, mirror_index(-left, w + right, w, x.device))


# ----------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------
def _as_batch_kernels(kernels: torch.Tensor, b: int) -> torch.Tensor:
    if kernels.dim() == 2:
        kernels = kernels.unsqueeze(0)
    if kernels.dim() != 3 or kernels.shape[-1] != kernels.shape[-2] or kernels.shape[-1] % 2 != 1:
        raise ValueError(f"kernels must be (B, K, K) or (K, K) with K odd, got {tuple(kernels.shape)}")
    if kernels.shape[0] == 1 and b != 1:
        kernels = kernels.expand(b, -1, -1)
    if kernels.shape[0] != b:
        raise ValueError(f"{kernels.shape[0]} kernels for {b} images")
    return kernels


def blur_reference(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Real-ESRGAN ``filter2D``: reflect pad by ``K//2``, grouped ``F.conv2d``.

    ``out[b, c, h, w] = sum_ij kernels[b, i, j] * pad(x)[b, c, h + i, w + j]``
    (cross-correlation, the full padded ``K x K`` kernel).  The plain formula
    the fast paths are tested against; pads ``>= dim`` use :func:`mirror_pad`.
    """
    b, c, h, w = x.shape
    kernels = _as_batch_kernels(kernels, b)
    k = kernels.shape[-1]
    p = k // 2
    xp = mirror_pad(x, p, p, p, p)
    weight = kernels.to(x.dtype).reshape(b, 1, k, k).repeat_interleave(c, dim=0)
    out = F.conv2d(xp.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.view(b, c, h, w)


# ----------------------------------------------------------------------------
# kernel analysis
# ----------------------------------------------------------------------------
def _ring_radius(k: int, device) -> torch.Tensor:
    ax = torch.arange(-(k // 2), k // 2 + 1, device=device).abs()
    return torch.maximum(ax.view(-1, 1), ax.view(1, -1))


def decompose_kernels(kernels: torch.Tensor, tol: float = DEFAULT_TOL, max_rank: int | None = None):
    """Trim and low-rank factor each kernel so that ``||K - K_approx||_1 <= tol``.

    Returns ``(radius, rank, kv, kh, err)``: per kernel the effective radius
    ``r`` (window ``2r+1``), the rank ``R`` and lists of float64 factors
    ``kv[b]`` / ``kh[b]`` of shape ``(R, 2r+1)`` with
    ``K_approx = sum_s outer(kv[b][s], kh[b][s])`` (centred in the ``K x K``
    grid), and the exact L1 error of the approximation.  A quarter of ``tol``
    may be spent on dropping outer rings, the rest on the SVD truncation.
    Kernels whose rank would exceed ``max_rank`` get ``rank = -1`` (no
    factors): use another method for them.
    """
    kd = kernels.detach().to(torch.float64)
    n, k, _ = kd.shape
    dev = kd.device
    half = k // 2
    ring = _ring_radius(k, dev).flatten()
    mass = torch.zeros(n, half + 1, dtype=torch.float64, device=dev)
    mass.index_add_(1, ring, kd.abs().flatten(1))
    # outside[b, q] = |mass| strictly outside radius q
    outside = mass.flip(1).cumsum(1).flip(1) - mass
    ok = outside <= tol * 0.25
    radius = ok.int().argmax(dim=1)  # first radius whose outside mass is small enough
    radius_l = radius.tolist()
    rank = [0] * n
    kv: list = [None] * n
    kh: list = [None] * n
    err = torch.zeros(n, dtype=torch.float64, device=dev)
    for rr in sorted(set(radius_l)):
        idx = [i for i, v in enumerate(radius_l) if v == rr]
        sub = kd[idx][:, half - rr : half + rr + 1, half - rr : half + rr + 1]
        trimmed = outside[idx, rr]
        if rr == 0:
            for j, i in enumerate(idx):
                kv[i] = sub[j].reshape(1, 1)
                kh[i] = torch.ones(1, 1, dtype=torch.float64, device=dev)
                rank[i] = 1
            err[idx] = trimmed
            continue
        u, s, vh = torch.linalg.svd(sub)
        m = 2 * rr + 1
        comps = s.view(-1, m, 1, 1) * u.transpose(1, 2).unsqueeze(-1) * vh.unsqueeze(-2)  # (P, m, m, m)
        partial = comps.cumsum(dim=1)
        l1 = (sub.unsqueeze(1) - partial).abs().sum(dim=(2, 3)) + trimmed.unsqueeze(1)  # (P, m)
        good = l1 <= tol
        has = good.any(dim=1)
        first = good.int().argmax(dim=1) + 1
        first_l, has_l = first.tolist(), has.tolist()
        sq = s.sqrt()
        for j, i in enumerate(idx):
            r_ = first_l[j] if has_l[j] else m
            if max_rank is not None and r_ > max_rank:
                rank[i] = -1
                err[i] = float("nan")
                continue
            rank[i] = r_
            kv[i] = (u[j, :, :r_] * sq[j, :r_]).T.contiguous()
            kh[i] = (vh[j, :r_, :] * sq[j, :r_, None]).contiguous()
            err[i] = l1[j, r_ - 1]
    return radius, torch.tensor(rank), kv, kh, err


# ----------------------------------------------------------------------------
# block-banded 1-D passes
# ----------------------------------------------------------------------------
def _band_matrices(k1: torch.Tensor, n: int, o0: int, o1: int):
    """Matrices ``M (P, R, ni, no)`` with ``out[o0:o1] = x[i0:i0+ni] @ M`` for the
    1-D cross-correlation with taps ``k1 (P, R, k)`` under reflect padding of a
    length-``n`` axis (reflection folded into the matrix; float64 sums)."""
    p_, r_, k = k1.shape
    rad = k // 2
    dev = k1.device
    o = torch.arange(o0, o1, device=dev)
    t = torch.arange(k, device=dev)
    pos = o.view(-1, 1) + t.view(1, -1) - rad  # (no, k)
    lo, hi = int(pos.min()), int(pos.max()) + 1
    src = mirror_index(lo, hi, n, dev)[pos - lo]
    i0, i1 = int(src.min()), int(src.max()) + 1
    no, ni = o1 - o0, i1 - i0
    flat = ((src - i0) * no + (o - o0).view(-1, 1)).reshape(-1)  # (no*k,)
    vals = k1.to(torch.float64).unsqueeze(2).expand(p_, r_, no, k).reshape(p_ * r_, no * k)
    m = torch.zeros(p_ * r_, ni * no, dtype=torch.float64, device=dev)
    m.scatter_add_(1, flat.expand(p_ * r_, -1), vals)
    return m.view(p_, r_, ni, no), i0


def _split(n: int, r: int, b: int):
    """Partition ``[0, n)`` into a first block ``[0, bf)`` (``bf = max(b, r)``),
    ``J >= 2`` interior blocks ``[bf + j b, bf + (j+1) b)`` whose input windows
    lie inside ``[0, n)``, and a last block ``[bf + J b, n)`` (width ``>= r``).
    Returns ``(bf, J)``, or ``None`` if the axis is too short (use one block)."""
    bf = max(b, r)
    jj = (n - max(r, 1) - bf) // b  # the last block keeps >= 1 output even for radius 0
    if jj < 2:
        return None
    return bf, jj


def _block_size(r: int) -> int:
    """Output block width of the banded products: 16 measured best on AVX-512
    (one thread) for every radius we use (blur 1..10, USM 25)."""
    return _BLOCK


_BLOCK = 16


class _SepPlan:
    """Matrices for a group of patches sharing (H, W, radius, rank)."""

    def __init__(self, kv, kh, h: int, w: int, c: int, dtype, device, b: int | None = None, dense: bool = False):
        # kv, kh: (P, R, k) float64
        self.p, self.r_, k = kh.shape
        self.rad = rad = k // 2
        self.h, self.w, self.c = h, w, c
        self.b = b = b or _block_size(rad)
        self.sw = None if dense else _split(w, rad, b)
        if self.sw is None:
            m, _ = _band_matrices(kh, w, 0, w)
            self.h_full = flush_subnormals(m.to(dtype))  # (P, R, w, w)
        else:
            bf, jj = self.sw
            mf, _ = _band_matrices(kh, w, 0, bf)
            mi, _ = _band_matrices(kh, w, bf, bf + b)
            mlast, self.w_l0 = _band_matrices(kh, w, bf + jj * b, w)
            self.h_first, self.h_int, self.h_last = (flush_subnormals(t.to(dtype)) for t in (mf, mi, mlast))
        # vertical: tall image of c*h rows, blocks of b rows from row bf on;
        # rows near channel edges are then overwritten by the per-channel
        # first/last blocks.  A operands are (no, ni*R), column i*R + s.
        self.g = None
        if not dense and _split(h, rad, b) is not None:
            bf = max(b, rad)
            g = (c * h - max(rad, 1) - bf) // b
            bl = c * h - bf - g * b
            if bf + bl <= h:
                self.g, self.bf, self.bl = g, bf, bl
        if self.g is None:
            m, _ = _band_matrices(kv, h, 0, h)
            self.v_full = flush_subnormals(self._cat(m).to(dtype))
        else:
            mf, _ = _band_matrices(kv, h, 0, self.bf)
            mi, _ = _band_matrices(kv, h, self.bf, self.bf + b)
            mlast, self.v_l0 = _band_matrices(kv, h, h - self.bl, h)
            self.v_first, self.v_int, self.v_last = (flush_subnormals(self._cat(t).to(dtype)) for t in (mf, mi, mlast))

    @staticmethod
    def _cat(m: torch.Tensor) -> torch.Tensor:
        # (P, R, ni, no) -> (P, no, ni * R) with column index i * R + s
        p_, r_, ni, no = m.shape
        return m.permute(0, 3, 2, 1).reshape(p_, no, ni * r_).contiguous()

    def run_dense(self, j0: int, j1: int, xs: torch.Tensor) -> torch.Tensor:
        """Dense matrices, patches ``j0..j1`` of the group at once: ``xs (n, C, H, W)``."""
        n, c, h, w, R = xs.shape[0], self.c, self.h, self.w, self.r_
        a = self.h_full[j0:j1].permute(0, 2, 1, 3).reshape(n, w, R * w)  # column s*w + o
        y = torch.bmm(xs.reshape(n, c * h, w), a).view(n, c, h * R, w)  # rows i*R + s
        out = torch.empty_like(xs)
        v = self.v_full[j0:j1]
        for ch in range(c):
            torch.bmm(v, y[:, ch], out=out[:, ch])
        return out

    def run(self, j: int, x: torch.Tensor, out: torch.Tensor, ybuf: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Filter patch ``j`` of the group: ``x``, ``out`` (and ``base``) are
        contiguous ``(C, H, W)``; with ``base`` the result is ``base - filter(x)``
        (fused into the last products)."""
        c, h, w, b, R, rad = self.c, self.h, self.w, self.b, self.r_, self.rad
        rows = c * h
        xf = x.view(rows, w)
        y = ybuf[: rows * R * w].view(rows, R, w)
        # ---- horizontal passes, one per rank component -> y[:, s, :]
        for s in range(R):
            ys = y[:, s, :]
            if self.sw is None:
                torch.mm(xf, self.h_full[j, s], out=ys)
                continue
            bf, jj = self.sw
            torch.mm(xf[:, : self.h_first.shape[2]], self.h_first[j, s], out=ys[:, :bf])
            xi = x.as_strided((jj, rows, b + 2 * rad), (b, w, 1), x.storage_offset() + bf - rad)
            yi = y.as_strided((jj, rows, b), (b, R * w, 1), y.storage_offset() + s * w + bf)
            torch.bmm(xi, self.h_int[j, s].expand(jj, -1, -1), out=yi)
            torch.mm(xf[:, self.w_l0 :], self.h_last[j, s], out=ys[:, bf + jj * b :])

        # ---- vertical pass, all components contracted at once
        def prod(a, bmat, o, bo):
            if base is None:
                torch.bmm(a, bmat, out=o)
            else:
                torch.baddbmm(bo, a, bmat, beta=1, alpha=-1, out=o)

        if self.g is None:
            yc = y.view(c, h * R, w)
            prod(self.v_full[j].expand(c, -1, -1), yc, out.view(c, h, w), None if base is None else base.view(c, h, w))
            return
        g, bf, bl = self.g, self.bf, self.bl
        yo = y.storage_offset()

        def view(t, shape, strides, off):
            return None if t is None else t.as_strided(shape, strides, t.storage_offset() + off)

        yt = y.as_strided((g, (b + 2 * rad) * R, w), (b * R * w, w, 1), yo + (bf - rad) * R * w)
        sh, st = (g, b, w), (b * w, w, 1)
        prod(self.v_int[j].expand(g, -1, -1), yt, view(out, sh, st, bf * w), view(base, sh, st, bf * w))
        nf = self.v_first.shape[2]
        yf = y.as_strided((c, nf, w), (h * R * w, w, 1), yo)
        sh, st = (c, bf, w), (h * w, w, 1)
        prod(self.v_first[j].expand(c, -1, -1), yf, view(out, sh, st, 0), view(base, sh, st, 0))
        nl = self.v_last.shape[2]
        yl = y.as_strided((c, nl, w), (h * R * w, w, 1), yo + self.v_l0 * R * w)
        sh = (c, bl, w)
        prod(self.v_last[j].expand(c, -1, -1), yl, view(out, sh, st, (h - bl) * w), view(base, sh, st, (h - bl) * w))


def _sep_blur_group(x, out, idx, kv, kh, dtype, dense: bool) -> None:
    """Separable path for patches ``idx`` (same radius and rank).

    ``dense``: full reflect-folded ``W x W`` / ``H x H`` matrices, several
    patches per BLAS call (small images); else block-banded, patch by patch.
    """
    _, c, h, w = x.shape
    plan = _SepPlan(kv, kh, h, w, c, dtype, x.device, dense=dense)
    if dense:
        per = c * h * w * plan.r_ * x.element_size()
        chunk = len(idx) if x.device.type != "cpu" else max(1, (4 * _CHUNK_BYTES) // per)
        for s0 in range(0, len(idx), chunk):
            sel = idx[s0 : s0 + chunk]
            _put(out, sel, plan.run_dense(s0, s0 + len(sel), _take(x, sel)))
        return
    ybuf = torch.empty(c * h * plan.r_ * w, dtype=dtype, device=x.device)
    for j, i in enumerate(idx):
        plan.run(j, x[i], out[i], ybuf)


def _take(x: torch.Tensor, sel: list[int]) -> torch.Tensor:
    if sel == list(range(sel[0], sel[0] + len(sel))):
        return x[sel[0] : sel[0] + len(sel)]
    return x.index_select(0, torch.as_tensor(sel, device=x.device))


def _put(out: torch.Tensor, sel: list[int], val: torch.Tensor) -> None:
    if sel == list(range(sel[0], sel[0] + len(sel))):
        out[sel[0] : sel[0] + len(sel)] = val
    else:
        out.index_copy_(0, torch.as_tensor(sel, device=out.device), val)


# ----------------------------------------------------------------------------
# FFT path
# ----------------------------------------------------------------------------
def _fast_len(n: int) -> int:
    """Smallest even ``m >= n`` whose prime factors are 2, 3, 5, 7 (odd real-FFT
    lengths are ~2x slower per sample in MKL / pocketfft)."""
    m = n + (n & 1)
    while True:
        v = m
        for p in (2, 3, 5, 7):
            while v % p == 0:
                v //= p
        if v == 1:
            return m
        m += 2


def _fft_blur_group(x: torch.Tensor, out: torch.Tensor, idx: list[int], kern: torch.Tensor, chunk: int) -> None:
    """FFT path for patches ``idx``; ``kern (len(idx), k, k)``, ``k`` odd.

    Cross-correlation = ``irfft2(rfft2(pad(x)) * conj(rfft2(kernel at 0)))``
    at a 2-3-5-smooth size ``>= H + 2r`` (no wrap-around reaches the crop).
    """
    _, c, h, w = x.shape
    r = kern.shape[-1] // 2
    nh, nw = _fast_len(h + 2 * r), _fast_len(w + 2 * r)
    kern = flush_subnormals(kern.to(x.dtype))
    per_plane = x.device.type == "cpu" and nh * nw >= 128 * 128
    for s0 in range(0, len(idx), chunk):
        sel = idx[s0 : s0 + chunk]
        xs = _take(x, sel)
        if nh - h - r < h and nw - w - r < w:
            xp = mirror_pad(xs, r, nh - h - r, r, nw - w - r)
        else:
            xp = mirror_pad(xs, r, r, r, r)
        spec = torch.fft.rfft2(xp, s=(nh, nw))
        ks = torch.fft.rfft2(kern[s0 : s0 + len(sel)], s=(nh, nw))
        spec.mul_(ks.conj().unsqueeze(1))
        if per_plane and len(sel) == 1:  # c2r of one plane at a time stays in cache
            o = out[sel[0]]
            for ch in range(c):
                o[ch] = torch.fft.irfft2(spec[0, ch], s=(nh, nw))[:h, :w]
        else:
            _put(out, sel, torch.fft.irfft2(spec, s=(nh, nw))[..., :h, :w])


def _fft_chunk(c: int, h: int, w: int, r: int) -> int:
    per = c * _fast_len(h + 2 * r) * _fast_len(w + 2 * r) * 4 * 3
    return max(1, _CHUNK_BYTES // per)


# ----------------------------------------------------------------------------
# cost model (CPU, seconds per patch at 1 thread; calibrated on AVX-512 with
# benchmarks/stages.py -- only the ranking of the methods matters)
# ----------------------------------------------------------------------------
def _fft_cost(c: int, h: int, w: int, r: int) -> float:
    n = _fast_len(h + 2 * r) * _fast_len(w + 2 * r)
    return c * n * (1.5 + 0.33 * math.log2(max(n, 2))) * 1e-9 + 2e-5


def _block_cost(c: int, h: int, w: int, r: int, rank: int) -> float:
    b = _block_size(r)
    if _split(w, r, b) is None or _split(h, r, b) is None:
        return math.inf
    px = c * h * w
    return rank * (px * 2 * (b + 2 * r) / 4e10 + 3e-5) + px * 1.6e-9 + 3e-5


def _dense_cost(c: int, h: int, w: int, rank: int) -> float:
    return rank * c * h * w * (h + w) / 2.2e10 + 2e-5


# ----------------------------------------------------------------------------
# public fast blur
# ----------------------------------------------------------------------------
def blur(
    x: torch.Tensor,
    kernels: torch.Tensor,
    sizes: torch.Tensor | None = None,
    *,
    tol: float = DEFAULT_TOL,
    method: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast per-patch ``filter2D`` (see module docstring): equals
    :func:`blur_reference` within ``tol`` (+ float32 rounding) per pixel for
    inputs in [0, 1].

    ``x (B, C, H, W)`` float, ``kernels (B, K, K)`` (or one ``(K, K)`` kernel for
    all), ``sizes`` optional true kernel sizes (taps outside them are treated
    as zero; taps that are zero are always skipped).  ``method``: ``auto``
    (CPU: cost model per patch; CUDA: FFT), ``separable`` (low-rank, block or
    dense matrices for every patch), ``fft``, or ``reference``.  Any
    ``H, W >= 1``; float16/bfloat16 are computed in float32.  ``out``: an
    optional contiguous result tensor of ``x``'s shape, dtype and device
    (reusing one avoids ~0.2 s/GB of page faults of a fresh allocation on CPU;
    it must not overlap ``x``).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    bsz, c, h, w = x.shape
    kernels = _as_batch_kernels(kernels, bsz)
    if method == "reference":
        return blur_reference(x, kernels)
    if method not in ("auto", "separable", "fft"):
        raise ValueError(f"unknown blur method {method!r}")
    if x.numel() == 0:
        return x.clone()
    orig_dtype = x.dtype
    work = torch.float32 if orig_dtype in (torch.float16, torch.bfloat16) else orig_dtype
    x = x.to(work).contiguous()
    kernels = kernels.to(device=x.device)
    half = kernels.shape[-1] // 2
    if sizes is not None:
        sizes = torch.as_tensor(sizes, device=x.device).reshape(-1).long()
        ring = _ring_radius(kernels.shape[-1], x.device)
        keep = ring.unsqueeze(0) <= (sizes // 2).view(-1, 1, 1)
        kernels = torch.where(keep, kernels, torch.zeros((), dtype=kernels.dtype, device=x.device))
    result = out
    if out is None or out.dtype != work or not out.is_contiguous() or out.shape != x.shape:
        out = torch.empty_like(x)
    if method == "auto" and (x.device.type != "cpu" or h * w <= _SMALL_FFT_ONLY):
        method = "fft"  # CUDA, or small CPU images where the SVD planning would cost more than it saves

    if method == "fft":
        r = int(_effective_radius(kernels, tol).max())
        kern = kernels[:, half - r : half + r + 1, half - r : half + r + 1]
        chunk = bsz if x.device.type != "cpu" else _fft_chunk(c, h, w, r)
        _fft_blur_group(x, out, list(range(bsz)), kern, chunk)
        return _finish(out, result, orig_dtype)

    radius, rank, kv, kh, _ = decompose_kernels(kernels, tol)
    radius_l, rank_l = radius.tolist(), rank.tolist()
    groups: dict[tuple[str, int, int], list[int]] = {}
    fft_idx: list[int] = []
    for i in range(bsz):
        rr, rk = radius_l[i], rank_l[i]
        costs = {"block": _block_cost(c, h, w, rr, rk), "dense": _dense_cost(c, h, w, rk)}
        if method == "auto":
            costs["fft"] = _fft_cost(c, h, w, rr)
        best = min(costs, key=costs.get)
        if best == "fft":
            fft_idx.append(i)
        else:
            groups.setdefault((best, rr, rk), []).append(i)
    for (how, _rr, _rk), idx in groups.items():
        kvs = torch.stack([kv[i] for i in idx]).to(x.device)
        khs = torch.stack([kh[i] for i in idx]).to(x.device)
        _sep_blur_group(x, out, idx, kvs, khs, work, dense=how == "dense")
    if fft_idx:
        r = max(radius_l[i] for i in fft_idx)
        sel = torch.as_tensor(fft_idx, device=x.device)
        kern = kernels.index_select(0, sel)[:, half - r : half + r + 1, half - r : half + r + 1]
        _fft_blur_group(x, out, fft_idx, kern, _fft_chunk(c, h, w, r))
    return _finish(out, result, orig_dtype)


def _finish(out: torch.Tensor, result: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if result is None:
        return out.to(dtype)
    if result is not out:
        result.copy_(out)
    return result


def _effective_radius(kernels: torch.Tensor, tol: float) -> torch.Tensor:
    """Smallest radius whose outside |mass| is ``<= tol`` (``0`` mass for ``tol=0``)."""
    k = kernels.shape[-1]
    half = k // 2
    ring = _ring_radius(k, kernels.device).flatten()
    mass = torch.zeros(kernels.shape[0], half + 1, dtype=torch.float64, device=kernels.device)
    mass.index_add_(1, ring, kernels.detach().abs().to(torch.float64).flatten(1))
    outside = mass.flip(1).cumsum(1).flip(1) - mass
    return (outside <= tol).int().argmax(dim=1)


# ----------------------------------------------------------------------------
# USM sharpening
# ----------------------------------------------------------------------------
_CV_SMALL_GAUSSIAN = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
}


def usm_kernel_1d(radius: int = 50, dtype=torch.float64, device=None) -> torch.Tensor:
    """Real-ESRGAN ``USMSharp`` 1-D kernel: ``cv2.getGaussianKernel(size, 0)`` with
    ``size = radius`` made odd (``radius + 1`` if even: 50 -> 51, the spec's
    51x51), ``sigma = 0.3*((size-1)*0.5-1)+0.8`` (8.0 for size 51), normalised;
    OpenCV's fixed tables for sizes 1, 3, 5, 7.  The 2-D kernel is its outer
    product."""
    size = radius + 1 if radius % 2 == 0 else radius
    if size < 1:
        raise ValueError(f"USM radius must be >= 1, got {radius}")
    if size in _CV_SMALL_GAUSSIAN:
        return torch.tensor(_CV_SMALL_GAUSSIAN[size], dtype=dtype, device=device)
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    g = torch.exp(-(ax * ax) / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def usm_sharpen_reference(x: torch.Tensor, weight: float = 0.5, threshold: float = 10, radius: int = 50) -> torch.Tensor:
    """Real-ESRGAN ``USMSharp`` with the plain 2-D ``filter2D`` (``blur_reference``).

    ``blur = filter2D(x, g g^T)``, ``res = x - blur``,
    ``mask = (|res| * 255 > threshold)``, ``soft = filter2D(mask, g g^T)``,
    ``sharp = clamp(x + weight * res, 0, 1)``, ``out = soft*sharp + (1-soft)*x``.
    """
    g = usm_kernel_1d(radius, torch.float64, x.device)
    k2 = torch.outer(g, g).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    bl = blur_reference(x, k2)
    res = x - bl
    mask = (torch.abs(res) * 255 > threshold).to(x.dtype)
    soft = blur_reference(mask, k2)
    sharp = torch.clamp(x + weight * res, 0, 1)
    return soft * sharp + (1 - soft) * x


_USM_BATCHED = False  # tests set it to run the CUDA code path on CPU


def _usm_batched(x: torch.Tensor, out: torch.Tensor, weight: float, thr: float, radius: int) -> None:
    """USM for a whole batch with FFT blurs (the CUDA path; ``thr`` on the 0-1 scale)."""
    g = usm_kernel_1d(radius, torch.float64, x.device)
    k2 = torch.outer(g, g).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    res = x - blur(x, k2, method="fft", tol=0.0)
    soft = blur(torch.abs(res).gt_(thr).to(x.dtype), k2, method="fft", tol=0.0)
    sharp = torch.add(x, res, alpha=weight).clamp_(0, 1)
    torch.lerp(x, sharp, soft, out=out)


def usm_sharpen(
    x: torch.Tensor,
    weight: float = 0.5,
    threshold: float = 10,
    radius: int = 50,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real-ESRGAN ``USMSharp``, fast (same formula as :func:`usm_sharpen_reference`).

    The 2-D kernel is exactly ``g g^T`` (rank 1).  CPU: both blurs run as two
    block-banded 1-D passes (the residual ``x - blur`` fused into the last
    product), patch by patch with the mask and blend so the working set stays
    in cache.  CUDA: batched FFT blurs.  The blend ``soft*sharp + (1-soft)*x`` is computed as
    ``lerp(x, sharp, soft)`` and the mask as ``|res| > threshold/255``.
    Differences from the reference are float32 rounding (~1e-6), plus, where
    ``|res|*255`` is within rounding of ``threshold``, a flipped mask pixel
    (moves ``soft`` by at most ``max(g)^2 = 0.0025``, the output by
    ``0.0025 * weight * |res|`` -- typically ~1e-4).  Any ``H, W >= 1``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    bsz, c, h, w = x.shape
    orig_dtype = x.dtype
    work = torch.float32 if orig_dtype in (torch.float16, torch.bfloat16) else orig_dtype
    x = x.to(work).contiguous()
    result = out
    if out is None or out.dtype != work or not out.is_contiguous() or out.shape != x.shape:
        out = torch.empty_like(x)
    if x.numel() == 0:
        return _finish(out, result, orig_dtype)
    thr = float(threshold) / 255.0
    if x.device.type != "cpu" or _USM_BATCHED:  # whole batch at once: FFT blurs, then elementwise
        _usm_batched(x, out, weight, thr, radius)
        return _finish(out, result, orig_dtype)
    g = usm_kernel_1d(radius, torch.float64, x.device).view(1, 1, -1)
    plan = _SepPlan(g, g, h, w, c, work, x.device)
    ybuf = torch.empty(c * h * w, dtype=work, device=x.device)
    res = torch.empty((c, h, w), dtype=work, device=x.device)
    mask = torch.empty_like(res)
    soft = torch.empty_like(res)
    for i in range(bsz):
        xi, oi = x[i], out[i]
        plan.run(0, xi, res, ybuf, base=xi)  # res = x - blur(x)
        torch.abs(res, out=mask).gt_(thr)  # 1.0 where |res| * 255 > threshold
        plan.run(0, mask, soft, ybuf)  # soft mask
        torch.add(xi, res, alpha=weight, out=mask).clamp_(0, 1)  # sharp
        torch.lerp(xi, mask, soft, out=oi)
    return _finish(out, result, orig_dtype)
