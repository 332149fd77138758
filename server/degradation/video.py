"""The video compression block's vocabulary (spec section 6): the codec table's
names, presets and quality ranges, one draw of it (:class:`VideoParams`), the
aspect-ratio arithmetic, and the contract of a round trip (:class:`VideoCodec`,
:class:`CodecError`).

The degradation model draws these parameters and hands the uint8 frames to a
:class:`VideoCodec`; how the frames are encoded and decoded (PyAV / FFmpeg in
software, NVENC / NVDEC) is ``server.codecs``' business, which implements this
contract.  Pure data and arithmetic: no codec library is imported here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: FFmpeg encoder names, in the order of the spec's table.
CODECS: tuple[str, ...] = ("mpeg2video", "mpeg4", "libx264", "libx265")
#: Codecs whose quality is set by a constant rate factor.
CRF_CODECS: frozenset[str] = frozenset({"libx264", "libx265"})
#: Codecs whose quality is set by a target bitrate.
BITRATE_CODECS: frozenset[str] = frozenset({"mpeg2video", "mpeg4"})
PRESETS: tuple[str, ...] = ("slow", "medium", "fast", "faster", "superfast")
#: CRF ranges the encoders accept (x264: 0-51, x265: 0-51).
CRF_LIMITS: dict[str, tuple[int, int]] = {"libx264": (0, 51), "libx265": (0, 51)}
#: MPEG-2 can only signal these integer frame rates (the others are
#: NTSC-style fractions); anything else makes the encoder refuse to open.
MPEG2_FPS: frozenset[int] = frozenset({24, 25, 30, 50, 60})


def _as_int(what: str, value: object, lo: int, hi: int | None) -> int:
    """``value`` as a plain int in ``[lo, hi]`` (``hi`` None: no upper bound)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and lo <= int(value) and (hi is None or int(value) <= hi):
        return int(value)
    bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{what} must be an int {bound}, got {value!r}")


class CodecError(RuntimeError):
    """An encode or decode failed, or returned the wrong number of frames.

    Backends raise only this, so ``compress_video`` can retry / fall back
    without knowing the codec library's exception types.
    """


@dataclass(frozen=True)
class VideoParams:
    """One draw of the spec's codec table: what to encode a video batch with.

    ``crf`` is used by libx264/libx265 and ``bitrate_kbps`` by
    mpeg2video/mpeg4; the unused one may be given (it is recorded but
    ignored) so a record can be round-tripped without special cases.
    ``aspect_ratio`` 1.0 means "keep"; any other value rescales the width
    only (see :func:`aspect_width`).
    """

    codec: str
    fps: int
    aspect_ratio: float = 1.0
    crf: int | None = None
    bitrate_kbps: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        # numpy / Python ints and floats alike are accepted and stored as
        # plain int / float, so records stay JSON-serialisable.
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {', '.join(CODECS)}")
        self._set("fps", _as_int("fps", self.fps, 1, None))
        if self.codec == "mpeg2video" and self.fps not in MPEG2_FPS:
            raise ValueError(
                f"mpeg2video cannot signal {self.fps} fps; use one of {sorted(MPEG2_FPS)}"
            )
        r = self.aspect_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"aspect_ratio must be a finite number > 0, got {r!r}")
        self._set("aspect_ratio", float(r))
        if self.codec in CRF_CODECS and self.crf is None:
            raise ValueError(f"{self.codec} needs crf (constant rate factor)")
        if self.crf is not None:
            lo, hi = CRF_LIMITS.get(self.codec, (0, 51))
            self._set("crf", _as_int(f"{self.codec} crf", self.crf, lo, hi))
        if self.codec in BITRATE_CODECS and self.bitrate_kbps is None:
            raise ValueError(f"{self.codec} needs bitrate_kbps")
        if self.bitrate_kbps is not None:
            self._set("bitrate_kbps", _as_int("bitrate_kbps", self.bitrate_kbps, 1, None))
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} is not one of {', '.join(PRESETS)}")

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)


def aspect_width(width: int, ratio: float) -> int:
    """Encoded width for the aspect-ratio step: ``W' = 2*floor(r*W/2)``.

    The result is even (4:2:0 chroma needs it) and at least 2.  ``ratio``
    1.0 means "keep": the width is returned unchanged, even when odd (odd
    sizes are padded, not rescaled).
    """
    if ratio == 1.0:
        return width
    return max(2, 2 * math.floor(ratio * width / 2))


class VideoCodec(Protocol):
    """The video block as the engine calls it: a batch of uint8 ``(N, H, W, 3)``
    frames and one draw of the codec table in; the frames a viewer would see
    after one encode + decode, and the record of what was applied (``backend``,
    ``codec``, ``crf``, ``bitrate_kbps``, ``preset``, ``codec_failure``,
    ``fallback``) out.  Raises :class:`CodecError` only when nothing, not even a
    fallback, could code the batch.  ``server.codecs.VideoRoundTrip`` is the
    implementation.
    """

    def __call__(self, frames: np.ndarray, video: VideoParams) -> tuple[np.ndarray, dict[str, Any]]: ...
