"""The degradation engine: one video batch in, LR/HR pairs and their records out.

Spec sections 3-9.  Every stage is a batched torch operation on the engine's
device (CPU or CUDA, unchanged code); the video block runs on uint8 frames
through a codec backend.  A batch is a pure function of (images, config, run
seed, epoch, batch index): parameters come from a CPU generator seeded by that
triple, noise from a generator on the engine's device seeded the same way.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from . import filters, jpeg, kernels, noise
from .resize import resize
from .codecs import CodecBackend, CodecError, SoftwareBackend, compress_video
from .config import DegradationConfig
from .epoch_plan import EpochPlan, PatchRef
from .images import ImageFolder
from .params import BatchParams, KernelDraw, NoiseDraw, sample_batch_params, select_patches
from .seeding import make_generator

log = logging.getLogger(__name__)

#: Patches per step of the HR-size stages. Fixed, because the noise generator is drawn
#: chunk by chunk: part of what makes a batch's bytes a function of its seed alone.
CHUNK = 32

#: The codec outcome of a batch that went through no codec (V1 ending).
NO_CODEC = {"backend": None, "codec": None, "crf": None, "bitrate_kbps": None, "preset": None,
            "codec_failure": None, "fallback": False}

#: Stage names, in pipeline order, as reported by timings and the benchmark.
STAGES = ("load", "usm", "blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2",
          "ending", "codec", "pack")


@dataclass
class BatchResult:
    """One degraded video batch. Arrays are uint8, row-major NHWC."""

    seed: int
    epoch: int
    batch_index: int
    lr: np.ndarray
    hr: np.ndarray | None
    hr_usm: np.ndarray | None
    records: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    codec_failures: int = 0
    #: the uint8 frames that entered the video block and its parameters (benchmarks only)
    precodec: np.ndarray | None = None
    video: Any = None

    def __len__(self) -> int:
        return len(self.records)


class Engine:
    """Runs the VCISR degradation of spec sections 3-6 on one device."""

    def __init__(self, cfg: DegradationConfig | None = None, device: str | torch.device = "cpu",
                 backend: CodecBackend | None = None, keep_precodec: bool = False):
        self.cfg = cfg or DegradationConfig()
        self.keep_precodec = keep_precodec
        self._precodec: np.ndarray | None = None
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
        self.backend = backend or SoftwareBackend()
        self._timings: dict[str, float] = {}

    # ------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------
    def make_batch(self, folder: ImageFolder, plan: EpochPlan, index: int, *, want_hr: bool = True,
                   want_usm: bool = True) -> BatchResult:
        """Degrade video batch ``index`` of ``plan``; HR/USM arrays only when wanted."""
        return self.make_batch_from_refs(folder, plan.seed, plan.epoch, index, plan.batch(index),
                                         want_hr=want_hr, want_usm=want_usm)

    def make_batch_from_refs(self, folder: ImageFolder, seed: int, epoch: int, index: int,
                             refs: tuple[PatchRef, ...], *, want_hr: bool = True,
                             want_usm: bool = True) -> BatchResult:
        """Degrade the video batch made of ``refs`` (batch ``index`` of ``epoch`` under ``seed``)."""
        self._timings = {}
        self._precodec = None
        with self._stage("load"):
            hr8 = crop_patches(folder, refs, self.cfg.patch_size)
        params = sample_batch_params(self.cfg, len(refs), make_generator(seed, epoch, index, "params"))
        noise_gen = make_generator(seed, epoch, index, "noise", device=self.device)
        usm8 = np.empty_like(hr8) if want_usm else None
        pieces = []
        for lo in range(0, len(refs), CHUNK):  # bounded memory: HR-size tensors exist for CHUNK patches only
            hi = min(lo + CHUNK, len(refs))
            with self._stage("load"):
                hr = torch.from_numpy(hr8[lo:hi]).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            if usm8 is not None:
                with self._stage("usm"):
                    sharp = filters.usm_sharpen(hr, weight=self.cfg.usm_weight, threshold=self.cfg.usm_threshold,
                                                radius=self.cfg.usm_radius)
                    usm8[lo:hi] = to_uint8_nhwc(sharp)
                    del sharp
            pieces.append(self.degrade_orders(hr, params.slice(lo, hi), noise_gen))
            del hr
        lr8, codec_info = self.degrade_ending(torch.cat(pieces), params)
        with self._stage("pack"):
            records = [
                self._record(seed, epoch, index, i, ref, params, codec_info) for i, ref in enumerate(refs)
            ]
        return BatchResult(
            seed=seed, epoch=epoch, batch_index=index, lr=lr8,
            hr=hr8 if want_hr else None, hr_usm=usm8, records=records, timings=dict(self._timings),
            codec_failures=int(codec_info.get("codec_failure") is not None),
            precodec=self._precodec, video=params.video if params.ending == "v2" else None,
        )

    # ------------------------------------------------------------------
    def degrade_orders(self, hr: torch.Tensor, p: BatchParams, noise_gen: torch.Generator) -> torch.Tensor:
        """First- and second-order degradation (spec sections 3, 4.1-4.3) of HR float (n,3,P,P) in [0,1]."""
        cfg = self.cfg
        out = hr
        with self._stage("blur1"):
            out = self._blur(out, p.kernel1)
        with self._stage("resize1"):
            if p.resize1.scale != 1.0:
                out = resize(out, scale_factor=p.resize1.scale, mode=p.resize1.mode)
        with self._stage("noise1"):
            out = self._noise(out, p.noise1, noise_gen)
        with self._stage("jpeg1"):
            out = jpeg.jpeg_roundtrip(out.clamp(0, 1), p.jpeg1_quality.to(out.device), impl=cfg.jpeg_impl)
        with self._stage("blur2"):
            if bool(p.blur2.any()):
                idx = p.blur2.nonzero().flatten()
                sub = self._blur(out[idx.to(out.device)], select_patches(p.kernel2, idx))
                out = out.clone()
                out[idx.to(out.device)] = sub
        with self._stage("resize2"):
            if cfg.resize2_relative_to_current:
                size = [max(2, int(s * p.resize2.scale)) for s in out.shape[-2:]]
            else:
                size = [max(2, int(cfg.lr_size * p.resize2.scale))] * 2
            if list(out.shape[-2:]) != size:
                out = resize(out, size=size, mode=p.resize2.mode)
        with self._stage("noise2"):
            out = self._noise(out, p.noise2, noise_gen)
        return out

    def degrade_ending(self, out: torch.Tensor, p: BatchParams) -> tuple[np.ndarray, dict]:
        """The ending of spec section 4.4 on the whole video batch: LR uint8 (n,p,p,3) and the codec outcome."""
        cfg = self.cfg
        lr_hw = [cfg.lr_size, cfg.lr_size]
        if p.ending == "v2":
            with self._stage("ending"):
                out = _resize_to(out, lr_hw, p.final_mode)
                frames = to_uint8_nhwc(out)
                if self.keep_precodec:
                    self._precodec = frames.copy()
            with self._stage("codec"):
                try:
                    frames, info = compress_video(frames, p.video, self.backend)
                except CodecError as exc:  # every retry and the fallback failed: keep the run going
                    log.error("video block failed for every codec, LR left uncompressed: %s", exc)
                    info = {**NO_CODEC, "codec_failure": str(exc), "fallback": True}
            return np.ascontiguousarray(frames), info
        with self._stage("ending"):
            q2 = p.jpeg2_quality.to(out.device)
            if p.v1_resize_first:
                out = self._final_sinc(_resize_to(out, lr_hw, p.final_mode), p)
                out = jpeg.jpeg_roundtrip(out.clamp(0, 1), q2, impl=cfg.jpeg_impl)
            else:
                out = jpeg.jpeg_roundtrip(out.clamp(0, 1), q2, impl=cfg.jpeg_impl)
                out = self._final_sinc(_resize_to(out, lr_hw, p.final_mode), p)
            lr8 = to_uint8_nhwc(out)
        return lr8, dict(NO_CODEC)

    # ------------------------------------------------------------------
    def _blur(self, x: torch.Tensor, k: KernelDraw) -> torch.Tensor:
        kern = kernels.build_kernels(k.kind, k.size, k.sigma_x, k.sigma_y, k.angle, k.beta, k.omega_c,
                                     pad_to=self.cfg.kernel_pad_to)
        return filters.blur(x, kern.to(device=x.device, dtype=x.dtype), k.size.to(x.device))

    def _noise(self, x: torch.Tensor, d: NoiseDraw, gen: torch.Generator) -> torch.Tensor:
        strength = d.strength.to(device=x.device, dtype=x.dtype)
        gray = d.gray.to(x.device)
        if d.gaussian:
            return noise.add_gaussian_noise(x, strength, gray, gen)
        return noise.add_poisson_noise(x, strength, gray, gen)

    def _final_sinc(self, x: torch.Tensor, p: BatchParams) -> torch.Tensor:
        """Real-ESRGAN's final sinc filter; patches without one keep the pulse (identity) kernel."""
        if not bool(p.final_sinc.any()):
            return x
        idx = p.final_sinc.nonzero().flatten()
        kern = kernels.final_sinc_kernels(p.final_sinc_omega[idx], size=self.cfg.final_sinc_size)
        dev_idx = idx.to(x.device)
        out = x.clone()
        out[dev_idx] = filters.blur(x[dev_idx], kern.to(device=x.device, dtype=x.dtype))
        return out

    # ------------------------------------------------------------------
    def _record(self, seed: int, epoch: int, index: int, i: int, ref: PatchRef, p: BatchParams,
                codec: dict) -> dict[str, Any]:
        v2 = p.ending == "v2"
        rec: dict[str, Any] = {
            "patch_id": patch_id(epoch, ref),
            "image": ref.image,
            "x": ref.x,
            "y": ref.y,
            "epoch": epoch,
            "seed": seed,
            "batch_index": index,
            "index_in_batch": i,
            "profile": self.cfg.profile,
            "codec": codec["codec"] if v2 else None,
            "crf": codec["crf"] if v2 else None,
            "bitrate_kbps": codec["bitrate_kbps"] if v2 else None,
            "preset": codec["preset"] if v2 else None,
            "fps": p.video.fps if v2 else None,
            "aspect_ratio": p.video.aspect_ratio if v2 else None,
            "backend": codec["backend"] if v2 else None,
            "codec_failure": codec.get("codec_failure"),
            "jpeg_impl": jpeg.jpeg_backend(self.device, self.cfg.jpeg_impl),
            "device": self.device.type,
        }
        rec.update(p.patch_record(i))
        return rec


# ---------------------------------------------------------------------------
def patch_id(epoch: int, ref: PatchRef) -> str:
    """The identity of a patch: its image, corner and epoch."""
    return f"e{epoch}/{ref.image}/{ref.x}_{ref.y}"


def crop_patches(folder: ImageFolder, refs: tuple[PatchRef, ...], size: int) -> np.ndarray:
    """Stack the HR crops of ``refs`` as uint8 (n, size, size, 3)."""
    out = np.empty((len(refs), size, size, 3), dtype=np.uint8)
    for i, ref in enumerate(refs):
        try:
            img = folder.load(ref.image)
        except ValueError as exc:
            raise ValueError(f"image {ref.image} became unreadable after the scan: {exc}") from exc
        if img.shape[0] < ref.y + size or img.shape[1] < ref.x + size:
            raise ValueError(f"image {ref.image} changed size after the scan ({img.shape[1]}x{img.shape[0]})")
        out[i] = img[ref.y:ref.y + size, ref.x:ref.x + size]
    return out


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Float [0,1] NCHW -> uint8 NHWC on the CPU, rounding like Real-ESRGAN."""
    y = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return np.ascontiguousarray(y.cpu().numpy())


def _resize_to(x: torch.Tensor, size: list[int], mode: str) -> torch.Tensor:
    if list(x.shape[-2:]) == size:
        return x
    return resize(x, size=size, mode=mode)
