"""The video compression block as the pipeline calls it: one batch in, the
decoded batch plus a record of what was actually applied out.

Codec failures must not cost frames or stop a training run, and must not be
hidden either: a failing round trip is retried once; a hardware backend's
failure then runs the SAME codec and parameters on the software backend
(retried once too), so a systematic hardware problem does not change the
codec mix of the data set; only then is the batch replaced by a known-good
software H.264 encode.  The record says what happened (``backend``,
``codec_failure``, ``fallback``).  Only when even that fails does the caller
see :class:`CodecError`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from server.degradation.video import CRF_LIMITS, CodecError, VideoParams

from .base import CodecBackend
from .software import SoftwareBackend

#: The fallback when the caller gives none: the spec's most common codec at
#: the middle of its CRF range, default preset.
FALLBACK_CODEC = "libx264"
FALLBACK_CRF = 26
FALLBACK_PRESET = "medium"

_SOFTWARE = SoftwareBackend()

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (backend, codec) whose hardware failure was logged


def available_backends() -> dict[str, CodecBackend]:
    """Backends usable on this machine, by name; "software" is always there."""
    return {"software": _SOFTWARE}


def default_fallback(params: VideoParams) -> VideoParams:
    """libx264, CRF 26 (clamped into x264's range), preset medium, same fps/aspect."""
    lo, hi = CRF_LIMITS[FALLBACK_CODEC]
    return VideoParams(
        codec=FALLBACK_CODEC,
        fps=params.fps,
        aspect_ratio=params.aspect_ratio,
        crf=min(max(FALLBACK_CRF, lo), hi),
        bitrate_kbps=None,
        preset=FALLBACK_PRESET,
    )


def _attempt(backend: CodecBackend, frames: np.ndarray, params: VideoParams) -> np.ndarray:
    """One round trip; a result of the wrong shape counts as a codec failure."""
    out = backend.roundtrip(frames, params)
    if not isinstance(out, np.ndarray) or out.shape != frames.shape or out.dtype != np.uint8:
        got = getattr(out, "shape", type(out).__name__)
        raise CodecError(f"{params.codec}: {backend.name} returned {got} for {frames.shape}")
    return out


def _failure_text(params: VideoParams, error: CodecError) -> str:
    """``"<codec>: <message>"`` without repeating the codec the message may start with."""
    msg = str(error)
    prefix = f"{params.codec}: "
    return msg if msg.startswith(prefix) else prefix + msg


def _record(backend_name: str, params: VideoParams, failure: str | None, fallback: bool) -> dict[str, Any]:
    return {
        "backend": backend_name,
        "codec": params.codec,
        "crf": params.crf,
        "bitrate_kbps": params.bitrate_kbps,
        "preset": params.preset,
        "codec_failure": failure,
        "fallback": fallback,
    }


def _twice(backend: CodecBackend, frames: np.ndarray, params: VideoParams) -> np.ndarray:
    """A round trip, retried once on :class:`CodecError` (the second error propagates)."""
    try:
        return _attempt(backend, frames, params)
    except CodecError:
        return _attempt(backend, frames, params)


def _is_software(backend: CodecBackend, codec: str) -> bool:
    """Whether ``backend`` runs ``codec`` on the software backend already."""
    return isinstance(backend, SoftwareBackend) or backend.label(codec) == SoftwareBackend.name


def compress_video(
    frames: np.ndarray,
    params: VideoParams,
    backend: CodecBackend,
    fallback_params: VideoParams | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Round-trip ``frames`` through ``params``'s codec on ``backend``.

    Order: the backend (or the software backend when ``backend`` does not
    support the codec, e.g. MPEG-2 on NVENC); on :class:`CodecError`, the
    same once more; a hardware backend's (anything but software) failure
    then runs the same codec and parameters on the software backend, again
    with one retry - record: ``backend`` "software", ``codec_failure`` the
    hardware error, ``fallback`` False; then ``fallback_params`` (default
    :func:`default_fallback`) on the software backend - record:
    ``fallback`` True, ``codec_failure`` every error on the way.  Returns the
    frames (same shape as the input, always all N) and the record of what
    was applied.  Raises :class:`CodecError` when the fallback fails too.
    """
    first = backend if backend.supports(params.codec) else _SOFTWARE
    try:
        return _twice(first, frames, params), _record(first.label(params.codec), params, None, False)
    except CodecError as e:
        failure = _failure_text(params, e)

    if not _is_software(first, params.codec):
        name = first.label(params.codec)
        if (name, params.codec) not in _warned:  # once per backend and codec and process; records have each
            _warned.add((name, params.codec))
            log.warning("%s failed twice on the %s backend; running it with the same parameters on the software "
                        "backend (later failures are only in the records): %s", params.codec, name, failure)
        try:
            return _twice(_SOFTWARE, frames, params), _record(_SOFTWARE.name, params, failure, False)
        except CodecError as e:
            failure = f"{failure}; software {_failure_text(params, e)}"

    fb = fallback_params if fallback_params is not None else default_fallback(params)
    try:
        out = _attempt(_SOFTWARE, frames, fb)
    except CodecError as e:
        raise CodecError(f"{failure}; fallback {_failure_text(fb, e)}") from e
    return out, _record(_SOFTWARE.name, fb, failure, True)


class VideoRoundTrip:
    """:func:`compress_video` on one backend: the degradation engine's video codec
    (:class:`server.degradation.video.VideoCodec`).  ``backend`` defaults to the
    software backend (PyAV / FFmpeg in memory)."""

    def __init__(self, backend: CodecBackend | None = None):
        self.backend = backend if backend is not None else _SOFTWARE

    def __call__(self, frames: np.ndarray, video: VideoParams) -> tuple[np.ndarray, dict[str, Any]]:
        return compress_video(frames, video, self.backend)

    def __repr__(self) -> str:
        return f"VideoRoundTrip({self.backend.name})"


__all__ = [
    "VideoRoundTrip",
    "available_backends",
    "compress_video",
    "default_fallback",
    "FALLBACK_CODEC",
    "FALLBACK_CRF",
    "FALLBACK_PRESET",
]
