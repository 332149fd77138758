"""Hardware video round trips (spec section 6, "Hardware codecs") through
NVIDIA's PyNvVideoCodec: NVENC encode for H.264 / HEVC, NVDEC decode for all
four codecs, and the hybrid "software encode + NVDEC decode" that a
datacenter GPU (A100 / H100 / H200: NVDEC but no NVENC) can run.

Importing this module needs neither the package nor a driver: PyNvVideoCodec
is imported inside functions, and :func:`probe_hardware` reports "nothing
available" with the reason instead of raising.  The probe runs in a spawned
subprocess, so a CUDA context the driver leaks on a GPU without NVENC, or an
``exit()`` inside PyNvVideoCodec, cannot reach the server process.

Two backends, one class (:class:`NvCodecBackend`):

* ``encode="nvenc"`` (name ``"nvenc"``): RGB is padded and converted to NV12
  on the GPU (:mod:`.nv12`, plain torch), NVENC encodes, NVDEC decodes,
  NV12 -> RGB on the GPU, crop back.  H.264 and HEVC only.
* ``encode="software"`` (name ``"hybrid"``): the software backend's encoder
  (same geometry, swscale conversion and x264/x265/FFmpeg settings) makes the
  bitstream in memory, NVDEC decodes it.  All four codecs.  When no padding
  beyond the software path's is needed (H.264, MPEG-2, MPEG-4 at 90x90;
  HEVC needs NVDEC's 144x144, so it is a different, padded encode), the
  bitstream is the software round trip's byte for byte; NVDEC is bit-exact
  for H.264 / HEVC, and with
  ``rgb="swscale"`` (the default for numpy frames) the decoded frames are
  converted by the very swscale call of the software path, so the hybrid
  result equals the software result exactly (MPEG-2 / MPEG-4: IDCT may
  differ within the standards' tolerance).

Frames in: uint8 NHWC, a numpy array on the CPU or a torch tensor (CPU or
CUDA); frames out: the same kind, shape and device.

PyNvVideoCodec API relied on (version 2.2.4, read from the wheel's Python
sources, samples and pybind11 docstrings; the C++ sources of an earlier 2.x
for the option names; exercised by the ``gpu`` tests of
``tests/test_nvcodec.py``):

* ``CreateEncoder(width, height, fmt, usecpuinputbuffer, **opts)`` ->
  ``PyNvEncoder``; ``fmt="NV12"``; options are strings: ``codec``
  (``h264`` | ``hevc`` | ``av1``), ``preset`` (``P1``..``P7``),
  ``tuning_info`` (``high_quality`` ...), ``rc`` (``constqp`` | ``vbr`` |
  ``cbr``), ``constqp`` (``"P,B,I"`` or one value), ``cq`` (target
  quality, with ``rc=vbr``), ``bitrate``, ``fps``, ``gop``, ``bf``,
  ``gpu_id``.  Unset: P4, high quality, constant QP 28/31/25 (P/B/I),
  infinite GOP.
* ``encoder.Encode(frame)``: ``frame`` has ``.cuda()`` returning either an
  object with ``__dlpack__`` (2-D ``(3H/2, W)``; called positionally, which
  torch's keyword-only ``Tensor.__dlpack__`` refuses) or a list of two
  ``__cuda_array_interface__`` planes (Y ``(H, W, 1)``, UV
  ``(H/2, W/2, 2)``, UV after Y) - the samples' ``AppFrame``, used here.
  Returns a list of ``{"data", "timestamp", "picture_type"}`` dicts (2.2);
  earlier 2.x returned the bytes.  ``encoder.EndEncode()`` flushes, same
  return type.
* ``GetEncoderCaps(gpuid=, codec=)`` -> dict with ``width_min``,
  ``height_min``, ``width_max``, ``height_max``, ``num_encoder_engines``...;
  raises where NVENC cannot open a session (datacenter GPUs).
* ``CreateDecoder(gpuid=, codec=cudaVideoCodec.X, cudacontext=0,
  cudastream=0, usedevicememory=True)`` -> ``PyNvDecoder``;
  ``decoder.Decode(PacketData)`` -> list of ``DecodedFrame`` (NV12, DLPack
  ``(3H/2, W)``, or ``.cuda()`` CAI planes), valid until the next
  ``Decode``; a ``PacketData`` with ``bsl=0`` flushes (end of stream).
  ``PacketData()`` has writable ``bsl_data`` (pointer), ``bsl`` (size),
  ``pts``, ``decode_flag``.  Frames come out cropped to the display size, in
  display order, with the packet pts as ``timestamp``.
* ``GetDecoderCaps(gpuid=, codec=, chromaformat=, bitdepth=)`` -> dict with
  ``supported``, ``width_min``, ``height_min``, ``width_max``,
  ``height_max``, ``num_decoder_engines``.
* Importing ``PyNvVideoCodec`` raises ``RuntimeError`` (not ImportError)
  when the driver's NVENC library is missing (its ``__init__`` asks that
  library for the NVENC API version, then loads
  ``PyNvVideoCodec_130`` or ``_121`` + the extension suffix as
  ``_PyNvVideoCodec`` and copies its names); decoding does not need the
  library, so :func:`import_pynvvideocodec` then loads the native module
  itself and reports it.

Mapping of the spec's x264/x265 parameters to NVENC (``nvenc_options``):

====================  =======================================================
x264 / x265           NVENC
====================  =======================================================
preset slow           P6
preset medium / none  P4  (x264's default preset is medium)
preset fast           P3
preset faster         P2
preset superfast      P1
crf C                 ``rc=constqp``, QP(P) = C, QP(B) = C + 2, QP(I) = C - 3
                      (clamped to 0..51)
tuning                ``high_quality`` (PyNvVideoCodec's default)
GOP, B-frames         NVENC's own defaults (the spec keeps codec defaults)
====================  =======================================================

Why constant QP rather than ``rc=vbr`` + ``cq=C``: the offsets are x264's
own (``ipratio`` 1.4 -> 6 log2 1.4 = 2.9 QP lower for I frames, ``pbratio``
1.3 -> 2.3 QP higher for B frames), so the quantiser matches what CRF C
spends on an average P frame; constant QP is deterministic (no rate-control
state), does not depend on the padding added up to NVENC's minimum size
(target-quality VBR would spend bits on the padded border), and needs no
bitrate cap, which ``cq`` mode does.  What it lacks is CRF's per-frame
adaptation (``qcomp``); the PSNR against the software codec on the same
frames is measured by ``benchmarks/nvcodec_speed.py``.

Sizes: NVENC and NVDEC have minimum sizes above 90x90 for some codecs
(H.264 encode width >= 145 on some GPUs, HEVC decode >= 144x144): frames are
padded by reflection up to the limits ``GetEncoderCaps`` / ``GetDecoderCaps``
report (even-rounded), and cropped back after decoding.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from server.degradation.video import CRF_CODECS, CodecError, VideoParams

from .base import CodecBackend

log = logging.getLogger(__name__)

#: Our codec name (FFmpeg encoder) -> NVENC ``codec`` option.
NVENC_CODECS: dict[str, str] = {"libx264": "h264", "libx265": "hevc"}
#: Our codec name -> ``cudaVideoCodec`` member for NVDEC.
NVDEC_CODECS: dict[str, str] = {
    "mpeg2video": "MPEG2",
    "mpeg4": "MPEG4",
    "libx264": "H264",
    "libx265": "HEVC",
}
#: Spec section 6: x264/x265 preset -> NVENC preset.
PRESET_MAP: dict[str, str] = {
    "slow": "P6",
    "medium": "P4",
    "fast": "P3",
    "faster": "P2",
    "superfast": "P1",
}
DEFAULT_PRESET = "medium"
#: QP offsets of I and B frames from the P-frame QP (= CRF).
I_QP_OFFSET = -3
B_QP_OFFSET = 2
QP_RANGE = (0, 51)
NVENC_TUNING = "high_quality"

#: Fallback limits (width, height) when the driver's caps lack them: NVDEC's
#: documented minimums, and NVENC's minimums on the GPUs that have the
#: largest (Turing and later: H.264 145x49, HEVC 129x33).
DEFAULT_DECODE_MIN: dict[str, tuple[int, int]] = {
    "mpeg2video": (48, 16),
    "mpeg4": (48, 16),
    "libx264": (48, 16),
    "libx265": (144, 144),
}
DEFAULT_ENCODE_MIN: dict[str, tuple[int, int]] = {"libx264": (145, 49), "libx265": (129, 33)}
DEFAULT_MAX = (4096, 4096)


def nvenc_preset(preset: str | None) -> str:
    """NVENC preset for a spec preset (``None`` = x264's default, medium)."""
    return PRESET_MAP[preset if preset is not None else DEFAULT_PRESET]


def nvenc_qp(crf: int) -> tuple[int, int, int]:
    """(P, B, I) constant QPs for a CRF value, clamped to 0..51."""
    lo, hi = QP_RANGE

    def clamp(q: int) -> int:
        return min(max(q, lo), hi)

    return clamp(crf), clamp(crf + B_QP_OFFSET), clamp(crf + I_QP_OFFSET)


def nvenc_options(params: VideoParams, gpu_id: int = 0) -> dict[str, str]:
    """``CreateEncoder`` keyword options for one draw of the spec's codec table."""
    if params.codec not in NVENC_CODECS:
        raise ValueError(f"NVENC encodes only {', '.join(NVENC_CODECS)}, not {params.codec}")
    if params.codec not in CRF_CODECS or params.crf is None:
        raise ValueError(f"{params.codec} on NVENC needs crf")
    p, b, i = nvenc_qp(params.crf)
    return {
        "codec": NVENC_CODECS[params.codec],
        "preset": nvenc_preset(params.preset),
        "tuning_info": NVENC_TUNING,
        "rc": "constqp",
        "constqp": f"{p},{b},{i}",  # PyNvVideoCodec's order: P, B, I
        "fps": str(params.fps),
        "gpu_id": str(gpu_id),
    }


# --- capabilities -------------------------------------------------------------


@dataclass(frozen=True)
class CodecLimits:
    """Frame sizes one engine accepts for one codec (coded size, pixels)."""

    min_width: int
    min_height: int
    max_width: int = DEFAULT_MAX[0]
    max_height: int = DEFAULT_MAX[1]
    engines: int = 0

    @property
    def min_size(self) -> tuple[int, int]:
        return (self.min_width, self.min_height)

    def fits(self, width: int, height: int) -> bool:
        return width <= self.max_width and height <= self.max_height


@dataclass(frozen=True)
class HardwareCaps:
    """What the GPU's video engines can do, probed once at start-up.

    ``encode`` / ``decode`` map our codec names (FFmpeg encoder names, as in
    :class:`VideoParams`) to the sizes NVENC / NVDEC accept; a codec that is
    absent cannot be used there, and ``notes`` says why (``"encode:libx264"``,
    ``"decode:mpeg4"``).  ``reason`` is one line for the log: why nothing is
    available, or what is.  ``warnings``: what works only in part and must
    not go unnoticed (e.g. :func:`nvenc_missing_note`); logged, in
    :meth:`summary` and in GetInfo's ``codec_backends``.
    """

    available: bool
    reason: str
    device: str | None = None
    library: str | None = None
    gpu_id: int = 0
    encode: Mapping[str, CodecLimits] = field(default_factory=dict)
    decode: Mapping[str, CodecLimits] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @classmethod
    def none(cls, reason: str) -> "HardwareCaps":
        return cls(available=False, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str / int / bool / dict), what the probe subprocess sends back."""
        return {
            "available": bool(self.available),
            "reason": str(self.reason),
            "device": self.device,
            "library": self.library,
            "gpu_id": int(self.gpu_id),
            "encode": {k: asdict(v) for k, v in self.encode.items()},
            "decode": {k: asdict(v) for k, v in self.decode.items()},
            "notes": dict(self.notes),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HardwareCaps":
        """Inverse of :meth:`to_dict`; ``TypeError`` / ``KeyError`` / ``ValueError`` on a malformed dict."""
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a dict, got {type(data).__name__}")
        return cls(
            available=bool(data["available"]),
            reason=str(data["reason"]),
            device=data.get("device"),
            library=data.get("library"),
            gpu_id=int(data.get("gpu_id", 0)),
            encode={str(k): CodecLimits(**v) for k, v in dict(data.get("encode", {})).items()},
            decode={str(k): CodecLimits(**v) for k, v in dict(data.get("decode", {})).items()},
            notes={str(k): str(v) for k, v in dict(data.get("notes", {})).items()},
            warnings=tuple(str(w) for w in data.get("warnings", ())),
        )

    def can_encode(self, codec: str) -> bool:
        return codec in self.encode

    def can_decode(self, codec: str) -> bool:
        return codec in self.decode

    def summary(self) -> str:
        if not self.available:
            return f"no hardware codecs: {self.reason}"
        enc = ", ".join(self.encode) or "none"
        dec = ", ".join(self.decode) or "none"
        where = f"{self.device or 'GPU'}" + (f", {self.library}" if self.library else "")
        warn = "".join(f" (warning: {w})" for w in self.warnings)
        return f"{where}: NVENC {enc}; NVDEC {dec}{warn}"


def pynvvideocodec_installed() -> bool:
    return importlib.util.find_spec("PyNvVideoCodec") is not None


#: The driver library whose absence makes ``import PyNvVideoCodec`` fail,
#: decoding included: the package's ``__init__`` asks it for the NVENC API
#: version before it loads its native module.
NVENC_LIBRARY = "libnvidia-encode.so.1"
#: The package's native modules (``PyNvVideoCodec/PyNvVideoCodec<suffix>`` +
#: the interpreter's extension suffix, module name ``_PyNvVideoCodec``), the
#: NVENC 13.0 / CUDA 13 build first: that is what ``__init__`` picks on a
#: driver recent enough for CUDA 13.
NATIVE_MODULES = ("_130", "_121")
NATIVE_MODULE_NAME = "_PyNvVideoCodec"

_direct: Any = None  # the directly loaded module, once per process


def nvenc_missing_note(module_file: str) -> str:
    """What a direct load means, for logs, the probe result and GetInfo."""
    return (f"nvenc unavailable: {NVENC_LIBRARY} missing; NVDEC via direct module load "
            f"({os.path.basename(module_file)})")


def _package_dir() -> str | None:
    """PyNvVideoCodec's folder, found without running its ``__init__``."""
    spec = importlib.util.find_spec("PyNvVideoCodec")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _native_module_file(package_dir: str) -> str:
    import importlib.machinery

    tried = []
    for suffix in NATIVE_MODULES:
        for ext in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(package_dir, f"PyNvVideoCodec{suffix}{ext}")
            if os.path.exists(path):
                return path
            tried.append(os.path.basename(path))
    raise ImportError(f"no native module in {package_dir} (looked for {', '.join(tried)})")


def _exec_native_module(path: str) -> Any:
    """Load the extension module at ``path`` as ``_PyNvVideoCodec`` (its init
    function's name), the way PyNvVideoCodec's ``__init__`` does."""
    spec = importlib.util.spec_from_file_location(NATIVE_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot make a module spec for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_direct() -> Any:
    """PyNvVideoCodec's native module without the package's ``__init__``: a
    module with its public names, ``__version__`` (from the installed
    distribution) and ``__load_note__`` (:func:`nvenc_missing_note`).  NVDEC
    works through it; NVENC cannot, its library being missing."""
    import types
    from importlib import metadata

    package_dir = _package_dir()
    if package_dir is None:
        raise ImportError("PyNvVideoCodec's package folder not found")
    path = _native_module_file(package_dir)
    native = _exec_native_module(path)
    module = types.ModuleType("PyNvVideoCodec", f"PyNvVideoCodec's native module {path}, loaded directly")
    for name in dir(native):
        if not name.startswith("_"):
            setattr(module, name, getattr(native, name))
    try:
        module.__version__ = metadata.version("PyNvVideoCodec")
    except metadata.PackageNotFoundError:
        module.__version__ = "?"
    module.__file__ = path
    module.__load_note__ = nvenc_missing_note(path)
    return module


def import_pynvvideocodec():
    """The PyNvVideoCodec module, or raise ``RuntimeError`` with the reason.

    The package raises ``RuntimeError`` itself when the driver's NVENC
    library (:data:`NVENC_LIBRARY`) is missing - even though decoding does
    not need it.  Then its native module is loaded directly
    (:func:`_load_direct`), so NVDEC still works, and a warning says so; the
    module's ``__load_note__`` carries the note into the probe result.
    Every other failure (and a failing direct load) is ``RuntimeError``.
    """
    global _direct
    if _direct is not None:
        return _direct
    if not pynvvideocodec_installed():
        raise RuntimeError("PyNvVideoCodec is not installed (pip install PyNvVideoCodec)")
    try:
        import PyNvVideoCodec as nvc  # noqa: N813
    except Exception as e:  # ImportError, RuntimeError from its driver check, OSError
        if NVENC_LIBRARY not in str(e):
            raise RuntimeError(f"PyNvVideoCodec failed to load: {error_text(e)}") from e
        try:
            direct = _load_direct()
        except Exception as e2:
            raise RuntimeError(f"PyNvVideoCodec failed to load: {error_text(e)}; loading its native module "
                               f"directly failed too: {error_text(e2)}") from e2
        log.warning("PyNvVideoCodec: %s", direct.__load_note__)
        _direct = direct
        return direct
    return nvc


def _cuda_status() -> tuple[bool, str, str | None]:
    """(usable, reason, device name) for the CUDA device torch sees."""
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a dependency
        return False, f"torch unavailable: {e}", None
    try:
        if not torch.cuda.is_available():
            return False, "no NVIDIA GPU: torch.cuda.is_available() is False", None
        return True, "", torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception as e:
        return False, f"CUDA unusable: {e}", None


#: Longest error text kept in a note, a reason or a ``CodecError`` (characters).
ERROR_TEXT_LIMIT = 400


def fold_text(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """``text`` on one line (every run of whitespace, newlines included, made
    one space), at most ``limit`` characters; a longer text is cut with
    ``" ... [N more chars]"`` so the cut is visible."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    tail = " ... [{} more chars]"
    keep = max(0, limit - len(tail.format(len(text))))
    return text[:keep] + tail.format(len(text) - keep)


def error_text(e: BaseException, limit: int = ERROR_TEXT_LIMIT) -> str:
    """``"<Type>: <whole message>"``, whitespace-folded and bounded.

    PyNvVideoCodec's exception texts can run over several lines and the
    first one need not be the cause, so all of it is kept.
    """
    text = " ".join(str(e).split())
    return fold_text(f"{type(e).__name__}: {text}" if text else type(e).__name__, limit)


def _limits(caps: Mapping[str, Any], default_min: tuple[int, int], engines_key: str) -> CodecLimits:
    def get(key: str, default: int) -> int:
        v = caps.get(key)
        try:
            v = int(v)
        except (TypeError, ValueError):
            return default
        return v if v > 0 else default

    return CodecLimits(
        min_width=get("width_min", default_min[0]),
        min_height=get("height_min", default_min[1]),
        max_width=get("width_max", DEFAULT_MAX[0]),
        max_height=get("height_max", DEFAULT_MAX[1]),
        engines=get(engines_key, 0),
    )


#: Seconds the probe subprocess may take: start-up, importing torch and
#: PyNvVideoCodec, CUDA initialisation, the caps queries and trial encoders.
PROBE_TIMEOUT_S = 120.0


def probe_hardware(
    gpu_id: int | None = None,
    trial_encode: bool = True,
    nvc: Any = None,
    device_name: str | None = None,
    *,
    isolate: bool = True,
    timeout: float = PROBE_TIMEOUT_S,
    target: Callable[[int | None, bool], Mapping[str, Any]] | None = None,
) -> HardwareCaps:
    """Probe NVENC / NVDEC once; never raises, never takes the process down.

    The probe runs in a spawned subprocess (``isolate``, the default) that
    sends back :meth:`HardwareCaps.to_dict`: on a GPU without NVENC,
    ``GetEncoderCaps`` and the trial ``CreateEncoder`` create a CUDA context
    and throw before destroying it, and PyNvVideoCodec calls ``exit()`` on
    some CUDA driver errors; in a subprocess the leaked context goes away
    with it, and a subprocess that dies, raises, hangs past ``timeout``
    seconds or answers nonsense becomes "unavailable" with the reason.
    Without a CUDA GPU visible to torch no subprocess is started.

    ``isolate=False`` probes in this process (:func:`probe_hardware_here`),
    as does an injected ``nvc`` (a fake PyNvVideoCodec module, tests).
    ``target`` replaces the function the subprocess runs (a picklable,
    module-level ``f(gpu_id, trial_encode) -> dict``; tests).
    """
    if nvc is not None or not isolate:
        return probe_hardware_here(gpu_id, trial_encode, nvc=nvc, device_name=device_name)
    ok, why = _cuda_visible()
    if not ok:
        extra = "" if pynvvideocodec_installed() else "; PyNvVideoCodec not installed"
        return HardwareCaps.none(why + extra)
    if gpu_id is None:
        gpu_id = _current_device_if_initialised()
    try:
        answer = run_isolated(target or _probe_child, (gpu_id, bool(trial_encode)), timeout=timeout,
                              what="hardware probe")
        caps = HardwareCaps.from_dict(answer)
    except IsolatedError as e:
        caps = HardwareCaps.none(str(e))
    except (TypeError, KeyError, ValueError) as e:
        caps = HardwareCaps.none(f"hardware probe subprocess gave an unusable answer: {error_text(e)}")
    if not caps.available:
        log.warning("hardware codecs unavailable: %s", caps.reason)
    for w in caps.warnings:
        log.warning("hardware codecs: %s", w)
    return caps


def _cuda_visible() -> tuple[bool, str]:
    """Whether torch sees a CUDA GPU (no CUDA context is created)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True, ""
        return False, "no NVIDIA GPU: torch.cuda.is_available() is False"
    except Exception as e:
        return False, f"CUDA unusable: {error_text(e)}"


def _current_device_if_initialised() -> int | None:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_initialized() else None


def _probe_child(gpu_id: int | None, trial_encode: bool) -> dict[str, Any]:
    """What the probe subprocess runs: the probe, as plain data."""
    return probe_hardware_here(gpu_id, trial_encode).to_dict()


class IsolatedError(RuntimeError):
    """A function run by :func:`run_isolated` raised, died, hung or answered nothing."""


def _isolated_main(conn: Any, func: Callable[..., Any], args: tuple) -> None:
    """Body of the subprocess: run ``func``, send ``("ok", value)`` or ``("error", text)``."""
    try:
        try:
            value = func(*args)
        except BaseException as e:  # SystemExit from exit() too: report it, do not just vanish
            conn.send(("error", error_text(e)))
            return
        try:
            conn.send(("ok", value))
        except Exception as e:  # unpicklable answer
            conn.send(("error", f"answer not sendable: {error_text(e)}"))
    finally:
        conn.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_isolated(func: Callable[..., Any], args: tuple = (), *, timeout: float, what: str = "subprocess") -> Any:
    """``func(*args)`` in a fresh spawned process; its return value, or
    :class:`IsolatedError` saying why there is none: it raised (the error
    text), died before answering (exit code or signal), or did not answer
    within ``timeout`` seconds (then it is killed).  ``func`` and ``args``
    must be picklable (a module-level function), and so must the answer."""
    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_main, args=(send_end, func, args), name=what.replace(" ", "-"))
    try:
        proc.start()
    except Exception as e:
        recv_end.close()
        send_end.close()
        raise IsolatedError(f"{what} subprocess could not start: {error_text(e)}") from e
    send_end.close()  # ours: so a child that dies reads as end-of-file
    try:
        if not recv_end.poll(timeout):
            raise IsolatedError(f"{what} subprocess did not answer within {timeout:g} s (killed)")
        try:
            kind, payload = recv_end.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise IsolatedError(f"{what} subprocess died before answering ({_exit_text(proc.exitcode)}); "
                                "PyNvVideoCodec exits the process on some CUDA driver errors") from None
        proc.join(5)  # it has answered: let it exit on its own
        if kind != "ok":
            raise IsolatedError(f"{what} subprocess failed: {payload}")
        return payload
    finally:
        recv_end.close()
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def probe_hardware_here(
    gpu_id: int | None = None,
    trial_encode: bool = True,
    nvc: Any = None,
    device_name: str | None = None,
) -> HardwareCaps:
    """The probe itself, in this process (see :func:`probe_hardware`, which
    runs this in a subprocess); never raises.

    Order: a CUDA GPU visible to torch (the colour conversion runs in torch),
    PyNvVideoCodec importable, then per codec ``GetDecoderCaps`` and
    ``GetEncoderCaps``; with ``trial_encode`` an encoder is also created at
    the minimum size, the definitive test (spec: "encoder creation fails"
    on GPUs without NVENC).  When PyNvVideoCodec's native module had to be
    loaded directly (no NVENC library, see :func:`import_pynvvideocodec`),
    NVENC is not asked at all: the encode notes and ``warnings`` say why.
    ``nvc`` (with ``device_name``) injects a module in place of
    PyNvVideoCodec and skips the CUDA check (tests).
    """
    if nvc is None:
        ok, why, device = _cuda_status()
        if not ok:
            extra = "" if pynvvideocodec_installed() else "; PyNvVideoCodec not installed"
            return HardwareCaps.none(why + extra)
        try:
            nvc = import_pynvvideocodec()
        except RuntimeError as e:
            return HardwareCaps.none(str(e))
        if gpu_id is None:
            import torch

            gpu_id = torch.cuda.current_device()
    else:
        device = device_name
    gpu_id = 0 if gpu_id is None else int(gpu_id)
    library = f"PyNvVideoCodec {getattr(nvc, '__version__', '?')}"

    decode: dict[str, CodecLimits] = {}
    encode: dict[str, CodecLimits] = {}
    notes: dict[str, str] = {}
    for codec, member in NVDEC_CODECS.items():
        try:
            caps = dict(nvc.GetDecoderCaps(gpuid=gpu_id, codec=getattr(nvc.cudaVideoCodec, member)))
        except Exception as e:
            notes[f"decode:{codec}"] = f"GetDecoderCaps failed: {error_text(e)}"
            continue
        if not int(caps.get("supported", 1)):
            notes[f"decode:{codec}"] = "NVDEC does not support it on this GPU"
            continue
        decode[codec] = _limits(caps, DEFAULT_DECODE_MIN[codec], "num_decoder_engines")

    load_note = getattr(nvc, "__load_note__", None)  # loaded directly: no NVENC library
    for codec, name in NVENC_CODECS.items():
        if load_note:
            notes[f"encode:{codec}"] = load_note
            continue
        try:
            caps = dict(nvc.GetEncoderCaps(gpuid=gpu_id, codec=name))
        except Exception as e:
            notes[f"encode:{codec}"] = f"no NVENC ({error_text(e)})"
            continue
        if not caps:
            notes[f"encode:{codec}"] = "no NVENC (empty encoder caps)"
            continue
        limits = _limits(caps, DEFAULT_ENCODE_MIN[codec], "num_encoder_engines")
        if trial_encode:  # the definitive test; the engine count is only a hint
            w, h = limits.min_width + (limits.min_width & 1), limits.min_height + (limits.min_height & 1)
            try:
                nvc.CreateEncoder(w, h, "NV12", False, codec=name, gpu_id=str(gpu_id))
            except Exception as e:
                notes[f"encode:{codec}"] = f"no NVENC (encoder creation failed: {error_text(e)})"
                continue
        elif "num_encoder_engines" in caps and limits.engines == 0:
            notes[f"encode:{codec}"] = "no NVENC (0 encoder engines)"
            continue
        encode[codec] = limits

    available = bool(decode or encode)
    if available:
        reason = f"NVENC: {', '.join(encode) or 'none'}; NVDEC: {', '.join(decode) or 'none'}"
    else:
        reason = "neither NVENC nor NVDEC usable: " + "; ".join(f"{k}: {v}" for k, v in notes.items())
    return HardwareCaps(
        available=available,
        reason=reason,
        device=device,
        library=library,
        gpu_id=gpu_id,
        encode=encode,
        decode=decode,
        notes=notes,
        warnings=(load_note,) if load_note else (),
    )


# --- NVDEC / NVENC sessions ------------------------------------------------------
#
# A decoder is ``decode(codec, packets, pts, n, (width, height), device) ->
# NV12 tensor (n, 3h/2, w)``; an encoder is ``encode(codec, nv12, params) ->
# (packets, pts)``.  The defaults below drive PyNvVideoCodec; tests inject
# CPU fakes with the same signatures.

Decoder = Callable[[str, Sequence[bytes], Sequence["int | None"], int, tuple[int, int], Any], Any]
Encoder = Callable[[str, Any, VideoParams], tuple[list[bytes], list["int | None"]]]


class _CudaPlane:
    """One plane exposed through ``__cuda_array_interface__`` (version 3,
    no ``stream`` key: the caller synchronises), like the samples' AppCAI."""

    def __init__(self, ptr: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(int(s) for s in shape),
            "strides": tuple(int(s) for s in strides),
            "data": (int(ptr), False),
            "typestr": "|u1",
            "version": 3,
        }


class _Nv12Frame:
    """An NV12 frame in a contiguous CUDA tensor, shaped for ``Encode``:
    ``.cuda()`` returns the Y and UV planes (the samples' ``AppFrame``)."""

    def __init__(self, frame) -> None:  # frame: uint8 CUDA tensor (3h/2, w), contiguous
        rows, w = frame.shape
        h = rows * 2 // 3
        self._keep = frame
        ptr = frame.data_ptr()
        self._planes = [
            _CudaPlane(ptr, (h, w, 1), (w, 1, 1)),
            _CudaPlane(ptr + w * h, (h // 2, w // 2, 2), (w, 2, 1)),
        ]

    def cuda(self) -> list:
        return self._planes


def _packets_of(result: Any, packets: list[bytes], pts: list[int | None]) -> None:
    """Collect what ``Encode`` / ``EndEncode`` returned (list of dicts in 2.2,
    bytes before)."""
    if result is None:
        return
    if isinstance(result, (bytes, bytearray, memoryview)):
        if len(result):
            packets.append(bytes(result))
            pts.append(None)
        return
    for item in result:
        if isinstance(item, Mapping):
            data = bytes(item["data"])
            ts = item.get("timestamp")
        else:
            data, ts = bytes(item), None
        if data:
            packets.append(data)
            pts.append(None if ts is None else int(ts))


def nvenc_encode(codec: str, nv12, params: VideoParams, gpu_id: int = 0) -> tuple[list[bytes], list[int | None]]:
    """Encode an NV12 CUDA batch ``(n, 3h/2, w)`` with NVENC; packets in
    decode order with their display timestamps."""
    import torch

    nvc = import_pynvvideocodec()
    n, rows, w = nv12.shape
    h = rows * 2 // 3
    nv12 = nv12.contiguous()
    torch.cuda.current_stream(nv12.device).synchronize()  # planes are read on NVENC's own stream
    enc = nvc.CreateEncoder(w, h, "NV12", False, **nvenc_options(params, gpu_id))
    packets: list[bytes] = []
    pts: list[int | None] = []
    try:
        for i in range(n):
            _packets_of(enc.Encode(_Nv12Frame(nv12[i])), packets, pts)
        _packets_of(enc.EndEncode(), packets, pts)
    finally:
        del enc
    return packets, pts


def _set(obj: Any, name: str, value: Any) -> None:
    try:
        setattr(obj, name, value)
    except (AttributeError, TypeError):
        pass  # field absent in this version


def _decoded_to_tensor(frame: Any, device: Any):
    """A ``DecodedFrame`` (NV12) as a ``(3h/2, w)`` CUDA tensor view."""
    import torch

    try:
        return torch.from_dlpack(frame)
    except Exception:
        y, uv = frame.cuda()[:2]
        ty = torch.as_tensor(y, device=device)
        tuv = torch.as_tensor(uv, device=device)
        h, w = ty.shape[0], ty.shape[1]
        return torch.cat((ty.reshape(h, w), tuv.reshape(h // 2, w)), dim=0)


def nvdec_decode(
    codec: str,
    packets: Sequence[bytes],
    pts: Sequence[int | None],
    n: int,
    size: tuple[int, int],
    device: Any,
    gpu_id: int | None = None,
):
    """Decode an elementary stream with NVDEC into an NV12 tensor
    ``(n, 3h/2, w)`` on ``device``.  ``size`` is (width, height), the coded
    (display) size expected; ``pts`` the packets' display indices (``None``:
    unknown, then only the count is checked)."""
    import torch

    nvc = import_pynvvideocodec()
    device = torch.device(device)
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    if gpu_id is not None:
        gpu = gpu_id
    w, h = size
    out = torch.empty((n, h * 3 // 2, w), dtype=torch.uint8, device=device)
    have_pts = all(p is not None for p in pts)
    count = 0

    def take(frames) -> None:
        nonlocal count
        for f in frames:
            if count >= n:
                raise CodecError(f"{codec}: NVDEC returned more than {n} frames")
            t = _decoded_to_tensor(f, device)
            if tuple(t.shape) != (h * 3 // 2, w):
                raise CodecError(f"{codec}: NVDEC gave NV12 {tuple(t.shape)}, expected ({h * 3 // 2}, {w})")
            if have_pts:
                ts = int(getattr(f, "timestamp", count))
                if ts != count:
                    raise CodecError(f"{codec}: NVDEC frame {count} has pts {ts}")
            out[count].copy_(t)  # the decoder reuses its buffers on the next Decode
            count += 1

    # NVDEC works on the legacy default stream (cudastream=0); copy there too
    # so the next Decode cannot overwrite a frame before it is copied.
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.default_stream(device)):
        dec = nvc.CreateDecoder(
            gpuid=gpu,
            codec=getattr(nvc.cudaVideoCodec, NVDEC_CODECS[codec]),
            cudacontext=0,
            cudastream=0,
            usedevicememory=True,
        )
        try:
            for i, data in enumerate(packets):
                buf = np.frombuffer(data, dtype=np.uint8)
                pkt = nvc.PacketData()
                pkt.bsl_data = int(buf.ctypes.data)
                pkt.bsl = int(buf.size)
                pkt.pts = int(pts[i]) if pts[i] is not None else i
                _set(pkt, "decode_flag", 0)
                _set(pkt, "bDiscontinuity", False)
                take(dec.Decode(pkt))
            eos = nvc.PacketData()  # bsl = 0: end of stream, flush
            eos.bsl_data = 0
            eos.bsl = 0
            _set(eos, "pts", 0)
            _set(eos, "decode_flag", 0)
            _set(eos, "bDiscontinuity", False)
            take(dec.Decode(eos))
        finally:
            del dec
        torch.cuda.default_stream(device).synchronize()
    if count != n:
        raise CodecError(f"{codec}: NVDEC returned {count} of {n} frames")
    return out


# --- the backend --------------------------------------------------------------

ENCODE_MODES = ("nvenc", "software")
RGB_CONVERSIONS = ("auto", "swscale", "torch")


class NvCodecBackend(CodecBackend):
    """NVENC + NVDEC (``encode="nvenc"``) or software encode + NVDEC
    (``encode="software"``, the hybrid), see the module docstring.

    ``caps`` says what the GPU can do (:func:`probe_hardware`); ``device``
    is the torch device the GPU work runs on (default: the current CUDA
    device).  ``rgb`` picks the NV12 -> RGB conversion of the hybrid path:
    ``"swscale"`` (CPU, byte-identical to the software path), ``"torch"``
    (GPU, within a level or two), ``"auto"`` = swscale for numpy frames,
    torch for tensors.  ``decoder`` / ``encoder`` replace the
    PyNvVideoCodec sessions (tests).
    """

    def __init__(
        self,
        caps: HardwareCaps,
        *,
        encode: str = "nvenc",
        device: Any = None,
        rgb: str = "auto",
        decoder: Decoder | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        if encode not in ENCODE_MODES:
            raise ValueError(f"encode must be one of {ENCODE_MODES}, got {encode!r}")
        if rgb not in RGB_CONVERSIONS:
            raise ValueError(f"rgb must be one of {RGB_CONVERSIONS}, got {rgb!r}")
        self.caps = caps
        self.encode_mode = encode
        self.name = "nvenc" if encode == "nvenc" else "hybrid"
        self.rgb = rgb
        self._device = device
        self._decoder = decoder
        self._encoder = encoder

    def _decode(self, codec, packets, pts, n, size, device):
        if self._decoder is not None:
            return self._decoder(codec, packets, pts, n, size, device)
        return nvdec_decode(codec, packets, pts, n, size, device, gpu_id=self.caps.gpu_id)

    def _encode(self, codec, nv12, params):
        if self._encoder is not None:
            return self._encoder(codec, nv12, params)
        return nvenc_encode(codec, nv12, params, gpu_id=self.caps.gpu_id)

    def __getstate__(self) -> dict:
        # picklable for worker processes: the torch device goes as a string
        state = dict(self.__dict__)
        if state.get("_device") is not None:
            state["_device"] = str(state["_device"])
        return state

    # -- CodecBackend ----------------------------------------------------------

    def supports(self, codec: str) -> bool:
        if not self.caps.can_decode(codec) or codec not in NVDEC_CODECS:
            return False
        if self.encode_mode == "nvenc":
            return codec in NVENC_CODECS and self.caps.can_encode(codec)
        return True

    @property
    def device(self):
        import torch

        if self._device is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        return torch.device(self._device)

    def roundtrip(self, frames, params: VideoParams):
        is_tensor, n, h, w = _check_input(frames)
        if not self.supports(params.codec):
            raise CodecError(f"{params.codec}: not supported by the {self.name} backend on this GPU")
        try:
            if self.encode_mode == "nvenc":
                out = self._nvenc_roundtrip(frames, params, is_tensor)
            else:
                out = self._hybrid_roundtrip(frames, params, is_tensor)
        except (CodecError, ValueError):
            raise
        except Exception as e:  # PyNvVideoCodec / CUDA errors of every kind
            raise CodecError(f"{params.codec}: {self.name}: {error_text(e)}") from e
        return _like_input(out, frames, is_tensor)

    # -- the two round trips -------------------------------------------------------

    def _limits(self, codec: str) -> tuple[CodecLimits, CodecLimits | None]:
        dec = self.caps.decode[codec]
        enc = self.caps.encode.get(codec) if self.encode_mode == "nvenc" else None
        return dec, enc

    def _hybrid_roundtrip(self, frames, params: VideoParams, is_tensor: bool):
        import torch

        from . import software
        from .nv12 import crop, nv12_to_rgb, nv12_to_yuv420p, resize_rgb

        host = frames.detach().cpu().numpy() if is_tensor else frames
        dec_limits, _ = self._limits(params.codec)
        video = software.encode_to_packets(host, params, min_size=dec_limits.min_size, pad_mode="reflect")
        plan = video.plan
        if not dec_limits.fits(plan.enc_w, plan.enc_h):
            raise CodecError(f"{params.codec}: {plan.enc_w}x{plan.enc_h} exceeds NVDEC's maximum")
        device = self.device
        nv12 = self._decode(
            params.codec, video.packets, video.pts, video.n_frames, (plan.enc_w, plan.enc_h), device
        )
        conversion = self.rgb if self.rgb != "auto" else ("torch" if is_tensor else "swscale")
        if conversion == "swscale":
            yuv = nv12_to_yuv420p(nv12).cpu().numpy()
            out = software.yuv420p_to_rgb(yuv, plan, params.codec)
            return torch.from_numpy(out).to(frames.device) if is_tensor else out
        rgb = crop(nv12_to_rgb(nv12), plan.h, plan.content_w)
        if plan.resized:
            rgb = resize_rgb(rgb, plan.h, plan.w)
        return rgb

    def _nvenc_roundtrip(self, frames, params: VideoParams, is_tensor: bool):
        import torch

        from .nv12 import crop, hw_geometry, nv12_to_rgb, pad_reflect, resize_rgb, rgb_to_nv12

        device = self.device
        t = frames if is_tensor else torch.from_numpy(np.ascontiguousarray(frames))
        t = t.to(device, non_blocking=False)
        n, h, w, _ = t.shape
        dec_limits, enc_limits = self._limits(params.codec)
        assert enc_limits is not None
        min_size = (
            max(dec_limits.min_width, enc_limits.min_width),
            max(dec_limits.min_height, enc_limits.min_height),
        )
        geo = hw_geometry(h, w, params, min_size)
        for what, lim in (("NVENC", enc_limits), ("NVDEC", dec_limits)):
            if not lim.fits(geo.enc_w, geo.enc_h):
                raise CodecError(f"{params.codec}: {geo.enc_w}x{geo.enc_h} exceeds {what}'s maximum")
        rgb = resize_rgb(t, h, geo.content_w) if geo.resized else t
        rgb = pad_reflect(rgb, geo.enc_h, geo.enc_w)
        nv12 = rgb_to_nv12(rgb)
        packets, pts = self._encode(params.codec, nv12, params)
        if not packets:
            raise CodecError(f"{params.codec}: NVENC returned no bitstream")
        out12 = self._decode(params.codec, packets, pts, n, (geo.enc_w, geo.enc_h), device)
        out = crop(nv12_to_rgb(out12), h, geo.content_w)
        if geo.resized:
            out = resize_rgb(out, h, w)
        return out


def _check_input(frames) -> tuple[bool, int, int, int]:
    """(is_tensor, n, h, w) of a uint8 NHWC RGB batch; ``ValueError`` otherwise."""
    try:
        import torch

        is_tensor = isinstance(frames, torch.Tensor)
    except Exception:  # pragma: no cover
        is_tensor = False
    if not is_tensor and not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
    dtype_ok = (str(frames.dtype) == "torch.uint8") if is_tensor else frames.dtype == np.uint8
    if not dtype_ok:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {shape}")
    n, h, w, _ = shape
    if n < 1 or h < 2 or w < 2:
        raise ValueError(f"need N >= 1 frames of at least 2x2, got shape {shape}")
    return is_tensor, n, h, w


def _like_input(out, frames, is_tensor: bool):
    """``out`` (numpy or tensor) as the same kind/device as ``frames``."""
    import torch

    if is_tensor:
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out)
        return out.to(frames.device).contiguous()
    if isinstance(out, torch.Tensor):
        return np.ascontiguousarray(out.cpu().numpy())
    return np.ascontiguousarray(out)


__all__ = [
    "B_QP_OFFSET",
    "CodecLimits",
    "DEFAULT_DECODE_MIN",
    "DEFAULT_ENCODE_MIN",
    "HardwareCaps",
    "I_QP_OFFSET",
    "IsolatedError",
    "NVDEC_CODECS",
    "NVENC_CODECS",
    "NvCodecBackend",
    "PRESET_MAP",
    "import_pynvvideocodec",
    "nvdec_decode",
    "nvenc_encode",
    "nvenc_missing_note",
    "nvenc_options",
    "nvenc_preset",
    "nvenc_qp",
    "probe_hardware",
    "probe_hardware_here",
    "run_isolated",
]
