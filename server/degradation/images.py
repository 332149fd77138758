"""The HR image folder: scanning, validation and robust decoding.

Bad input never crashes a run.  Every file is decoded once at scan time so
that truncated or corrupt files are found before any work is planned:

* grayscale, palette, RGBA/LA, CMYK and 16-bit images are converted to 8-bit
  RGB (alpha is dropped, 16-bit values are scaled by 1/257);
* unreadable, truncated and too-small files are skipped with a warning and
  counted in :attr:`ImageFolder.skipped`.

With a pixel store (:mod:`server.degradation.pixel_store`) the scan's decoded
pixels are written out once and later runs crop from a memory map instead of
decoding; :meth:`ImageFolder.load` is the one place that chooses.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, ImageOps
from tqdm import tqdm

from .fingerprint import DigestCache, FileDigest, dataset_digests, default_cache_path, hash_file, store_digests
from .pixel_store import DATA_START, RESERVE_BYTES, PixelStore, StoreCache, StoreError, StoreWriter, store_key

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


def decode_rgb8(path: str | Path | bytes) -> np.ndarray:
    """Decode any supported image (a file, or a file's bytes) to a contiguous uint8 HxWx3 RGB array.

    Raises ``ValueError`` with a readable reason when the file cannot be used.
    """
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
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
    """A folder of HR images, sorted by relative path, each at least ``min_size`` on its short side.

    ``root`` may also be a pixel store file (``degrade pack``): its images are read from the map, nothing is
    decoded.  With ``store_dir`` the scan finds the folder's store there (by :func:`~.pixel_store.store_key`
    over the files' hashes) or writes one while it decodes; ``store`` (worker processes) opens a known store.
    """

    def __init__(self, root: str | Path, min_size: int, *, scan_threads: int | None = None,
                 images: list[ImageInfo] | None = None, cache_images: int = 4, store: str | Path | None = None,
                 store_dir: str | Path | None = None, store_max_gb: float | None = None, progress: bool = False):
        self.root = Path(root)
        self.min_size = int(min_size)
        self.skipped: list[SkippedImage] = []
        self.store: PixelStore | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = max(1, cache_images)
        self._lock = threading.Lock()
        if store is None and self.root.is_file():
            store = self.root  # an explicit store file
        if images is not None:  # already scanned elsewhere (worker processes)
            self.images = list(images)
            if store is not None:
                self.store = PixelStore(store)
            return
        if store is not None:
            self.images = self._use_store(PixelStore(store))
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        threads = scan_threads or budget_threads(8)
        files = image_files(self.root)
        if store_dir is not None:
            self.images = self._scan_with_store(files, StoreCache(store_dir, store_max_gb), threads, progress)
        else:
            self.images = self._accept(_names(self.root, files), _decode_files(self.root, files, threads, progress))

    @property
    def store_path(self) -> str | None:
        """The pixel store the images are read from (worker processes open it by this path), or None."""
        return None if self.store is None else str(self.store.path)

    @property
    def dataset_name(self) -> str:
        """The image folder's name (a store file's: the folder it was packed from)."""
        if self.store is not None and self.root.is_file():
            return self.store.source_name or self.root.stem
        return self.root.name

    def dataset_files(self, threads: int | None = None) -> list[FileDigest]:
        """The dataset fingerprint's entries of the usable images (from the store's index when there is one;
        else hashed by ``threads`` threads, default sized by the CPU budget)."""
        if self.store is not None:
            usable = {i.name for i in self.images}
            return sorted((d for d in store_digests(self.store) if d.name in usable), key=lambda d: d.name)
        return dataset_digests(self.root, self.images, threads=threads)

    def _accept(self, names: list[str], results: list[ImageInfo | str]) -> list[ImageInfo]:
        """The usable images of a scan (``results`` of the files ``names``); the others go to :attr:`skipped`
        with a warning each."""
        images = []
        for name, r in zip(names, results):
            if isinstance(r, ImageInfo) and min(r.width, r.height) >= self.min_size:
                images.append(r)
                continue
            reason = r if isinstance(r, str) else (f"too small: {r.width}x{r.height}, the short side must be "
                                                   f">= {self.min_size}")
            self.skipped.append(SkippedImage(name, reason))
            log.warning("skipping image %s: %s", name, reason)
        if not images:
            raise ValueError(
                f"no usable images in {self.root}: {len(names)} image file(s) found, "
                f"{len(self.skipped)} skipped (each needs a short side >= {self.min_size})"
            )
        return images

    def _use_store(self, store: PixelStore) -> list[ImageInfo]:
        """Read from ``store`` from now on; the usable images and the skipped ones come from its index."""
        self.store = store
        entries = sorted([(n, ImageInfo(n, i.width, i.height)) for n, i in store.images.items()]
                         + [(s.name, s.reason) for s in store.skipped])
        return self._accept([n for n, _ in entries], [r for _, r in entries])

    def _scan_with_store(self, files: list[Path], cache: StoreCache, threads: int,
                         progress: bool) -> list[ImageInfo]:
        """Open the folder's store (no decoding at all), or decode once and write the store meanwhile."""
        names = _names(self.root, files)
        digest_cache = DigestCache(default_cache_path())
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            hashed = list(pool.map(lambda p: hash_file(p, digest_cache), files))
        digest_cache.save()
        key = store_key((n, size, digest) for n, (size, digest) in zip(names, hashed))
        found = cache.find(key)
        if found is not None:
            log.info("pixel store %s: %d images, nothing to decode", found.path, len(found.images))
            return self._use_store(found)
        with cache.building(key) as locked:
            found = cache.find(key) if locked else None  # built by the process we waited for
            if found is not None:
                log.info("pixel store %s built by another process: %d images", found.path, len(found.images))
                return self._use_store(found)
            problem = cache.make_room(_estimated_bytes(files)) if locked else "another process is building it"
            if problem is not None:
                log.warning("%s; decoding without a pixel store", problem)
                return self._accept(names, _decode_files(self.root, files, threads, progress))
            results, store, problem = write_store(self.root, files, cache.path_for(key), threads, progress, key)
        if store is None:
            log.warning("%s; decoding without a pixel store", problem)
            return self._accept(names, results)
        log.info("pixel store %s written: %d images, %.2f GB", store.path, len(store.images), store.nbytes / 1e9)
        return self._use_store(store)

    # ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def load(self, name: str) -> np.ndarray:
        """The decoded uint8 RGB image: a view into the pixel store, or decoded (a small LRU cache: an epoch
        reads images in order)."""
        if self.store is not None:
            return self.store.image(name)
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


def _estimated_bytes(files: list[Path]) -> int:
    """The pixel store's size for ``files``, from their headers (no decoding): 3 bytes per pixel."""
    total = DATA_START
    for path in files:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
        total += w * h * 3 + 64
    return total


def image_files(root: Path) -> list[Path]:
    """The image files under ``root`` (recursively), sorted by relative path."""
    files = []
    for p in root.rglob("*"):  # one walk of the tree
        if not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
        elif not p.name.startswith("."):
            log.debug("ignoring non-image file %s", p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _names(root: Path, files: list[Path]) -> list[str]:
    return [p.relative_to(root).as_posix() for p in files]


def _decode_files(root: Path, files: list[Path], threads: int, progress: bool,
                  keep: Callable[[str, int, str, np.ndarray | str], None] | None = None) -> list[ImageInfo | str]:
    """Decode every file (``threads`` at a time, a progress bar with ``progress``): per file its
    ``ImageInfo`` (size before the ``min_size`` check) or the reason it cannot be used.  With ``keep``,
    each file is read once, hashed and decoded from those bytes, and ``keep(name, size, blake2b,
    pixels or reason)`` is called in file order (a window of decoded images, so memory stays bounded)."""

    def one(path: Path):
        name = path.relative_to(root).as_posix()
        try:
            if keep is None:
                arr = decode_rgb8(path)
                return ImageInfo(name, arr.shape[1], arr.shape[0]), None
            data = path.read_bytes()
            digest = hashlib.blake2b(data, digest_size=32).hexdigest()
            try:
                arr = decode_rgb8(data)
            except ValueError as exc:
                return str(exc), (name, len(data), digest, str(exc))
            return ImageInfo(name, arr.shape[1], arr.shape[0]), (name, len(data), digest, arr)
        except (ValueError, OSError) as exc:
            return str(exc if isinstance(exc, ValueError) else f"cannot read: {exc}"), None

    bar = tqdm(total=len(files), desc="building the pixel store" if keep else "checking images", unit="image",
               disable=not progress, dynamic_ncols=True)
    out: list[ImageInfo | str] = []
    window = 2 * max(1, threads)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        pending: deque = deque()
        todo = iter(files)
        for path in todo:
            pending.append(pool.submit(one, path))
            if len(pending) >= window:
                break
        while pending:
            info, kept = pending.popleft().result()
            for path in todo:
                pending.append(pool.submit(one, path))
                break
            if keep is not None and kept is not None:
                keep(*kept)
            out.append(info)
            bar.update(1)
    bar.close()
    return out


def write_store(root: Path, files: list[Path], final: Path, threads: int, progress: bool,
                key: str | None = None) -> tuple[list[ImageInfo | str], PixelStore | None, str | None]:
    """Decode ``files`` once, writing the pixel store ``final`` meanwhile (a temporary file renamed at the end).

    Returns the scan results, the opened store and None; or, when the store could not be written (a write
    failed, or a file changed so that the store's key is no longer ``key``), the results, None and why."""
    writer = StoreWriter(final, root.name)
    failed: list[str] = []

    def keep(name: str, size: int, digest: str, pixels: np.ndarray | str) -> None:
        if failed:
            return
        try:
            if isinstance(pixels, str):
                writer.skip(name, size, digest, pixels)
            else:
                writer.add(name, size, digest, pixels)
        except OSError as exc:  # e.g. the disk filled up under us: the scan goes on without a store
            failed.append(f"cannot write the pixel store {writer.tmp} ({exc})")
            writer.abort()

    results = _decode_files(root, files, threads, progress, keep=keep)
    if failed:
        return results, None, failed[0]
    built = store_key([(i.name, i.size, i.blake2b) for i in writer.images]
                      + [(s.name, s.size, s.blake2b) for s in writer.skipped])
    if (key is not None and built != key) or len(writer.images) + len(writer.skipped) != len(files):
        writer.abort()
        return results, None, f"files of {root} changed or became unreadable while the pixel store was written"
    try:
        return results, PixelStore(writer.commit()), None
    except OSError as exc:
        writer.abort()
        return results, None, f"cannot write the pixel store {writer.tmp} ({exc})"


def pack_folder(root: str | Path, out: str | Path, *, threads: int | None = None,
                progress: bool = False) -> tuple[PixelStore, list[SkippedImage]]:
    """``degrade pack``: write the pixel store of the folder ``root`` to the file ``out``.

    Every decodable image goes in (the patch size is chosen when the store is used); returns the store and
    the files that could not be decoded.  Raises ``StoreError`` when there is no room or a write fails."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    files = image_files(root)
    if not files:
        raise ValueError(f"no image files in {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = _estimated_bytes(files), shutil.disk_usage(out.parent).free
    if need + RESERVE_BYTES > free:
        raise StoreError(f"not enough free disk for {out}: the store needs {need / 1e9:.2f} GB "
                         f"(+{RESERVE_BYTES / 2**30:.1f} GiB kept free), {free / 1e9:.2f} GB are free")
    results, store, problem = write_store(root, files, out, threads or budget_threads(8), progress)
    if store is None:
        raise StoreError(problem)
    skipped = [SkippedImage(n, r) for n, r in zip(_names(root, files), results) if isinstance(r, str)]
    return store, skipped
