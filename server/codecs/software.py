"""Software video round trip with PyAV: encoder packets go straight into a
decoder, all in memory (spec section 6).

The reference implementation writes PNGs, shells out to ``ffmpeg`` twice and
reads PNGs back; here no file, container or subprocess is involved: an
``av.CodecContext`` encoder feeds an ``av.CodecContext`` decoder packet by
packet, and swscale does the RGB<->YUV conversion (fused with the
aspect-ratio resize when there is one) in a single pass per frame.

Encoder settings follow the spec: ``yuv420p``, ``time_base = 1/fps``,
``pts`` = frame index, CRF + preset for x264/x265, ``bit_rate`` for
MPEG-2/MPEG-4, everything else (GOP, B-frames, profile, level) left at the
codec default.  Deviations, each needed for determinism or to avoid a codec
bug, are listed in :func:`encoder_options` and :data:`MIN_ENCODE_SIZE`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter

from .base import CodecBackend, CodecError, VideoParams, aspect_width, check_frames

#: Decoder for each encoder: the bitstream format the encoder produces.
DECODERS: dict[str, str] = {
    "mpeg2video": "mpeg2video",
    "mpeg4": "mpeg4",
    "libx264": "h264",
    "libx265": "hevc",
}

#: Smallest (width, height) handed to an encoder; smaller frames are padded
#: (edge replicate) and cropped back.  Measured with the libx265 bundled with
#: PyAV 18 (every preset, heights 16-128): widths below 48 can corrupt the
#: heap (the process aborts; no exception to catch), width 64 gives
#: non-repeatable output, widths 66 and up were clean; heights below 16 are
#: refused.  72 leaves a margin.  The standard workload (90x90 with aspect
#: 0.85-1.35, so widths 76-120) never pads.
MIN_ENCODE_SIZE: dict[str, tuple[int, int]] = {"libx265": (72, 16)}

#: x265 runs its own thread pool and frame-parallel encoding by default, which
#: makes repeated encodes differ; ``log-level=error`` stops its info banner
#: (printed straight to stderr, bypassing FFmpeg's logging) on every encode.
X265_PARAMS = "pools=none:frame-threads=1:log-level=error"

#: swscale flag for every conversion; the ffmpeg command line also defaults
#: to bicubic, so chroma subsampling matches the reference too.
INTERPOLATION = "BICUBIC"


@functools.cache
def _cpu_has_avx512() -> bool:
    """Whether this x86 CPU advertises AVX-512 (Linux ``/proc/cpuinfo``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def encoder_options(params: VideoParams) -> dict[str, str]:
    """AVOptions for the encoder (beyond size, pix_fmt, rate and threads).

    x264's AVX-512 kernels (chosen automatically on CPUs that have them) read
    uninitialised memory in the lookahead/MB-tree path: on such CPUs two
    encodes of the same frames in one process can give different bytes
    (measured: ~1 in 3 repeats at 90x90).  Capping x264's instruction set at
    AVX2 there makes it repeatable; it is the same encoder, only with the
    kernels every AVX2 machine uses.
    """
    opts: dict[str, str] = {}
    if params.codec in ("libx264", "libx265"):
        opts["crf"] = str(params.crf)
        if params.preset is not None:
            opts["preset"] = params.preset
    if params.codec == "libx264" and _cpu_has_avx512():
        opts["x264-params"] = "asm=AVX2"
    if params.codec == "libx265":
        opts["x265-params"] = X265_PARAMS
    return opts


@dataclass(frozen=True)
class _Plan:
    """Sizes of one round trip (why: odd sizes, aspect ratio, codec minimum).

    ``content_w`` is the width of the picture inside the encoded frame
    (``aspect_width`` when resizing, else the input width); ``enc_w`` x
    ``enc_h`` is the encoded size (even, and at least the codec minimum).
    When the content fills the encoded width exactly, the resize is fused
    into the colour conversion (``fused``); otherwise (tiny frames only) the
    resize is a separate RGB pass and the encoded frame is padded around it.
    """

    h: int
    w: int
    content_w: int
    enc_w: int
    enc_h: int
    resized: bool

    @property
    def fused(self) -> bool:
        return self.resized and self.enc_w == self.content_w

    @property
    def rgb_w(self) -> int:
        """Width of the RGB frames on either side of the codec."""
        return self.w if self.fused else self.enc_w


def plan_sizes(h: int, w: int, params: VideoParams) -> _Plan:
    """Work out the encode geometry for ``h`` x ``w`` frames (spec section 6)."""
    new_w = aspect_width(w, params.aspect_ratio)
    resized = new_w != w
    min_w, min_h = MIN_ENCODE_SIZE.get(params.codec, (2, 2))
    enc_w = max(new_w + (new_w & 1), min_w)
    enc_h = max(h + (h & 1), min_h)
    return _Plan(h=h, w=w, content_w=new_w, enc_w=enc_w, enc_h=enc_h, resized=resized)


def _resize_rgb(frames: np.ndarray, width: int, height: int, sws: VideoReformatter) -> np.ndarray:
    """Bicubic RGB resize of a batch with swscale (the small-frame path only)."""
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        vf = VideoFrame.from_ndarray(frame, format="rgb24")
        out[i] = sws.reformat(
            vf, width=width, height=height, interpolation=INTERPOLATION, threads=1
        ).to_ndarray()
    return out


def _open_encoder(params: VideoParams, plan: _Plan) -> av.CodecContext:
    enc = av.CodecContext.create(params.codec, "w")
    enc.width = plan.enc_w
    enc.height = plan.enc_h
    enc.pix_fmt = "yuv420p"
    enc.time_base = Fraction(1, params.fps)
    enc.framerate = Fraction(params.fps, 1)
    # One thread per encoder: repeatable bytes (spec section 9), and the
    # caller parallelises across batches, which scales better for tiny frames.
    enc.thread_count = 1
    if params.bitrate_kbps is not None and params.codec in ("mpeg2video", "mpeg4"):
        enc.bit_rate = params.bitrate_kbps * 1000
    enc.options = encoder_options(params)
    enc.open()
    return enc


def _open_decoder(params: VideoParams) -> av.CodecContext:
    dec = av.CodecContext.create(DECODERS[params.codec], "r")
    dec.thread_count = 1
    dec.open()
    return dec


def _roundtrip(frames: np.ndarray, params: VideoParams) -> np.ndarray:
    n, h, w, _ = frames.shape
    plan = plan_sizes(h, w, params)
    sws_in, sws_out = VideoReformatter(), VideoReformatter()

    # RGB frames as they enter the colour conversion: pre-resized when the
    # resize cannot be fused, then edge-padded to the encoded size.
    src = frames
    if plan.resized and not plan.fused:
        src = _resize_rgb(src, plan.content_w, h, sws_in)
    pad_h, pad_w = plan.enc_h - h, plan.rgb_w - src.shape[2]
    if pad_h or pad_w:
        src = np.pad(src, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")

    enc = _open_encoder(params, plan)
    dec = _open_decoder(params)
    out = np.empty((n, plan.enc_h, plan.rgb_w, 3), np.uint8)
    count = 0

    def drain(decoded: list) -> None:
        nonlocal count
        for frame in decoded:
            if count >= n:
                raise CodecError(f"{params.codec}: decoder returned more than {n} frames")
            if frame.pts is not None and frame.pts != count:
                raise CodecError(f"{params.codec}: decoded frame {count} has pts {frame.pts}")
            if frame.width != plan.enc_w or frame.height != plan.enc_h:
                raise CodecError(
                    f"{params.codec}: decoded {frame.width}x{frame.height}, "
                    f"encoded {plan.enc_w}x{plan.enc_h}"
                )
            out[count] = sws_out.reformat(
                frame,
                width=plan.rgb_w,
                format="rgb24",
                interpolation=INTERPOLATION,
                threads=1,
            ).to_ndarray()
            count += 1

    for i in range(n):
        rgb = VideoFrame.from_numpy_buffer(src[i], format="rgb24")
        yuv = sws_in.reformat(
            rgb,
            width=plan.enc_w,
            format="yuv420p",
            interpolation=INTERPOLATION,
            threads=1,
        )
        yuv.pts = i
        for packet in enc.encode(yuv):
            drain(dec.decode(packet))
    for packet in enc.encode(None):
        drain(dec.decode(packet))
    drain(dec.decode(None))
    if count != n:
        raise CodecError(f"{params.codec}: decoder returned {count} of {n} frames")

    result = out[:, :h, : (w if plan.fused else plan.content_w)]
    if plan.resized and not plan.fused:
        result = _resize_rgb(result, w, h, sws_out)
    return np.ascontiguousarray(result)


class SoftwareBackend(CodecBackend):
    """FFmpeg's software codecs through PyAV, in memory, one thread each.

    Stateless and cheap to construct; safe to share between threads (each
    call builds its own codec contexts).
    """

    name = "software"

    def supports(self, codec: str) -> bool:
        return codec in DECODERS

    def roundtrip(self, frames: np.ndarray, params: VideoParams) -> np.ndarray:
        frames = check_frames(frames)
        if not self.supports(params.codec):
            raise CodecError(f"{params.codec}: not supported by the software backend")
        try:
            return _roundtrip(frames, params)
        except CodecError:
            raise
        except (av.FFmpegError, ValueError, TypeError, RuntimeError, OSError) as e:
            raise CodecError(f"{params.codec}: {type(e).__name__}: {e}") from e
