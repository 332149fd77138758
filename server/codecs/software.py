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

The two halves are also available on their own for backends that decode
elsewhere (NVDEC, :mod:`.nvcodec`): :func:`encode_to_packets` makes the
very packets the round trip decodes, :func:`decode_packets` decodes them
as the round trip does, and :func:`yuv420p_to_rgb` converts frames decoded
elsewhere with the round trip's swscale call.
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

from server.degradation.video import CodecError, VideoParams, aspect_width

from .base import CodecBackend, check_frames

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


def plan_sizes(
    h: int, w: int, params: VideoParams, min_size: tuple[int, int] | None = None
) -> _Plan:
    """Work out the encode geometry for ``h`` x ``w`` frames (spec section 6).

    ``min_size`` (width, height) raises the codec's own minimum, e.g. to what
    a hardware decoder accepts (the hybrid path); odd minimums are rounded up
    to even.  Without it the geometry is the software round trip's.
    """
    new_w = aspect_width(w, params.aspect_ratio)
    resized = new_w != w
    min_w, min_h = MIN_ENCODE_SIZE.get(params.codec, (2, 2))
    if min_size is not None:
        min_w, min_h = max(min_w, int(min_size[0])), max(min_h, int(min_size[1]))
        min_w, min_h = min_w + (min_w & 1), min_h + (min_h & 1)
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
    return _open_decoder_named(DECODERS[params.codec])


def _open_decoder_named(name: str) -> av.CodecContext:
    dec = av.CodecContext.create(name, "r")
    dec.thread_count = 1
    # No error concealment. FFmpeg's MPEG-4 decoder reports "slice end not reached" on
    # about 3% of its own encoder's P frames at these sizes, and concealing those
    # macroblocks reads pixel buffers that were never written: the same bytes then
    # decode differently from one process to the next (up to ~200 levels), which
    # would break determinism (spec section 9). Without concealment the decode is
    # a pure function of the bitstream; for streams without errors nothing changes.
    dec.options = {"ec": "0"}
    dec.open()
    return dec


def _prepare_source(
    frames: np.ndarray, plan: _Plan, sws: VideoReformatter, pad_mode: str = "edge"
) -> np.ndarray:
    """RGB frames as they enter the colour conversion: pre-resized when the
    resize cannot be fused, then padded (``pad_mode``, numpy's name) to the
    encoded size."""
    src = frames
    if plan.resized and not plan.fused:
        src = _resize_rgb(src, plan.content_w, plan.h, sws)
    pad_h, pad_w = plan.enc_h - plan.h, plan.rgb_w - src.shape[2]
    if pad_h or pad_w:
        src = np.pad(src, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode=pad_mode)
    return src


def _encode(enc: av.CodecContext, src: np.ndarray, plan: _Plan, sws: VideoReformatter):
    """Packets of ``src`` (already at the RGB encode geometry), then the flush."""
    for i in range(src.shape[0]):
        rgb = VideoFrame.from_numpy_buffer(src[i], format="rgb24")
        yuv = sws.reformat(
            rgb,
            width=plan.enc_w,
            format="yuv420p",
            interpolation=INTERPOLATION,
            threads=1,
        )
        yuv.pts = i
        yield from enc.encode(yuv)
    yield from enc.encode(None)


class _FrameSink:
    """Collects decoded frames as RGB at the codec-side geometry, checking
    count, order (pts) and size on the way."""

    def __init__(self, codec: str, plan: _Plan, n: int, sws: VideoReformatter) -> None:
        self.codec, self.plan, self.n, self.sws = codec, plan, n, sws
        self.out = np.empty((n, plan.enc_h, plan.rgb_w, 3), np.uint8)
        self.count = 0

    def drain(self, decoded: list) -> None:
        plan = self.plan
        for frame in decoded:
            if self.count >= self.n:
                raise CodecError(f"{self.codec}: decoder returned more than {self.n} frames")
            if frame.pts is not None and frame.pts != self.count:
                raise CodecError(f"{self.codec}: decoded frame {self.count} has pts {frame.pts}")
            if frame.width != plan.enc_w or frame.height != plan.enc_h:
                raise CodecError(
                    f"{self.codec}: decoded {frame.width}x{frame.height}, "
                    f"encoded {plan.enc_w}x{plan.enc_h}"
                )
            self.out[self.count] = _to_rgb(self.sws, frame, plan)
            self.count += 1

    def check_complete(self) -> None:
        if self.count != self.n:
            raise CodecError(f"{self.codec}: decoder returned {self.count} of {self.n} frames")


def _to_rgb(sws: VideoReformatter, frame: VideoFrame, plan: _Plan) -> np.ndarray:
    """A decoded yuv420p frame to RGB at the plan's RGB width (the aspect resize fused in)."""
    return sws.reformat(frame, width=plan.rgb_w, format="rgb24", interpolation=INTERPOLATION,
                        threads=1).to_ndarray()


def _finish(out: np.ndarray, plan: _Plan, sws: VideoReformatter) -> np.ndarray:
    """Crop the decoded RGB frames back to the input size (and undo a
    separate resize)."""
    result = out[:, : plan.h, : (plan.w if plan.fused else plan.content_w)]
    if plan.resized and not plan.fused:
        result = _resize_rgb(result, plan.w, plan.h, sws)
    return np.ascontiguousarray(result)


def _roundtrip(frames: np.ndarray, params: VideoParams) -> np.ndarray:
    n, h, w, _ = frames.shape
    plan = plan_sizes(h, w, params)
    sws_in, sws_out = VideoReformatter(), VideoReformatter()
    src = _prepare_source(frames, plan, sws_in)

    # Encoder packets go straight into the decoder, one at a time.
    enc = _open_encoder(params, plan)
    dec = _open_decoder(params)
    sink = _FrameSink(params.codec, plan, n, sws_out)
    for packet in _encode(enc, src, plan, sws_in):
        sink.drain(dec.decode(packet))
    sink.drain(dec.decode(None))
    sink.check_complete()
    return _finish(sink.out, plan, sws_out)


# --- the two halves, for backends that decode elsewhere (NVDEC) -------------


@dataclass(frozen=True)
class EncodedVideo:
    """One video batch encoded in memory: an elementary stream as packets.

    ``packets`` are in decode order (what the encoder emitted, in-band
    headers included: no global header is requested), ``pts`` their display
    indices (``None`` where the encoder gave none); ``plan`` is the geometry,
    so a decoder elsewhere knows the coded size and how to crop back.
    """

    codec: str
    packets: tuple[bytes, ...]
    pts: tuple[int | None, ...]
    n_frames: int
    plan: _Plan

    @property
    def decoder(self) -> str:
        """FFmpeg decoder name of the stream (``h264`` for ``libx264``, ...)."""
        return DECODERS[self.codec]

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.packets)

    def bitstream(self) -> bytes:
        """The packets concatenated: the raw elementary stream."""
        return b"".join(self.packets)


def _wrap(codec: str, fn, *args, **kwargs):
    """Run ``fn``, turning PyAV / argument errors into :class:`CodecError`."""
    try:
        return fn(*args, **kwargs)
    except CodecError:
        raise
    except (av.FFmpegError, ValueError, TypeError, RuntimeError, OSError) as e:
        raise CodecError(f"{codec}: {type(e).__name__}: {e}") from e


def _encode_to_packets(frames, params, min_size, pad_mode) -> EncodedVideo:
    n, h, w, _ = frames.shape
    plan = plan_sizes(h, w, params, min_size)
    if plan == plan_sizes(h, w, params):
        pad_mode = "edge"  # nothing beyond the software path's own padding: same bytes
    sws_in = VideoReformatter()
    src = _prepare_source(frames, plan, sws_in, pad_mode)
    enc = _open_encoder(params, plan)
    packets, pts = [], []
    for packet in _encode(enc, src, plan, sws_in):
        packets.append(bytes(packet))
        pts.append(None if packet.pts is None else int(packet.pts))
    return EncodedVideo(params.codec, tuple(packets), tuple(pts), n, plan)


def encode_to_packets(
    frames: np.ndarray,
    params: VideoParams,
    *,
    min_size: tuple[int, int] | None = None,
    pad_mode: str = "edge",
) -> EncodedVideo:
    """The encode half of the software round trip: same geometry, colour
    conversion and encoder settings, so with the defaults the packets are
    the very bytes :class:`SoftwareBackend` decodes.

    ``min_size`` (width, height) raises the encoded size (a hardware
    decoder's minimum); ``pad_mode`` is how frames are padded up to it
    (``"edge"``, the software default, or ``"reflect"``, the spec's choice
    for hardware minimums).  When ``min_size`` asks for nothing beyond the
    software geometry, the padding stays the software path's (edge), so the
    packets are still the software round trip's.
    """
    frames = check_frames(frames)
    if params.codec not in DECODERS:
        raise CodecError(f"{params.codec}: not supported by the software backend")
    return _wrap(params.codec, _encode_to_packets, frames, params, min_size, pad_mode)


def _decode_packets(video: EncodedVideo) -> np.ndarray:
    dec = _open_decoder_named(video.decoder)
    sws_out = VideoReformatter()
    sink = _FrameSink(video.codec, video.plan, video.n_frames, sws_out)
    for data, pts in zip(video.packets, video.pts):
        packet = av.Packet(data)
        if pts is not None:
            packet.pts = pts
        sink.drain(dec.decode(packet))
    sink.drain(dec.decode(None))
    sink.check_complete()
    return _finish(sink.out, video.plan, sws_out)


def decode_packets(video: EncodedVideo) -> np.ndarray:
    """The decode half: FFmpeg's decoder, then the same RGB conversion and
    crop (and resize back) as the software round trip, so
    ``decode_packets(encode_to_packets(f, p))`` equals
    ``SoftwareBackend().roundtrip(f, p)`` byte for byte."""
    return _wrap(video.codec, _decode_packets, video)


#: A typical draw per codec, for the one-frame streams that make template frames.
_TEMPLATE_PARAMS: dict[str, VideoParams] = {
    "mpeg2video": VideoParams("mpeg2video", fps=25, bitrate_kbps=5000),
    "mpeg4": VideoParams("mpeg4", fps=25, bitrate_kbps=5000),
    "libx264": VideoParams("libx264", fps=25, crf=26, preset="medium"),
    "libx265": VideoParams("libx265", fps=25, crf=31, preset="medium"),
}


@functools.lru_cache(maxsize=256)
def _template_stream(codec: str, enc_w: int, enc_h: int) -> tuple[bytes, ...]:
    """A one-frame stream of ``codec`` at the coded size (cached per size)."""
    plan = _Plan(h=enc_h, w=enc_w, content_w=enc_w, enc_w=enc_w, enc_h=enc_h, resized=False)
    enc = _open_encoder(_TEMPLATE_PARAMS[codec], plan)
    src = np.full((1, enc_h, enc_w, 3), 128, np.uint8)
    return tuple(bytes(p) for p in _encode(enc, src, plan, VideoReformatter()))


def _template_frame(codec: str, enc_w: int, enc_h: int) -> VideoFrame:
    """A writable yuv420p frame allocated by the codec's own decoder.

    swscale's scaled path (the fused aspect-ratio resize) gives different
    results for the same pixels at different line sizes: a frame made with
    ``VideoFrame.from_ndarray`` (line size 96 at width 90) converts up to
    60 levels differently at the edges from the decoder's frame (line size
    128).  Writing foreign pixels into a frame the decoder allocated makes
    the conversion the software path's, byte for byte.
    """
    dec = _open_decoder_named(DECODERS[codec])
    frames = []
    for data in _template_stream(codec, enc_w, enc_h):
        frames += dec.decode(av.Packet(data))
    frames += dec.decode(None)
    if len(frames) != 1 or frames[0].width != enc_w or frames[0].height != enc_h:
        raise CodecError(f"{codec}: could not make a {enc_w}x{enc_h} template frame")
    frame = frames[0]
    frame.make_writable()
    return frame


def _fill_yuv420p(frame: VideoFrame, flat: np.ndarray, w: int, h: int) -> None:
    """Copy packed yuv420p pixels (Y, then U, then V) into ``frame``'s planes."""
    cw, ch = w // 2, h // 2
    sizes = ((w, h), (cw, ch), (cw, ch))
    offset = 0
    for plane, (pw, ph) in zip(frame.planes, sizes):
        view = np.frombuffer(plane, np.uint8)[: plane.line_size * ph].reshape(ph, plane.line_size)
        view[:, :pw] = flat[offset : offset + pw * ph].reshape(ph, pw)
        offset += pw * ph


def _yuv420p_to_rgb(yuv: np.ndarray, plan: _Plan, codec: str) -> np.ndarray:
    sws_out = VideoReformatter()
    frame = _template_frame(codec, plan.enc_w, plan.enc_h)
    out = np.empty((yuv.shape[0], plan.enc_h, plan.rgb_w, 3), np.uint8)
    for i in range(yuv.shape[0]):
        _fill_yuv420p(frame, yuv[i].reshape(-1), plan.enc_w, plan.enc_h)
        out[i] = _to_rgb(sws_out, frame, plan)
    return _finish(out, plan, sws_out)


def yuv420p_to_rgb(yuv: np.ndarray, plan: _Plan, codec: str) -> np.ndarray:
    """Decoded yuv420p frames to RGB exactly as the software round trip does it.

    ``yuv``: uint8 ``(N, 3 * enc_h // 2, enc_w)`` in PyAV's ``yuv420p``
    array layout (the Y plane, then U, then V, each plane's rows packed one
    after the other); ``codec`` the FFmpeg encoder name of the stream.  Used
    to convert frames decoded elsewhere (NVDEC) with the very swscale call of
    the software path, fused resize and crop included: for the same decoded
    pixels the result is the software round trip's, byte for byte.
    """
    want = (plan.enc_h * 3 // 2, plan.enc_w)
    if yuv.dtype != np.uint8 or yuv.ndim != 3 or yuv.shape[1:] != want:
        raise ValueError(
            f"need uint8 (N, {want[0]}, {want[1]}) yuv420p frames, got {yuv.dtype} {yuv.shape}"
        )
    if codec not in DECODERS:
        raise CodecError(f"{codec}: not supported by the software backend")
    return _wrap(codec, _yuv420p_to_rgb, np.ascontiguousarray(yuv), plan, codec)


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
