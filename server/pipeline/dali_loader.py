"""HR patch loading with NVIDIA DALI (optional extra ``vcisr-degrade[dali]``).

:class:`DaliPatchLoader` returns exactly what :func:`server.degradation.engine.crop_patches`
returns for the same :class:`~server.degradation.epoch_plan.PatchRef` tuple (same epoch
plan, same bytes), but decodes the HR photographs with DALI: on the GPU
(``device="gpu"``, DALI's ``mixed`` nvJPEG / nvImageCodec backend) or on the
CPU (``device="cpu"``, DALI's libjpeg-turbo / libpng backend, which runs
without any GPU or NVIDIA driver).

How a call works: the files named by the refs are read as encoded bytes and fed
to an ``external_source``; each distinct image is decoded once per call by
``fn.decoders.image(output_type=RGB)``; the patches are then cut from the
decoded images by plain slicing (numpy on the CPU, torch on the GPU), which is
exact - there is no resampling, so the crop itself can never differ from
``img[y:y+P, x:x+P]``.

Which files DALI decodes, and which fall back to the CPU path
---------------------------------------------------------------
:mod:`server.degradation.images` converts grayscale, palette, RGBA/LA, CMYK, 16-bit and
EXIF-rotated images to 8-bit RGB with PIL in a specific way (alpha dropped,
16-bit scaled by 1/257, ...).  DALI's decoder may convert those differently, so
only files whose decoded pixels are the plain stored 8-bit RGB samples go to
DALI:

* JPEG whose PIL mode is ``RGB`` (3-component YCbCr or RGB JPEG), and
* PNG with bit depth 8 and colour type 2 (truecolour, no alpha, no ``tRNS``,
  single frame),

both with no EXIF orientation other than 1.  Everything else (gray, palette,
alpha, 16-bit, CMYK, rotated, BMP / TIFF / WebP / PPM, multi-frame) is decoded
by :meth:`ImageFolder.load` (``server.degradation.images.decode_rgb8``) exactly as the CPU
loader does; on the GPU those images are then uploaded with one host-to-device
copy each.  The check reads only the file header (PIL lazy open) and is cached
per image name.

Exactness
---------
* ``device="cpu"``: DALI's CPU decoder uses libjpeg-turbo (accurate integer
  IDCT, fancy upsampling) and libpng, like Pillow's wheels, so PNG and JPEG
  crops are byte-identical to :func:`crop_patches` (checked by
  ``tests/test_dali_loader.py``).
* ``device="gpu"``: PNG is exact.  JPEG goes through nvJPEG (hardware decoder
  on A100/H100 for part of the batch, CUDA IDCT otherwise), whose IDCT and
  rounding differ from libjpeg-turbo: pixels differ by a few levels (the GPU
  test allows mean |diff| <= 1 and max |diff| <= 16).  ``jpeg_fancy_upsampling``
  is on so the chroma upsampling matches libjpeg-turbo.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from server.degradation.cpu_budget import budget_threads
from server.degradation.epoch_plan import PatchRef
from server.degradation.images import ImageFolder

if TYPE_CHECKING:  # pragma: no cover
    import torch

INSTALL_HINT = (
    "NVIDIA DALI is not installed; install the optional extra with "
    "`pip install 'vcisr-degrade[dali]'` (= `pip install nvidia-dali-cuda130`, "
    "CUDA 13 wheels for Linux x86_64 / aarch64)"
)

_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DaliUnavailableError(ImportError):
    """NVIDIA DALI cannot be imported (not installed, or a broken install)."""


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (does not import it if it is absent)."""
    try:
        _import_dali()
    except DaliUnavailableError:
        return False
    return True


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as exc:
        raise DaliUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    return dali, fn, types


def dali_decodable(path: str | Path) -> bool:
    """True when DALI's RGB decode of ``path`` equals ``decode_rgb8`` (see module doc).

    Reads only the header; a file PIL cannot open returns False (the CPU path
    then raises its usual readable error).
    """
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            if getattr(im, "n_frames", 1) != 1:
                return False
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return False
            if fmt == "JPEG":
                return mode == "RGB"
            if fmt == "PNG":
                if mode != "RGB" or "transparency" in im.info:
                    return False
                return _png_depth_and_colour_type(path) == (8, 2)
            return False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _png_depth_and_colour_type(path: str | Path) -> tuple[int, int] | None:
    # Pillow reports 16-bit truecolour PNGs as mode "RGB" too, so read the IHDR.
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    bit_depth, colour_type = struct.unpack(">BB", head[24:26])
    return bit_depth, colour_type


class DaliPatchLoader:
    """Decode and crop HR patches with NVIDIA DALI; same results as ``crop_patches``.

    ``device``: ``"gpu"`` (nvJPEG / nvImageCodec, ``mixed`` backend, needs CUDA)
    or ``"cpu"`` (DALI's CPU decoders; no GPU needed).  ``max_batch`` bounds how
    many distinct images one DALI run decodes (more are split into several runs).
    """

    def __init__(self, folder: ImageFolder, patch_size: int, device: str = "gpu", device_id: int = 0,
                 threads: int | None = None, max_batch: int = 16):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', not {device!r}")
        if patch_size <= 0 or max_batch <= 0:
            raise ValueError("patch_size and max_batch must be positive")
        self._dali, self._fn, self._types = _import_dali()
        self.folder = folder
        self.patch_size = int(patch_size)
        self.device = device
        self.device_id = int(device_id)
        self.threads = max(1, threads or budget_threads(4))
        self.max_batch = int(max_batch)
        self._decodable: dict[str, bool] = {}
        self._torch_device = None
        self._pending = None  # CUDA event: copies out of DALI's buffers still in flight
        if device == "gpu":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("DaliPatchLoader(device='gpu') needs a CUDA GPU; use device='cpu'")
            self._torch_device = torch.device("cuda", self.device_id)
        self._pipe = self._build()

    # ------------------------------------------------------------------
    def _build(self):
        fn, types = self._fn, self._types
        gpu = self.device == "gpu"
        pipe = self._dali.Pipeline(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=self.device_id if gpu else None,  # None: a CPU-only pipeline, no CUDA context
            prefetch_queue_depth=1,
            exec_dynamic=True,  # variable batch sizes, outputs valid while referenced
        )
        kw: dict[str, Any] = {"output_type": types.RGB, "adjust_orientation": False}
        if gpu:
            kw["jpeg_fancy_upsampling"] = True
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
            pipe.set_outputs(fn.decoders.image(encoded, device="mixed" if gpu else "cpu", **kw))
        pipe.build()
        return pipe

    def close(self) -> None:
        """Release the DALI pipeline (and its GPU memory)."""
        self._pipe = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def uses_dali(self, name: str) -> bool:
        """Whether image ``name`` is decoded by DALI (else by the CPU fallback), cached."""
        ok = self._decodable.get(name)
        if ok is None:
            ok = self._decodable[name] = dali_decodable(self.folder.root / name)
        return ok

    # ------------------------------------------------------------------
    def _check(self, ref: PatchRef, shape) -> None:
        size = self.patch_size
        if shape[0] < ref.y + size or shape[1] < ref.x + size:
            raise ValueError(f"image {ref.image} changed size after the scan ({shape[1]}x{shape[0]})")

    def _load_cpu(self, name: str) -> np.ndarray:
        try:
            return self.folder.load(name)
        except ValueError as exc:
            raise ValueError(f"image {name} became unreadable after the scan: {exc}") from exc

    def _groups(self, refs: tuple[PatchRef, ...]) -> tuple[dict[str, list[int]], list[str], list[str]]:
        where: dict[str, list[int]] = {}
        for i, ref in enumerate(refs):
            where.setdefault(ref.image, []).append(i)
        dali_names = [n for n in where if self.uses_dali(n)]
        cpu_names = [n for n in where if not self.uses_dali(n)]
        return where, dali_names, cpu_names

    def _run(self, names: list[str]):
        """Decode ``names`` with DALI; returns the output TensorList, or None on a decode error."""
        if self._pipe is None:
            raise RuntimeError("the DaliPatchLoader was closed")
        encoded = []
        for name in names:
            try:
                encoded.append(np.fromfile(self.folder.root / name, dtype=np.uint8))
            except OSError as exc:
                raise ValueError(f"image {name} became unreadable after the scan: {exc}") from exc
        if self._pending is not None:  # DALI may reuse the buffers we were copying from
            self._pending.synchronize()
            self._pending = None
        self._pipe.feed_input("encoded", encoded)
        try:
            (out,) = self._pipe.run()
        except RuntimeError:
            # a file changed or got corrupt after the scan: rebuild (the pipeline may be
            # unusable after an error) and let the CPU path give the readable error
            self._pipe = self._build()
            return None
        return out

    def _chunks(self, names: list[str]):
        for s in range(0, len(names), self.max_batch):
            yield names[s:s + self.max_batch]

    # ------------------------------------------------------------------
    def crop(self, refs: tuple[PatchRef, ...]) -> np.ndarray:
        """The HR crops of ``refs`` as uint8 (n, P, P, 3), exactly like ``crop_patches``."""
        if self.device == "gpu":
            return np.ascontiguousarray(self.crop_tensor(refs).cpu().numpy())
        size = self.patch_size
        out = np.empty((len(refs), size, size, 3), dtype=np.uint8)
        where, dali_names, cpu_names = self._groups(refs)

        def cut(name: str, img: np.ndarray) -> None:
            for i in where[name]:
                ref = refs[i]
                self._check(ref, img.shape)
                out[i] = img[ref.y:ref.y + size, ref.x:ref.x + size]

        for chunk in self._chunks(dali_names):
            dec = self._run(chunk)
            for k, name in enumerate(chunk):
                cut(name, np.asarray(dec.at(k)) if dec is not None else self._load_cpu(name))
            del dec
        for name in cpu_names:
            cut(name, self._load_cpu(name))
        return out

    def crop_tensor(self, refs: tuple[PatchRef, ...]) -> "torch.Tensor":
        """The crops of ``refs`` as a CUDA uint8 (n, P, P, 3) tensor (``device="gpu"`` only).

        DALI-decoded images never leave the GPU: each decoded image is copied
        device-to-device into a torch tensor with ``feed_ndarray`` (on torch's
        current stream) and the patches are sliced from it.  Fallback images
        (see module doc) are decoded on the CPU and uploaded.
        """
        if self.device != "gpu":
            raise RuntimeError("crop_tensor needs device='gpu'; use crop() on the CPU")
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dev = self._torch_device
        size = self.patch_size
        out = torch.empty((len(refs), size, size, 3), dtype=torch.uint8, device=dev)
        where, dali_names, cpu_names = self._groups(refs)

        def cut(name: str, img: torch.Tensor) -> None:
            for i in where[name]:
                ref = refs[i]
                self._check(ref, tuple(img.shape))
                out[i] = img[ref.y:ref.y + size, ref.x:ref.x + size]

        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev)
            for chunk in self._chunks(dali_names):
                dec = self._run(chunk)
                for k, name in enumerate(chunk):
                    if dec is None:
                        img = torch.from_numpy(self._load_cpu(name)).to(dev)
                    else:
                        t = dec[k]
                        img = torch.empty(t.shape(), dtype=torch.uint8, device=dev)
                        feed_ndarray(t, img, cuda_stream=stream)
                    cut(name, img)
                if dec is not None:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    self._pending = ev
                del dec
            for name in cpu_names:
                cut(name, torch.from_numpy(self._load_cpu(name)).to(dev))
        return out
