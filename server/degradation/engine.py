"""The degradation engine: one video batch in, LR/HR pairs and their records out.

Spec sections 3-9.  Every stage is a batched torch operation on the engine's
device (CPU or CUDA, unchanged code); the video block runs on uint8 frames
through the :class:`~server.degradation.video.VideoCodec` the engine is given
(``server.codecs.VideoRoundTrip``: PyAV / FFmpeg, or NVENC / NVDEC).  A batch
is a pure function of (images, config, run seed, epoch, batch index):
parameters come from a CPU generator seeded by that triple, noise from a
generator on the engine's device seeded the same way.
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
from .config import DegradationConfig
from .epoch_plan import EpochPlan, PatchRef
from .images import ImageFolder
from .params import BatchParams, KernelDraw, NoiseDraw, sample_batch_params, select_patches
from .resize import resize
from .seeding import make_generator
from .video import CodecError, VideoCodec, VideoParams

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
    #: the shared-memory file the arrays are views of, if any (server.pipeline.shared_result.BatchFile): it
    #: goes when the result does, or is handed on to a same-host delivery slot (server.service.slots)
    shared: Any = None

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class DeviceOutput:
    """What the device stage hands to the video block: uint8 NHWC tensors on the engine's device.

    ``lr`` holds the frames that enter the video block (V2 ending) or the final LR
    (V1 ending, which needs no codec).  ``usm`` is the sharpened HR, when wanted.
    """

    params: BatchParams
    lr: torch.Tensor
    usm: torch.Tensor | None

    @property
    def needs_codec(self) -> bool:
        return self.params.ending == "v2"


def resolve_jpeg_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> libjpeg-turbo on the CPU, kornia's DiffJPEG on a GPU (it stays on the device:
    no host round trip, no split of the device stage); anything else as given."""
    if impl == "auto":
        return "diffjpeg" if device.type == "cuda" else "libjpeg"
    return impl


class Engine:
    """Runs the VCISR degradation of spec sections 3-6 on one device.

    A batch is three steps, which the whole-batch path (:meth:`make_batch`) runs
    one after another and the split pipeline (``server.pipeline.split``) runs in
    different places: HR crops (:func:`crop_patches`, CPU), the device stage
    (:meth:`device_stage`: USM, first and second order, the ending up to the codec
    boundary), and the video block (:func:`video_block`, CPU codecs).  Both paths
    call these same functions, so both give the same bytes.

    ``codec``: the video block's round trip (``server.codecs.VideoRoundTrip()`` for
    the software codecs).  An engine without one makes V1 batches and runs the device
    stage; a batch that needs a codec then stops with a clear error.

    ``time_stages``: per-stage timings in :attr:`BatchResult.timings`.  Off, the
    engine never waits for the device; on, CUDA stages are timed with CUDA events
    (no synchronisation inside the batch either).
    """

    def __init__(self, cfg: DegradationConfig | None = None, device: str | torch.device = "cpu",
                 codec: VideoCodec | None = None, keep_precodec: bool = False, time_stages: bool = False):
        self.cfg = cfg or DegradationConfig()
        self.keep_precodec = keep_precodec
        self.time_stages = time_stages
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
        self.jpeg_impl = resolve_jpeg_impl(self.cfg.jpeg_impl, self.device)
        self.codec = codec
        self._timings: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []

    # ------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Time a device stage when asked: CUDA events on a GPU (read later), the wall clock on the CPU."""
        if not self.time_stages:
            yield
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            return
        with self._host_stage(name):
            yield

    @contextmanager
    def _host_stage(self, name: str) -> Iterator[None]:
        """Time a host stage (HR load, codec, records) with the wall clock, when asked."""
        if not self.time_stages:
            yield
            return
        t0 = time.perf_counter()
        yield
        self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - t0

    def pop_timings(self) -> tuple[dict[str, float], list]:
        """The timings gathered since the last call, as they stand (CUDA events possibly still pending)."""
        out = (self._timings, self._events)
        self._timings, self._events = {}, []
        return out

    @staticmethod
    def read_timings(popped: tuple[dict[str, float], list]) -> dict[str, float]:
        """Seconds per stage from :meth:`pop_timings`; call it after the batch's results reached the
        host (its CUDA events have completed by then, so this does not wait)."""
        timings, events = popped
        out = dict(timings)
        for name, start, end in events:
            end.synchronize()
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        return out

    def take_timings(self) -> dict[str, float]:
        """The stage timings gathered since the last call, in seconds."""
        return self.read_timings(self.pop_timings())

    # ------------------------------------------------------------------
    def make_batch(self, folder: ImageFolder, plan: EpochPlan, index: int, *, want_hr: bool = True,
                   want_usm: bool = True) -> BatchResult:
        """Degrade video batch ``index`` of ``plan``; HR/USM arrays only when wanted."""
        return self.make_batch_from_refs(folder, plan.seed, plan.epoch, index, plan.batch(index),
                                         want_hr=want_hr, want_usm=want_usm)

    def make_batch_from_refs(self, folder: ImageFolder, seed: int, epoch: int, index: int,
                             refs: tuple[PatchRef, ...], *, want_hr: bool = True,
                             want_usm: bool = True) -> BatchResult:
        """Degrade the video batch made of ``refs`` (batch ``index`` of ``epoch`` under ``seed``):
        the whole-batch path, every step in this process."""
        self.pop_timings()  # drop what an earlier, unfinished batch left (without waiting for its events)
        with self._host_stage("load"):
            hr8 = crop_patches(folder, refs, self.cfg.patch_size)
        out = self.device_stage(hr8, seed, epoch, index, want_usm=want_usm)
        usm8 = None if out.usm is None else out.usm.cpu().numpy()
        frames = np.ascontiguousarray(out.lr.cpu().numpy())
        precodec = frames.copy() if (self.keep_precodec and out.needs_codec) else None
        if out.needs_codec:
            with self._host_stage("codec"):
                lr8, codec_info = video_block(frames, out.params.video, self._require_codec())
        else:
            lr8, codec_info = frames, dict(NO_CODEC)
        with self._host_stage("pack"):
            records = self.records(seed, epoch, index, refs, out.params, codec_info)
        return BatchResult(
            seed=seed, epoch=epoch, batch_index=index, lr=lr8,
            hr=hr8 if want_hr else None, hr_usm=usm8, records=records, timings=self.take_timings(),
            codec_failures=int(codec_info.get("codec_failure") is not None),
            precodec=precodec, video=out.params.video if out.needs_codec else None,
        )

    def _require_codec(self) -> VideoCodec:
        if self.codec is None:
            raise RuntimeError("this batch ends in the video block (spec 4.4, V2 ending) but the Engine has no video "
                               "codec; pass codec=server.codecs.VideoRoundTrip() (software) or one on a hardware "
                               "backend")
        return self.codec

    def device_stage(self, hr8: np.ndarray, seed: int, epoch: int, index: int, *,
                     want_usm: bool = True) -> DeviceOutput:
        """USM, first and second order and the ending up to the codec boundary (spec 1, 3, 4)
        of the uint8 HR crops ``hr8 (n, P, P, 3)`` of batch ``index``: uint8 tensors on the device.

        Never waits for the device (the caller's copy to the host does)."""
        n = len(hr8)
        params = sample_batch_params(self.cfg, n, make_generator(seed, epoch, index, "params"))
        noise_gen = make_generator(seed, epoch, index, "noise", device=self.device)
        usm = None
        if want_usm:
            usm = torch.empty((n,) + tuple(hr8.shape[1:]), dtype=torch.uint8, device=self.device)
        pieces = []
        for lo in range(0, n, CHUNK):  # bounded memory: HR-size tensors exist for CHUNK patches only
            hi = min(lo + CHUNK, n)
            with self._stage("load"):
                # u8 / 255 by a table: the same bits on the CPU and on CUDA (whose division is 1 ulp off)
                hr = jpeg.from_uint8(torch.from_numpy(hr8[lo:hi]).to(self.device)).permute(0, 3, 1, 2)
            if usm is not None:
                with self._stage("usm"):
                    sharp = filters.usm_sharpen(hr, weight=self.cfg.usm_weight, threshold=self.cfg.usm_threshold,
                                                radius=self.cfg.usm_radius)
                    usm[lo:hi] = to_uint8_nhwc_tensor(sharp)
                    del sharp
            pieces.append(self.degrade_orders(hr, params.slice(lo, hi), noise_gen))
            del hr
        lr = self.degrade_ending(torch.cat(pieces), params)
        return DeviceOutput(params=params, lr=lr, usm=usm)

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
        with self._stage("jpeg1"):  # qualities stay on the CPU: the JPEG code reads them there
            # in place: the noise output is this function's own (already clamped) tensor; no 4-byte copy
            out = jpeg.jpeg_roundtrip(out.clamp_(0, 1), p.jpeg1_quality, impl=self.jpeg_impl)
        with self._stage("blur2"):
            if bool(p.blur2.any()):
                idx = p.blur2.nonzero().flatten()
                dev_idx = idx.to(out.device)
                sub = self._blur(out[dev_idx], select_patches(p.kernel2, idx))
                out[dev_idx] = sub  # in place: the JPEG output is this function's own tensor
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

    def degrade_ending(self, out: torch.Tensor, p: BatchParams) -> torch.Tensor:
        """The ending of spec section 4.4 up to the codec boundary, on the whole video batch:
        uint8 NHWC on the device - the frames for the video block (V2) or the final LR (V1)."""
        lr_hw = [self.cfg.lr_size, self.cfg.lr_size]
        with self._stage("ending"):
            if p.ending == "v2":
                return to_uint8_nhwc_tensor(_resize_to(out, lr_hw, p.final_mode))
            q2 = p.jpeg2_quality
            if p.v1_resize_first:
                out = self._final_sinc(_resize_to(out, lr_hw, p.final_mode), p)
                out = jpeg.jpeg_roundtrip(out.clamp(0, 1), q2, impl=self.jpeg_impl)
            else:
                out = jpeg.jpeg_roundtrip(out.clamp(0, 1), q2, impl=self.jpeg_impl)
                out = self._final_sinc(_resize_to(out, lr_hw, p.final_mode), p)
            return to_uint8_nhwc_tensor(out)

    # ------------------------------------------------------------------
    def _blur(self, x: torch.Tensor, k: KernelDraw) -> torch.Tensor:
        kern = kernels.build_kernels(k.kind, k.size, k.sigma_x, k.sigma_y, k.angle, k.beta, k.omega_c,
                                     pad_to=self.cfg.kernel_pad_to)
        return filters.blur(x, kern.to(device=x.device, dtype=x.dtype), k.size.to(x.device))

    def _noise(self, x: torch.Tensor, d: NoiseDraw, gen: torch.Generator) -> torch.Tensor:
        strength = d.strength.to(device=x.device, dtype=x.dtype)
        gray = d.gray  # stays on the CPU: the noise code splits the batch into runs by it there
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
    def records(self, seed: int, epoch: int, index: int, refs: tuple[PatchRef, ...], p: BatchParams,
                codec: dict) -> list[dict[str, Any]]:
        """One record per patch (spec section 8)."""
        return [self._record(seed, epoch, index, i, ref, p, codec) for i, ref in enumerate(refs)]

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
            "jpeg_impl": jpeg.jpeg_backend(self.device, self.jpeg_impl),
            "device": self.device.type,
        }
        rec.update(p.patch_record(i))
        return rec


def video_block(frames: np.ndarray, video: VideoParams, codec: VideoCodec) -> tuple[np.ndarray, dict]:
    """The video block of spec section 6 on uint8 frames ``(n, L, L, 3)``: the decoded frames and
    the codec outcome.  When every retry and the fallback failed, the frames go on uncompressed
    and the outcome says why (the run goes on)."""
    try:
        out, info = codec(frames, video)
    except CodecError as exc:
        log.error("video block failed for every codec, LR left uncompressed: %s", exc)
        return frames, {**NO_CODEC, "codec_failure": str(exc), "fallback": True}
    return np.ascontiguousarray(out), info


# ---------------------------------------------------------------------------
def patch_id(epoch: int, ref: PatchRef) -> str:
    """The identity of a patch: its image, corner and epoch."""
    return f"e{epoch}/{ref.image}/{ref.x}_{ref.y}"


def crop_patches(folder: ImageFolder, refs: tuple[PatchRef, ...], size: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Stack the HR crops of ``refs`` as uint8 (n, size, size, 3), into ``out`` when given."""
    if out is None:
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


def to_uint8_nhwc_tensor(x: torch.Tensor) -> torch.Tensor:
    """Float [0,1] NCHW -> contiguous uint8 NHWC on the same device, rounding like Real-ESRGAN."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Float [0,1] NCHW -> uint8 NHWC on the CPU, rounding like Real-ESRGAN."""
    return to_uint8_nhwc_tensor(x).cpu().numpy()


def _resize_to(x: torch.Tensor, size: list[int], mode: str) -> torch.Tensor:
    if list(x.shape[-2:]) == size:
        return x
    return resize(x, size=size, mode=mode)
