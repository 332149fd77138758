"""Real-ESRGAN blur kernels (spec section 5), built batched in torch.

Every kernel of a batch is computed at once on the device of the inputs, in
float64, on the ``pad_to x pad_to`` grid; entries outside the kernel's true
``size x size`` window are zeroed, the kernel is normalised to sum 1 over its
true window, then returned (zero-padded, centred) as float32 by default.

Type codes (``server.degradation.config``): iso=0, aniso=1, generalized_iso=2,
generalized_aniso=3, plateau_iso=4, plateau_aniso=5, sinc=6 (``config.SINC``).

Formulas (x = column offset, y = row offset from the centre, as in
Real-ESRGAN's ``mesh_grid``; ``Q = [x y] S^-1 [x y]^T`` with
``S = R diag(sx^2, sy^2) R^T`` and ``R`` the rotation by ``angle``):

* Gaussian (iso, aniso):             ``exp(-0.5 Q)``
* generalized Gaussian:              ``exp(-0.5 Q^beta)``
* plateau:                           ``1 / (1 + Q^beta)``
* sinc (circular low-pass, Bessel):  ``omega_c J1(omega_c r) / (2 pi r)``
  (J1 from ``scipy.special.j1`` like Real-ESRGAN),
  centre ``omega_c^2 / (4 pi)``, ``r = sqrt(x^2 + y^2)``.

The isotropic types ignore ``sigma_y`` and ``angle`` (they use ``sigma_x``
and 0), exactly like Real-ESRGAN's ``random_mixed_kernels``.
"""

from __future__ import annotations

import math

import torch

from server.degradation.config import SINC

ISO, ANISO, GENERALIZED_ISO, GENERALIZED_ANISO, PLATEAU_ISO, PLATEAU_ANISO = range(6)

__all__ = [
    "ISO",
    "ANISO",
    "GENERALIZED_ISO",
    "GENERALIZED_ANISO",
    "PLATEAU_ISO",
    "PLATEAU_ANISO",
    "SINC",
    "build_kernels",
    "final_sinc_kernels",
    "flush_subnormals",
    "true_sizes",
]


def _vec(v, n: int, device, dtype=torch.float64) -> torch.Tensor:
    """A length-``n`` 1-D tensor on ``device`` from a tensor, list or scalar."""
    t = torch.as_tensor(v, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    return t.reshape(n).to(dtype)


def _bessel_j1(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Bessel J1 of ``z (B, K, K)`` float64 (only rows ``rows`` matter).

    Uses ``scipy.special.j1`` (what Real-ESRGAN uses; ~1e-16 accurate) on the
    few needed values; ``torch.special.bessel_j1`` is off by up to 5e-7 near
    z = 5, so it is only the fallback when SciPy is missing.
    """
    try:
        import scipy.special
    except ImportError:  # pragma: no cover - scikit-image depends on SciPy
        return torch.special.bessel_j1(z)
    out = torch.zeros_like(z)
    if bool(rows.any()):
        idx = rows.nonzero().flatten()
        vals = scipy.special.j1(z.index_select(0, idx).detach().cpu().numpy())
        out.index_copy_(0, idx, torch.from_numpy(vals).to(z.device))
    return out


def build_kernels(
    kind,
    size,
    sigma_x,
    sigma_y,
    angle,
    beta,
    omega_c,
    pad_to: int = 21,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real-ESRGAN kernels ``(B, pad_to, pad_to)``, one per row of the inputs.

    Implements ``bivariate_Gaussian`` / ``bivariate_generalized_Gaussian`` /
    ``bivariate_plateau`` / ``circular_lowpass_kernel`` of Real-ESRGAN (see the
    module docstring), evaluated in float64 (exact up to float64 rounding, then
    cast to ``dtype``), normalised to sum 1 in the true ``size`` window and
    zero-padded (centred) to ``pad_to``; subnormal float32 taps are flushed
    to 0 (see :func:`flush_subnormals`).  Inputs are 1-D tensors of length B
    (scalars are broadcast); unused parameters of a type are ignored (pass
    anything finite).  ``size`` must be odd and ``<= pad_to``.
    """
    kind_t = torch.as_tensor(kind)
    device = kind_t.device
    n = kind_t.numel()
    kind_t = kind_t.reshape(n).long()
    size_t = _vec(size, n, device, torch.long)
    if pad_to % 2 != 1:
        raise ValueError(f"pad_to must be odd, got {pad_to}")
    if n and (bool((size_t % 2 == 0).any()) or bool((size_t > pad_to).any()) or bool((size_t < 1).any())):
        raise ValueError(f"kernel sizes must be odd and in [1, {pad_to}], got {size_t.tolist()}")
    if n and (bool((kind_t < 0).any()) or bool((kind_t > SINC).any())):
        raise ValueError(f"kernel type codes must be in [0, {SINC}], got {kind_t.tolist()}")
    f64 = torch.float64
    sx = _vec(sigma_x, n, device)
    sy = _vec(sigma_y, n, device)
    th = _vec(angle, n, device)
    be = _vec(beta, n, device)
    om = _vec(omega_c, n, device)

    iso = (kind_t == ISO) | (kind_t == GENERALIZED_ISO) | (kind_t == PLATEAU_ISO)
    sy = torch.where(iso, sx, sy)
    th = torch.where(iso, torch.zeros_like(th), th)

    half = pad_to // 2
    ax = torch.arange(-half, half + 1, device=device, dtype=f64)
    yy = ax.view(1, -1, 1)  # row offset
    xx = ax.view(1, 1, -1)  # column offset

    # Q = [x y] R diag(1/sx^2, 1/sy^2) R^T [x y]^T
    c = torch.cos(th).view(-1, 1, 1)
    s = torch.sin(th).view(-1, 1, 1)
    u = xx * c + yy * s
    v = -xx * s + yy * c
    safe_sx = torch.where(kind_t == SINC, torch.ones_like(sx), sx).view(-1, 1, 1)
    safe_sy = torch.where(kind_t == SINC, torch.ones_like(sy), sy).view(-1, 1, 1)
    q = (u / safe_sx) ** 2 + (v / safe_sy) ** 2
    b3 = be.view(-1, 1, 1)
    k3 = kind_t.view(-1, 1, 1)

    gauss = torch.exp(-0.5 * q)
    qb = torch.pow(q, torch.where(k3 >= GENERALIZED_ISO, b3, torch.ones_like(b3)))
    general = torch.exp(-0.5 * qb)
    plateau = 1.0 / (qb + 1.0)

    r = torch.sqrt(xx * xx + yy * yy).expand(n, -1, -1)
    o3 = om.view(-1, 1, 1)
    r_safe = torch.where(r == 0, torch.ones_like(r), r)
    sinc = o3 * _bessel_j1(o3 * r_safe, kind_t == SINC) / (2 * math.pi * r_safe)
    sinc = torch.where(r == 0, (o3 * o3 / (4 * math.pi)).expand_as(sinc), sinc)

    k = torch.where(k3 <= ANISO, gauss, general)
    k = torch.where((k3 == PLATEAU_ISO) | (k3 == PLATEAU_ANISO), plateau, k)
    k = torch.where(k3 == SINC, sinc, k)

    h = (size_t // 2).view(-1, 1, 1)
    inside = (yy.abs() <= h) & (xx.abs() <= h)
    k = torch.where(inside, k, torch.zeros((), dtype=f64, device=device))
    k = k / k.sum(dim=(1, 2), keepdim=True)
    return flush_subnormals(k.to(dtype))


def flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """Set subnormal entries (``|v| < finfo.tiny``, e.g. Gaussian tails like
    ``exp(-100)`` cast to float32) to 0.  They change a filtered pixel by
    < 1e-37 but make CPU convolutions/GEMMs up to 4x slower."""
    if not t.dtype.is_floating_point:
        return t
    tiny = torch.finfo(t.dtype).tiny
    return torch.where(t.abs() < tiny, torch.zeros((), dtype=t.dtype, device=t.device), t)


def final_sinc_kernels(omega_c, size: int = 21, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real-ESRGAN final sinc filter: ``circular_lowpass_kernel(omega_c, size)``.

    ``(B, size, size)`` normalised kernels (sum 1), float64-exact then cast.
    """
    om = torch.as_tensor(omega_c, dtype=torch.float64)
    om = om.reshape(-1)
    n = om.numel()
    kind = torch.full((n,), SINC, dtype=torch.long, device=om.device)
    one = torch.ones(n, dtype=torch.float64, device=om.device)
    return build_kernels(kind, size, one, one, one * 0, one, om, pad_to=size, dtype=dtype)


def true_sizes(kernels: torch.Tensor) -> torch.Tensor:
    """Smallest odd ``k`` per kernel such that all taps outside the centred
    ``k x k`` window are exactly zero (``(B,)`` long, on the kernels' device).

    For kernels from :func:`build_kernels` this is ``<= size`` (it is smaller
    when the outer taps underflow to 0, e.g. a Gaussian with sigma 0.2).
    """
    b, kh, kw = kernels.shape
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"kernels must be (B, K, K) with K odd, got {tuple(kernels.shape)}")
    half = kh // 2
    ax = torch.arange(-half, half + 1, device=kernels.device).abs()
    ring = torch.maximum(ax.view(-1, 1), ax.view(1, -1))  # Chebyshev radius per tap
    nz = kernels != 0
    radius = torch.where(nz, ring.expand_as(nz), torch.zeros_like(ring).expand_as(nz))
    return radius.flatten(1).amax(dim=1) * 2 + 1
