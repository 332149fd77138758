"""Drawing every random parameter of one video batch (spec sections 2-6).

All draws come from one CPU ``torch.Generator`` seeded by (run seed, epoch,
batch index, "params"), in a fixed order and with a fixed number of draws per
patch, so a batch's parameters never depend on which worker or device makes
it.  Per-patch values are 1-D tensors of length ``n``; values shared by the
video batch (resize scales and modes, Gaussian-vs-Poisson, ending, codec
parameters) are plain Python values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import CODECS, KERNEL_NAMES, PRESETS, RESIZE_MODES, SINC, DegradationConfig
from .video import VideoParams


# ---------------------------------------------------------------------------
# small draw helpers (all on the CPU generator)
def _uniform(gen: torch.Generator, lo: float, hi: float, n: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _randint(gen: torch.Generator, lo: int, hi: int, n: int) -> torch.Tensor:
    """Uniform integers in [lo, hi] inclusive."""
    return torch.randint(lo, hi + 1, (n,), generator=gen)


def _choice(gen: torch.Generator, probs: Sequence[float], n: int) -> torch.Tensor:
    """Indices drawn with the given probabilities (inverse CDF of one uniform each)."""
    cdf = torch.tensor(probs, dtype=torch.float64).cumsum(0)
    cdf[-1] = 1.0 + 1e-12
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(probs) - 1)


def _scalar_uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(_uniform(gen, lo, hi, 1).item())


def _scalar_choice(gen: torch.Generator, probs: Sequence[float]) -> int:
    return int(_choice(gen, probs, 1).item())


# ---------------------------------------------------------------------------
@dataclass
class KernelDraw:
    """Per-patch blur kernel parameters (spec section 5); kind codes follow config.KERNEL_NAMES."""

    kind: torch.Tensor  # long
    size: torch.Tensor  # long, odd
    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    angle: torch.Tensor
    beta: torch.Tensor
    omega_c: torch.Tensor

    def record(self, i: int) -> dict[str, Any]:
        kind = int(self.kind[i])
        rec: dict[str, Any] = {"type": KERNEL_NAMES[kind], "size": int(self.size[i])}
        if kind == SINC:
            rec["omega_c"] = float(self.omega_c[i])
            return rec
        rec["sigma_x"] = float(self.sigma_x[i])
        rec["sigma_y"] = float(self.sigma_y[i])
        rec["angle"] = float(self.angle[i])
        if KERNEL_NAMES[kind].startswith(("generalized", "plateau")):
            rec["beta"] = float(self.beta[i])
        return rec


_FAMILY = {  # indexed by kernel code (KERNEL_NAMES order)
    "aniso": torch.tensor([n.endswith("aniso") for n in KERNEL_NAMES]),
    "plateau": torch.tensor([n.startswith("plateau") for n in KERNEL_NAMES]),
    "gaussian": torch.tensor([n in ("iso", "aniso") for n in KERNEL_NAMES]),
}


def draw_kernels(gen: torch.Generator, cfg: DegradationConfig, n: int, sigma_range: tuple[float, float],
                 sinc_prob: float) -> KernelDraw:
    """Real-ESRGAN's random_mixed_kernels + sinc branch, vectorised; a fixed 10 draws per patch."""
    size = torch.tensor(cfg.kernel_sizes)[_randint(gen, 0, len(cfg.kernel_sizes) - 1, n)]
    is_sinc = torch.rand(n, generator=gen, dtype=torch.float64) < sinc_prob
    omega_small = _uniform(gen, math.pi / 3, math.pi, n)
    omega_large = _uniform(gen, math.pi / 5, math.pi, n)
    omega = torch.where(size < 13, omega_small, omega_large)
    kind = _choice(gen, cfg.kernel_probs, n)
    # config order -> KERNEL_NAMES codes, then per-code family flags (lookup tables, no per-patch loops)
    to_code = torch.tensor([KERNEL_NAMES.index(t) for t in cfg.kernel_types], dtype=torch.long)
    kind = to_code[kind]
    sx = _uniform(gen, *sigma_range, n)
    sy = _uniform(gen, *sigma_range, n)
    angle = _uniform(gen, -math.pi, math.pi, n)
    beta_low = torch.rand(n, generator=gen, dtype=torch.float64) < 0.5
    u_beta = torch.rand(n, generator=gen, dtype=torch.float64)
    aniso = _FAMILY["aniso"][kind]
    sy = torch.where(aniso, sy, sx)
    angle = torch.where(aniso, angle, torch.zeros_like(angle))
    blo, bhi = cfg.betag_range
    plo, phi = cfg.betap_range
    beta_g = torch.where(beta_low, blo + (1 - blo) * u_beta, 1 + (bhi - 1) * u_beta)
    beta_p = torch.where(beta_low, plo + (1 - plo) * u_beta, 1 + (phi - 1) * u_beta)
    beta = torch.where(_FAMILY["plateau"][kind], beta_p, beta_g)
    beta = torch.where(_FAMILY["gaussian"][kind], torch.ones_like(beta), beta)
    kind = torch.where(is_sinc, torch.full_like(kind, SINC), kind)
    return KernelDraw(kind, size.long(), sx, sy, angle, beta, omega)


def select_patches(draw, sel):
    """A per-patch draw (KernelDraw, NoiseDraw) restricted to ``sel`` (a slice or index tensor)."""
    return type(draw)(**{f: (v[sel] if isinstance(v, torch.Tensor) else v) for f, v in vars(draw).items()})


def _broadcast_first(k: KernelDraw, n: int) -> KernelDraw:
    """The vcisr-code quirk: one kernel for the whole video batch."""
    return KernelDraw(*(getattr(k, f)[:1].expand(n).clone() for f in KernelDraw.__dataclass_fields__))


@dataclass
class NoiseDraw:
    gaussian: bool  # shared by the video batch
    strength: torch.Tensor  # sigma (0-255 scale) or Poisson scale, per patch
    gray: torch.Tensor  # bool per patch

    def record(self, i: int) -> dict[str, Any]:
        if self.gaussian:
            return {"type": "gaussian", "sigma": float(self.strength[i]), "gray": bool(self.gray[i])}
        return {"type": "poisson", "scale": float(self.strength[i]), "gray": bool(self.gray[i])}


def draw_noise(gen: torch.Generator, n: int, gaussian_prob: float, sigma: tuple[float, float],
               poisson: tuple[float, float], gray_prob: float) -> NoiseDraw:
    gaussian = bool(torch.rand(1, generator=gen, dtype=torch.float64).item() < gaussian_prob)
    s_gauss = _uniform(gen, *sigma, n)
    s_poisson = _uniform(gen, *poisson, n)
    gray = torch.rand(n, generator=gen, dtype=torch.float64) < gray_prob
    return NoiseDraw(gaussian, s_gauss if gaussian else s_poisson, gray)


@dataclass
class ResizeDraw:
    scale: float
    mode: str

    def record(self) -> dict[str, Any]:
        return {"scale": self.scale, "mode": self.mode}


def draw_resize(gen: torch.Generator, probs: Sequence[float], scale_range: tuple[float, float]) -> ResizeDraw:
    """up / down / keep with ``probs``; up U[1, hi], down U[lo, 1]; mode uniform (Real-ESRGAN)."""
    updown = _scalar_choice(gen, probs)
    u = _scalar_uniform(gen, 0.0, 1.0)
    if updown == 0:
        scale = 1.0 + (scale_range[1] - 1.0) * u
    elif updown == 1:
        scale = scale_range[0] + (1.0 - scale_range[0]) * u
    else:
        scale = 1.0
    mode = RESIZE_MODES[int(_randint(gen, 0, len(RESIZE_MODES) - 1, 1).item())]
    return ResizeDraw(scale, mode)


def draw_video(gen: torch.Generator, cfg: DegradationConfig) -> VideoParams:
    """Codec, quality control, preset, fps and aspect ratio of one video batch (section 6)."""
    codec = CODECS[_scalar_choice(gen, cfg.codec_probs)]
    bitrate = int(_randint(gen, *cfg.bitrate_kbps, 1).item())
    crf264 = int(_randint(gen, *cfg.crf_x264, 1).item())
    crf265 = int(_randint(gen, *cfg.crf_x265, 1).item())
    preset = PRESETS[_scalar_choice(gen, cfg.preset_probs)]
    fps = int(_randint(gen, *cfg.fps_range, 1).item())
    ar_kind = _scalar_choice(gen, (cfg.aspect_shrink_prob, cfg.aspect_expand_prob,
                                   1.0 - cfg.aspect_shrink_prob - cfg.aspect_expand_prob))
    u = _scalar_uniform(gen, 0.0, 1.0)
    if ar_kind == 0:
        lo, hi = cfg.aspect_shrink_range
        ratio = lo + (hi - lo) * u  # [lo, hi): u < 1
    elif ar_kind == 1:
        lo, hi = cfg.aspect_expand_range
        ratio = hi - (hi - lo) * u  # (lo, hi]: u < 1
    else:
        ratio = 1.0
    if codec == "mpeg2video":
        fps = cfg.mpeg2_fps
        if not cfg.mpeg2_aspect:
            ratio = 1.0
    x26x = codec in ("libx264", "libx265")
    return VideoParams(
        codec=codec,
        fps=fps,
        aspect_ratio=float(ratio),
        crf=(crf264 if codec == "libx264" else crf265) if x26x else None,
        bitrate_kbps=None if x26x else bitrate,
        preset=preset if x26x else None,
    )


@dataclass
class BatchParams:
    """Everything random about one video batch."""

    n: int
    kernel1: KernelDraw
    resize1: ResizeDraw
    noise1: NoiseDraw
    jpeg1_quality: torch.Tensor  # int per patch
    blur2: torch.Tensor  # bool per patch: second blur applied
    kernel2: KernelDraw
    resize2: ResizeDraw
    noise2: NoiseDraw
    ending: str  # "v1" | "v2"
    final_mode: str  # resize-to-LR mode of the ending
    video: VideoParams
    v1_resize_first: bool
    final_sinc: torch.Tensor  # bool per patch
    final_sinc_omega: torch.Tensor
    jpeg2_quality: torch.Tensor

    def slice(self, lo: int, hi: int) -> "BatchParams":
        """The parameters of patches ``lo:hi`` (values shared by the batch are kept)."""
        def cut(d):
            return select_patches(d, slice(lo, hi))

        return BatchParams(
            n=hi - lo, kernel1=cut(self.kernel1), resize1=self.resize1, noise1=cut(self.noise1),
            jpeg1_quality=self.jpeg1_quality[lo:hi], blur2=self.blur2[lo:hi], kernel2=cut(self.kernel2),
            resize2=self.resize2, noise2=cut(self.noise2), ending=self.ending, final_mode=self.final_mode,
            video=self.video, v1_resize_first=self.v1_resize_first, final_sinc=self.final_sinc[lo:hi],
            final_sinc_omega=self.final_sinc_omega[lo:hi], jpeg2_quality=self.jpeg2_quality[lo:hi],
        )

    def patch_record(self, i: int) -> dict[str, Any]:
        """The spec section 8 parameters of patch ``i`` (codec fields filled by the engine)."""
        v1 = self.ending == "v1"
        rec: dict[str, Any] = {
            "ending": self.ending,
            "kernel1": self.kernel1.record(i),
            "kernel2": self.kernel2.record(i) if bool(self.blur2[i]) else None,
            "resize1": self.resize1.record(),
            "resize2": self.resize2.record(),
            "noise1": self.noise1.record(i),
            "noise2": self.noise2.record(i),
            "jpeg1_quality": int(self.jpeg1_quality[i]),
            "final_resize_mode": self.final_mode,
        }
        if v1:
            rec["jpeg2_quality"] = int(self.jpeg2_quality[i])
            rec["final_sinc"] = (
                {"omega_c": float(self.final_sinc_omega[i]), "size": 21} if bool(self.final_sinc[i]) else None
            )
            rec["v1_order"] = "resize_sinc_jpeg" if self.v1_resize_first else "jpeg_resize_sinc"
        return rec


def sample_batch_params(cfg: DegradationConfig, n: int, gen: torch.Generator) -> BatchParams:
    """Draw all parameters of an ``n``-patch video batch, in a fixed order."""
    if n < 1:
        raise ValueError("a video batch needs at least one patch")
    kernel1 = draw_kernels(gen, cfg, n, cfg.blur_sigma1, cfg.sinc_prob1)
    kernel2 = draw_kernels(gen, cfg, n, cfg.blur_sigma2, cfg.sinc_prob2)
    if cfg.kernel_per_batch:
        kernel1, kernel2 = _broadcast_first(kernel1, n), _broadcast_first(kernel2, n)
    resize1 = draw_resize(gen, cfg.resize_probs1, cfg.resize_range1)
    noise1 = draw_noise(gen, n, cfg.gaussian_noise_prob1, cfg.noise_sigma1, cfg.poisson_scale1, cfg.gray_noise_prob1)
    jpeg1 = _randint(gen, *cfg.jpeg_range1, n)
    blur2 = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.second_blur_prob
    resize2 = draw_resize(gen, cfg.resize_probs2, cfg.resize_range2)
    noise2 = draw_noise(gen, n, cfg.gaussian_noise_prob2, cfg.noise_sigma2, cfg.poisson_scale2, cfg.gray_noise_prob2)
    ending = "v2" if _scalar_uniform(gen, 0.0, 1.0) < cfg.v2_prob else "v1"
    final_mode = RESIZE_MODES[int(_randint(gen, 0, len(RESIZE_MODES) - 1, 1).item())]
    video = draw_video(gen, cfg)
    v1_resize_first = _scalar_uniform(gen, 0.0, 1.0) < 0.5
    final_sinc = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.final_sinc_prob
    final_omega = _uniform(gen, math.pi / 3, math.pi, n)
    jpeg2 = _randint(gen, *cfg.jpeg_range2, n)
    return BatchParams(
        n=n, kernel1=kernel1, resize1=resize1, noise1=noise1, jpeg1_quality=jpeg1, blur2=blur2,
        kernel2=kernel2, resize2=resize2, noise2=noise2, ending=ending, final_mode=final_mode,
        video=video, v1_resize_first=v1_resize_first, final_sinc=final_sinc,
        final_sinc_omega=final_omega, jpeg2_quality=jpeg2,
    )
