"""The HR image folder: scanning, validation and robust decoding.

Bad input never crashes a run.  Every file is decoded once at scan time so
that truncated or corrupt files are found before any work is planned:

* grayscale, palette, RGBA/LA, CMYK and 16-bit images are converted to 8-bit
  RGB (alpha is dropped, 16-bit values are scaled by 1/257);
* unreadable, truncated and too-small files are skipped with a warning and
  counted in :attr:`ImageFolder.skipped`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .cpu_budget import budget_threads

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey band
Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs beyond ~200 MP


@dataclass(frozen=True)
class ImageInfo:
    """One usable HR image: its name relative to the folder and its size after EXIF rotation."""

    name: str
    width: int
    height: int


@dataclass(frozen=True)
class SkippedImage:
    name: str
    reason: str


def decode_rgb8(path: str | Path) -> np.ndarray:
    """Decode any supported image to a contiguous uint8 HxWx3 RGB array.

    Raises ``ValueError`` with a readable reason when the file cannot be used.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb8(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode: {exc}") from exc


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to uint8 RGB (see module doc)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
    if mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if mode in ("P", "PA") else im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


class ImageFolder:
    """A folder of HR images, sorted by relative path, each at least ``min_size`` on its short side."""

    def __init__(self, root: str | Path, min_size: int, *, scan_threads: int | None = None,
                 images: list[ImageInfo] | None = None, cache_images: int = 4):
        self.root = Path(root)
        self.min_size = int(min_size)
        self.skipped: list[SkippedImage] = []
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = max(1, cache_images)
        self._lock = threading.Lock()
        if images is not None:  # already scanned elsewhere (worker processes)
            self.images = list(images)
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.images = self._scan(scan_threads or budget_threads(8))

    # ------------------------------------------------------------------
    def _scan(self, threads: int) -> list[ImageInfo]:
        files = []
        for p in self.root.rglob("*"):  # one walk of the tree
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
            elif not p.name.startswith("."):
                log.debug("ignoring non-image file %s", p)
        files.sort(key=lambda p: p.relative_to(self.root).as_posix())

        def probe(path: Path) -> ImageInfo | SkippedImage:
            name = path.relative_to(self.root).as_posix()
            try:
                arr = decode_rgb8(path)
            except ValueError as exc:
                return SkippedImage(name, str(exc))
            h, w = arr.shape[:2]
            if min(h, w) < self.min_size:
                return SkippedImage(name, f"too small: {w}x{h}, the short side must be >= {self.min_size}")
            return ImageInfo(name, w, h)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(pool.map(probe, files))
        images = []
        for r in results:
            if isinstance(r, SkippedImage):
                self.skipped.append(r)
                log.warning("skipping image %s: %s", r.name, r.reason)
            else:
                images.append(r)
        if not images:
            raise ValueError(
                f"no usable images in {self.root}: {len(files)} image file(s) found, "
                f"{len(self.skipped)} skipped (each needs a short side >= {self.min_size})"
            )
        return images

    # ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def load(self, name: str) -> np.ndarray:
        """The decoded uint8 RGB image (a small LRU cache: an epoch reads images in order)."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        arr = decode_rgb8(self.root / name)
        with self._lock:
            self._cache[name] = arr
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return arr
