"""A codec backend's contract: where one video round trip runs (spec section 6).

The codec table's vocabulary (:class:`~server.degradation.video.VideoParams`,
:class:`~server.degradation.video.CodecError`, the names and ranges) belongs
to the degradation model, in ``server.degradation.video``.

A *backend* turns a batch of uint8 RGB frames into the frames a viewer would
see after one encode + decode with the given parameters.  The software
backend (PyAV / FFmpeg, in memory) is the reference; a hardware backend
(NVENC / NVDEC) implements the same interface so the caller never branches on
where the codec runs.

No codec library is imported here, so the GPU backend can use it without
pulling in PyAV.
"""

from __future__ import annotations

import abc

import numpy as np

from server.degradation.video import VideoParams


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Validate a video batch and return it C-contiguous.

    Raises ``ValueError`` (a caller bug, not a codec failure) for anything
    that is not uint8 ``(N, H, W, 3)`` with N >= 1 and H, W >= 2.
    """
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {frames.shape}")
    n, h, w, _ = frames.shape
    if n < 1 or h < 2 or w < 2:
        raise ValueError(f"need N >= 1 frames of at least 2x2, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


class CodecBackend(abc.ABC):
    """Where a video round trip runs (software FFmpeg, or NVENC/NVDEC)."""

    #: Short label recorded with every output ("software", "nvenc", ...).
    name: str = "abstract"

    @abc.abstractmethod
    def supports(self, codec: str) -> bool:
        """Whether this backend can round-trip ``codec`` (an FFmpeg encoder name)."""

    def label(self, codec: str) -> str:
        """Name recorded for a round trip of ``codec`` (``record["backend"]``).

        ``name`` for a single backend; a backend that dispatches each codec
        to another one (``selection.PlanBackend``) names the one it uses.
        """
        return self.name

    @abc.abstractmethod
    def roundtrip(self, frames: np.ndarray, params: VideoParams) -> np.ndarray:
        """Encode ``frames`` with ``params`` and decode them again, in memory.

        ``frames``: uint8 ``(N, H, W, 3)`` RGB, N >= 1, H, W >= 2 (odd
        allowed).  Returns the decoded frames with the same shape and dtype.
        Raises :class:`CodecError` on any codec failure, including a decoder
        that returns a different number of frames than it was given.
        """
