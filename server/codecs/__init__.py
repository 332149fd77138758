"""The codec backends: one video round trip (encode + decode, in memory) of a
batch of uint8 frames (spec section 6).  ``SoftwareBackend`` (PyAV / FFmpeg) is
the reference; ``nvcodec`` adds NVENC / NVDEC through PyNvVideoCodec where the
GPU has them, and ``selection`` picks a backend per codec.  ``compress_video``
adds the retries and fallbacks, and ``VideoRoundTrip`` wraps it as the
degradation engine's video codec.

Depends on ``server.degradation.video`` (the codec table's vocabulary) only.
"""

from server.degradation.video import CodecError, VideoParams, aspect_width

from .base import CodecBackend
from .roundtrip import VideoRoundTrip, available_backends, compress_video
from .software import SoftwareBackend

__all__ = [
    "CodecBackend",
    "CodecError",
    "SoftwareBackend",
    "VideoParams",
    "VideoRoundTrip",
    "aspect_width",
    "available_backends",
    "compress_video",
]
