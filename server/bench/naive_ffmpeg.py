"""The naive baseline of BENCH.md: the video round trip the way the reference
implementation does it.

Per video batch: every frame is written as a PNG file, the ``ffmpeg``
command-line tool encodes the PNG sequence into a video file with the same
codec parameters, ``ffmpeg`` runs again to decode the video into PNG files
(scaled back to the original width), and the PNGs are read back.  Two process
launches, 2N PNG encodes/decodes and a container on disk per batch: this is
what the in-memory backend (``server.codecs.software``) replaces, and the
ratio between the two is a headline number.

Deliberately *not* tuned, so the comparison is honest:

* ffmpeg's own threading is left at its default (``-threads`` not given:
  one thread per core per encoder), as the reference runs it;
* PNGs are written with zlib level 1 (OpenCV's ``cv2.imwrite`` default, which
  the reference uses), not a slower Pillow default;
* frames go through a real temporary directory (``workdir``) on disk.

Odd sizes are edge-padded to even before writing (the reference would fail on
them with yuv420p) and cropped back, like the in-memory backend.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from server.codecs.base import check_frames
from server.degradation.video import CodecError, VideoParams, aspect_width

#: Container for the encoded stream; MP4 carries all four codecs.
CONTAINER = "mp4"
PNG_COMPRESS_LEVEL = 1


def ffmpeg_available() -> bool:
    """Whether the ``ffmpeg`` command-line tool is on PATH."""
    return shutil.which("ffmpeg") is not None


def _codec_args(params: VideoParams) -> list[str]:
    args = ["-c:v", params.codec]
    if params.codec in ("libx264", "libx265"):
        args += ["-crf", str(params.crf)]
        if params.preset is not None:
            args += ["-preset", params.preset]
        if params.codec == "libx265":
            # x265 prints an info banner per encode to stderr otherwise.
            args += ["-x265-params", "log-level=error"]
    else:
        args += ["-b:v", f"{params.bitrate_kbps}k"]
    return args


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CodecError(f"ffmpeg exited {proc.returncode}: {proc.stderr.strip()[-500:]}")


def _roundtrip_in(frames: np.ndarray, params: VideoParams, tmp: Path) -> np.ndarray:
    n, h, w, _ = frames.shape
    new_w = aspect_width(w, params.aspect_ratio)
    resized = new_w != w
    pad_h, pad_w = h & 1, 0 if resized else w & 1
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    eh, ew = frames.shape[1:3]

    src_dir, dst_dir = tmp / "in", tmp / "out"
    src_dir.mkdir()
    dst_dir.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(src_dir / f"{i:06d}.png", compress_level=PNG_COMPRESS_LEVEL)

    video = tmp / f"video.{CONTAINER}"
    base = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    encode = base + ["-framerate", str(params.fps), "-i", str(src_dir / "%06d.png")]
    if resized:
        encode += ["-vf", f"scale={new_w}:{eh}:flags=bicubic"]
    encode += _codec_args(params) + ["-pix_fmt", "yuv420p", "-r", str(params.fps), str(video)]
    _run(encode)

    decode = base + ["-i", str(video)]
    if resized:
        decode += ["-vf", f"scale={ew}:{eh}:flags=bicubic"]
    # passthrough: one PNG per coded frame, no frame-rate based dup/drop.
    decode += ["-fps_mode", "passthrough", "-pix_fmt", "rgb24", str(dst_dir / "%06d.png")]
    _run(decode)

    paths = sorted(dst_dir.glob("*.png"))
    if len(paths) != n:
        raise CodecError(f"{params.codec}: ffmpeg decoded {len(paths)} of {n} frames")
    out = np.empty((n, eh, ew, 3), np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(out[:, :h, :w])


def naive_roundtrip(
    frames: np.ndarray, params: VideoParams, workdir: Path | None = None
) -> np.ndarray:
    """Encode + decode ``frames`` with the ffmpeg CLI through PNG files on disk.

    ``workdir``: where the per-call temporary directory goes (system temp dir
    by default); it is removed afterwards.  Raises :class:`CodecError` if
    ffmpeg is missing or fails, or returns the wrong number of frames.
    """
    frames = check_frames(frames)
    if not ffmpeg_available():
        raise CodecError("the ffmpeg command-line tool is not installed")
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="naive-ffmpeg-", dir=workdir) as tmp:
        return _roundtrip_in(frames, params, Path(tmp))
