"""Video compression block (spec section 6): encode + decode a batch of frames
in memory, with a software backend now and room for NVENC/NVDEC later."""

from .base import CodecBackend, CodecError, VideoParams, aspect_width
from .roundtrip import available_backends, compress_video
from .software import SoftwareBackend

__all__ = [
    "CodecBackend",
    "CodecError",
    "SoftwareBackend",
    "VideoParams",
    "aspect_width",
    "available_backends",
    "compress_video",
]
