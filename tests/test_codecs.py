"""Video compression block (spec section 6) on real photographs.

Clips are camera pans over skimage's sample photographs: neighbouring
360x360 crops, downscaled x4 to 90x90 with torch bicubic, exactly like the
LR frames of the pipeline.  Codecs behave very differently on noise, so no
random images are used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MID
from skimage import data

from server.bench.naive_ffmpeg import ffmpeg_available, naive_roundtrip
from server.codecs import (
    CodecBackend,
    CodecError,
    SoftwareBackend,
    VideoParams,
    aspect_width,
    available_backends,
    compress_video,
)
from server.codecs import roundtrip as roundtrip_module
from server.codecs.software import encoder_options, plan_sizes

BACKEND = SoftwareBackend()

CODECS = list(MID)


def _pan(img: np.ndarray, n: int, dx: int = 6, dy: int = 2) -> np.ndarray:
    """``n`` neighbouring 360x360 crops of ``img``, bicubic-downscaled to 90x90."""
    crops = np.stack([img[k * dy : k * dy + 360, k * dx : k * dx + 360] for k in range(n)])
    t = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(
        t, size=(90, 90), mode="bicubic", antialias=True, align_corners=False
    )
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """24 frames: three pans of 8 (astronaut, coffee, rocket) with scene cuts."""
    return np.concatenate(
        [_pan(data.astronaut(), 8), _pan(data.coffee(), 8), _pan(data.rocket(), 8)]
    )


@pytest.fixture(scope="module")
def moto() -> np.ndarray:
    """16 frames panning over the stereo motorcycle photograph."""
    return _pan(data.stereo_motorcycle()[0], 16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


# --- round trips -----------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips(clip: np.ndarray, codec: str) -> None:
    out = BACKEND.roundtrip(clip, MID[codec])
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert not np.array_equal(out, clip)
    q = psnr(out, clip)
    assert 20.0 < q < 60.0, q


@pytest.mark.parametrize(("codec", "low", "high"), [("libx264", 20, 32), ("libx265", 25, 37)])
def test_quality_falls_as_crf_rises(moto: np.ndarray, codec: str, low: int, high: int) -> None:
    good = BACKEND.roundtrip(moto, VideoParams(codec, fps=25, crf=low, preset="medium"))
    bad = BACKEND.roundtrip(moto, VideoParams(codec, fps=25, crf=high, preset="medium"))
    assert psnr(bad, moto) < psnr(good, moto) - 1.0


@pytest.mark.parametrize("codec", ["mpeg2video", "mpeg4"])
def test_quality_falls_as_bitrate_falls(moto: np.ndarray, codec: str) -> None:
    # At 90x90 anything above ~1000 kbit/s is already at the quantiser floor,
    # so the low end has to be far below the spec's range to show.
    good = BACKEND.roundtrip(moto, VideoParams(codec, fps=25, bitrate_kbps=6000))
    bad = BACKEND.roundtrip(moto, VideoParams(codec, fps=25, bitrate_kbps=100))
    assert psnr(bad, moto) < psnr(good, moto) - 1.0


@pytest.mark.parametrize("codec", CODECS)
def test_same_input_same_bytes(clip: np.ndarray, codec: str) -> None:
    first = BACKEND.roundtrip(clip, MID[codec])
    # Churn the heap in between: encoders that read uninitialised memory
    # (x264's AVX-512 kernels did) only show it when freed memory is reused.
    BACKEND.roundtrip(clip[:6], MID["libx265" if codec != "libx265" else "libx264"])
    second = BACKEND.roundtrip(clip, MID[codec])
    third = BACKEND.roundtrip(clip, MID[codec])
    assert np.array_equal(first, second) and np.array_equal(first, third)


def test_x264_kept_off_avx512_when_present() -> None:
    opts = encoder_options(MID["libx264"])
    assert opts["crf"] == "26" and opts["preset"] == "medium"
    from server.codecs.software import _cpu_has_avx512

    assert ("x264-params" in opts) == _cpu_has_avx512()
    assert "frame-threads=1" in encoder_options(MID["libx265"])["x265-params"]


# --- geometry ----------------------------------------------------------------


def test_aspect_width_formula() -> None:
    assert aspect_width(90, 0.85) == 76  # 2*floor(38.25)
    assert aspect_width(90, 1.3) == 116  # 2*floor(58.5)
    assert aspect_width(90, 1.35) == 120  # 2*floor(60.75)
    assert aspect_width(45, 1.3) == 58  # 2*floor(29.25)
    assert aspect_width(90, 1.0) == 90
    assert aspect_width(45, 1.0) == 45  # "keep" never rescales; odd is padded
    assert aspect_width(3, 0.5) == 2  # never below 2


@pytest.mark.parametrize("ratio", [0.85, 1.3])
@pytest.mark.parametrize("codec", ["mpeg4", "libx264", "libx265"])
def test_aspect_ratio_round_trip_keeps_shape(clip: np.ndarray, codec: str, ratio: float) -> None:
    base = MID[codec]
    params = VideoParams(
        codec, base.fps, ratio, crf=base.crf, bitrate_kbps=base.bitrate_kbps, preset=base.preset
    )
    frames = clip[:8]
    plan = plan_sizes(90, 90, params)
    assert plan.enc_w == aspect_width(90, ratio) and plan.fused
    out = BACKEND.roundtrip(frames, params)
    assert out.shape == frames.shape
    assert not np.array_equal(out, BACKEND.roundtrip(frames, base))  # really resized
    assert psnr(out, frames) > 20.0


@pytest.mark.parametrize("ratio", [1.0, 1.3])
@pytest.mark.parametrize("codec", CODECS)
def test_odd_sizes_round_trip(clip: np.ndarray, codec: str, ratio: float) -> None:
    base = MID[codec]
    params = VideoParams(
        codec, base.fps, ratio, crf=base.crf, bitrate_kbps=base.bitrate_kbps, preset=base.preset
    )
    frames = np.ascontiguousarray(clip[:6, 20:53, 10:55])  # 33 x 45
    if codec == "libx265":  # below x265's safe minimum: padded around the picture
        assert plan_sizes(33, 45, params).enc_w == 72
    out = BACKEND.roundtrip(frames, params)
    assert out.shape == (6, 33, 45, 3) and out.dtype == np.uint8
    assert psnr(out, frames) > 20.0


@pytest.mark.parametrize("codec", CODECS)
def test_single_frame(clip: np.ndarray, codec: str) -> None:
    out = BACKEND.roundtrip(clip[:1], MID[codec])
    assert out.shape == (1, 90, 90, 3)
    assert psnr(out, clip[:1]) > 20.0


def test_bad_frames_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="uint8"):
        BACKEND.roundtrip(np.zeros((2, 8, 8, 3), np.float32), MID["libx264"])
    with pytest.raises(ValueError, match="RGB"):
        BACKEND.roundtrip(np.zeros((2, 8, 8), np.uint8), MID["libx264"])
    with pytest.raises(ValueError, match="N >= 1"):
        BACKEND.roundtrip(np.zeros((0, 8, 8, 3), np.uint8), MID["libx264"])


# --- retry / fallback ----------------------------------------------------------


class FlakyBackend(SoftwareBackend):
    """The real software backend, made to fail ``failures`` times for one codec."""

    name = "flaky"

    def __init__(self, codec: str, failures: int) -> None:
        self.codec, self.failures, self.calls = codec, failures, []

    def supports(self, codec: str) -> bool:
        return True

    def roundtrip(self, frames: np.ndarray, params: VideoParams) -> np.ndarray:
        self.calls.append(params.codec)
        if params.codec == self.codec and self.failures > 0:
            self.failures -= 1
            raise CodecError(f"{params.codec}: injected failure")
        return super().roundtrip(frames, params)


class BrokenHardware(CodecBackend):
    """A hardware backend whose every round trip fails, as NVDEC / NVENC do
    when the driver or the session is broken."""

    name = "nvenc"

    def __init__(self, error: str = "nvenc: RuntimeError: NV_ENC_ERR_OUT_OF_MEMORY") -> None:
        self.error, self.calls = error, []

    def supports(self, codec: str) -> bool:
        return codec in ("libx264", "libx265")

    def roundtrip(self, frames: np.ndarray, params: VideoParams) -> np.ndarray:
        self.calls.append(params.codec)
        raise CodecError(f"{params.codec}: {self.error}")


def test_hardware_failure_runs_the_same_codec_in_software(clip: np.ndarray) -> None:
    hw = BrokenHardware()
    for codec in ("libx264", "libx265"):
        out, rec = compress_video(clip[:6], MID[codec], hw)
        assert hw.calls[-2:] == [codec, codec]  # tried, retried once
        # the codec mix is kept: the same codec and parameters, run by the software backend
        assert np.array_equal(out, BACKEND.roundtrip(clip[:6], MID[codec]))
        p = MID[codec]
        assert rec == {"backend": "software", "codec": codec, "crf": p.crf, "bitrate_kbps": p.bitrate_kbps,
                       "preset": p.preset, "codec_failure": f"{codec}: nvenc: RuntimeError: NV_ENC_ERR_OUT_OF_MEMORY",
                       "fallback": False}


def test_hardware_then_software_failure_falls_back(clip: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    software = FlakyBackend("libx265", 99)  # the software backend cannot do this draw either
    monkeypatch.setattr(roundtrip_module, "_SOFTWARE", software)
    out, rec = compress_video(clip[:4], MID["libx265"], BrokenHardware())
    assert software.calls == ["libx265", "libx265", "libx264"]  # same codec twice, then the fallback
    assert rec["backend"] == "flaky" and rec["codec"] == "libx264" and rec["fallback"] is True
    assert rec["codec_failure"] == ("libx265: nvenc: RuntimeError: NV_ENC_ERR_OUT_OF_MEMORY; "
                                    "software libx265: injected failure")
    assert np.array_equal(out, BACKEND.roundtrip(clip[:4], VideoParams("libx264", 24, crf=26, preset="medium")))


def test_software_backend_failure_goes_straight_to_the_fallback(clip: np.ndarray) -> None:
    """A backend that already is software is not run a third and fourth time."""
    from server.codecs.nvcodec import HardwareCaps
    from server.codecs.selection import PlanBackend, select_backends

    plan = select_backends(HardwareCaps.none("no GPU"))
    flaky = FlakyBackend("mpeg4", 99)
    flaky.name = "software"  # what the plan's software backend records
    out, rec = compress_video(clip[:4], MID["mpeg4"], PlanBackend(plan, {"software": flaky}))
    assert flaky.calls == ["mpeg4", "mpeg4"] and rec["fallback"] is True and rec["codec"] == "libx264"


def test_fallback_after_two_failures(clip: np.ndarray) -> None:
    backend = FlakyBackend("libx265", failures=99)
    out, rec = compress_video(clip, MID["libx265"], backend)
    assert backend.calls == ["libx265", "libx265"]  # tried, retried once
    assert out.shape == clip.shape  # all N frames
    assert rec["fallback"] is True and rec["backend"] == "software"
    assert rec["codec"] == "libx264" and rec["crf"] == 26 and rec["preset"] == "medium"
    assert rec["codec_failure"] == "libx265: injected failure"
    # the frames really are the fallback codec's output
    assert np.array_equal(out, BACKEND.roundtrip(clip, VideoParams("libx264", 24, crf=26, preset="medium")))


def test_explicit_fallback_params(clip: np.ndarray) -> None:
    fb = VideoParams("mpeg4", fps=25, bitrate_kbps=4000)
    out, rec = compress_video(clip[:5], MID["libx264"], FlakyBackend("libx264", 2), fb)
    assert out.shape == (5, 90, 90, 3)
    assert rec["codec"] == "mpeg4" and rec["bitrate_kbps"] == 4000 and rec["crf"] is None
    assert rec["codec_failure"].startswith("libx264: ")


def test_retry_recovers_without_fallback(clip: np.ndarray) -> None:
    backend = FlakyBackend("mpeg4", failures=1)
    out, rec = compress_video(clip[:5], MID["mpeg4"], backend)
    assert backend.calls == ["mpeg4", "mpeg4"]
    assert out.shape == (5, 90, 90, 3)
    assert rec == {
        "backend": "flaky",
        "codec": "mpeg4",
        "crf": None,
        "bitrate_kbps": 5000,
        "preset": None,
        "codec_failure": None,
        "fallback": False,
    }


def test_fallback_failure_raises(clip: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roundtrip_module, "_SOFTWARE", FlakyBackend("libx264", 99))
    with pytest.raises(CodecError, match="libx265: injected failure.*fallback libx264"):
        compress_video(clip[:3], MID["libx265"], FlakyBackend("libx265", 99))


def test_unsupported_codec_goes_to_software(clip: np.ndarray) -> None:
    class H26xOnly(FlakyBackend):
        def supports(self, codec: str) -> bool:
            return codec in ("libx264", "libx265")

    backend = H26xOnly("none", 0)
    out, rec = compress_video(clip[:4], MID["mpeg2video"], backend)
    assert backend.calls == [] and rec["backend"] == "software" and not rec["fallback"]
    assert out.shape == (4, 90, 90, 3)


def test_available_backends() -> None:
    backends = available_backends()
    assert isinstance(backends["software"], SoftwareBackend)
    assert all(backends["software"].supports(c) for c in CODECS)
    assert not backends["software"].supports("libvpx")


# --- naive baseline --------------------------------------------------------------


@pytest.mark.skipif(not ffmpeg_available(), reason="the ffmpeg command-line tool is not installed")
def test_naive_baseline_matches_in_memory(clip: np.ndarray, tmp_path) -> None:
    params = VideoParams("libx264", fps=25, crf=26, preset="medium")
    naive = naive_roundtrip(clip, params, workdir=tmp_path)
    ours = BACKEND.roundtrip(clip, params)
    assert naive.shape == clip.shape and naive.dtype == np.uint8
    assert abs(psnr(naive, clip) - psnr(ours, clip)) < 1.5
    assert list(tmp_path.iterdir()) == []  # its temporary files are gone


def test_codec_limit_smoke(clip: np.ndarray) -> None:
    from server.bench.codec_limit import codec_limit

    res = codec_limit([(clip[:4], MID["mpeg4"]), (clip[4:7], MID["libx264"])], workers=1)
    assert res["pairs"] == 7 and res["seconds"] > 0 and res["pairs_per_s"] > 0


# --- parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codec": "libvpx", "fps": 25}, "codec"),
        ({"codec": "libx264", "fps": 25}, "needs crf"),
        ({"codec": "libx265", "fps": 25, "bitrate_kbps": 4000}, "needs crf"),
        ({"codec": "mpeg2video", "fps": 25}, "needs bitrate"),
        ({"codec": "mpeg4", "fps": 25, "crf": 26}, "needs bitrate"),
        ({"codec": "mpeg2video", "fps": 17, "bitrate_kbps": 4000}, "cannot signal"),
        ({"codec": "libx264", "fps": 25, "crf": 60}, r"\[0, 51\]"),
        ({"codec": "libx264", "fps": 0, "crf": 26}, "fps"),
        ({"codec": "libx264", "fps": 25, "crf": 26, "preset": "veryslow"}, "preset"),
        ({"codec": "libx264", "fps": 25, "crf": 26, "aspect_ratio": 0.0}, "aspect_ratio"),
        ({"codec": "mpeg4", "fps": 25, "bitrate_kbps": -5}, "bitrate_kbps"),
    ],
)
def test_video_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VideoParams(**kwargs)


def test_video_params_normalises_numbers() -> None:
    p = VideoParams("libx264", fps=np.int64(24), aspect_ratio=np.float32(1.25), crf=np.int32(26))
    assert type(p.fps) is int and type(p.crf) is int and type(p.aspect_ratio) is float
    assert (p.fps, p.crf) == (24, 26) and p.bitrate_kbps is None and p.preset is None


_DECODE_TWICE = r"""
import hashlib, sys
from benchmarks.nvcodec_speed import make_batches
from server.codecs import software as sw
from server.degradation.video import VideoParams
clips = make_batches(4, 64, 90)  # 90x90 pans over real photographs
if sys.argv[1] == "warm":  # other codecs first: a different buffer-pool history in this process
    sw.SoftwareBackend().roundtrip(clips[0][:4], VideoParams("libx264", fps=25, crf=26))
    sw.SoftwareBackend().roundtrip(clips[1][:8], VideoParams("mpeg2video", fps=25, bitrate_kbps=4000))
for br in (1000, 4500):
    p = VideoParams("mpeg4", fps=24, bitrate_kbps=br)
    for clip in clips:  # the round trip, and the same bitstream decoded by a fresh decoder
        print(hashlib.md5(sw.SoftwareBackend().roundtrip(clip, p).tobytes()).hexdigest()[:8],
              hashlib.md5(sw.decode_packets(sw.encode_to_packets(clip, p)).tobytes()).hexdigest()[:8])
"""


def test_mpeg4_decode_is_the_same_in_every_process():
    """FFmpeg's MPEG-4 error concealment read unwritten buffers: bytes depended on the process's history."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _DECODE_TWICE, mode], capture_output=True, text=True,
                           check=True).stdout.split() for mode in ("cold", "warm", "cold")]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0::2] == runs[0][1::2]  # decoding does not depend on the decoder's history either
