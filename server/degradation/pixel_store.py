"""The pixel store: the decoded HR images of a folder in one memory-mapped file.

Every epoch would otherwise decode the same photographs again (a PNG crop costs
~4 ms, a copy out of a mapped raw array ~0.015 ms).  The start-up scan decodes
every file once anyway; with a store it also writes the pixels out, and later
runs read crops straight from the map.  All processes map the same file, so
the pages are the page cache's: N workers do not hold N copies.

File layout (little-endian)::

    0      header   magic "VCISRPX\\0", format version (u32), flags (u32), index offset (u64),
                    index length (u64), file length (u64), blake2b-256 of the index (32 bytes)
    4096   pixels   each image's raw uint8 RGB (H x W x 3, row-major), 64-byte aligned
    ...    index    JSON: source folder name, every decodable image (name, offset, height, width,
                    source size, source blake2b) and every undecodable file (name, size, blake2b, reason)

A store is opened only when its length, magic, version and index checksum are
right and every image lies inside the pixel area; anything else is a
:class:`StoreError` (a cached store is then rebuilt, an explicit one refused).
Pixels are what :func:`server.degradation.images.decode_rgb8` returns (EXIF
rotation and mode conversion applied), so a crop from the store is the crop
from the folder, byte for byte.

Stores built automatically live in :class:`StoreCache` (``~/.cache/vcisr-degrade/stores``),
named by :func:`store_key` over the folder's files (names, sizes, blake2b): an
edited, added or removed file gives a new key, so a new store.  Building
takes a lock per key (a second process waits for the first, then opens its
store), writes a temporary file and renames it into place, so a half-written
store is never visible.  Old stores are evicted least-recently-used past the
cache's size limit; a store in use (a shared lock held by its readers) is never
evicted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


log = logging.getLogger(__name__)

MAGIC = b"VCISRPX\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ32s")
DATA_START = 4096
_ALIGN = 64
SUFFIX = ".vcstore"
#: free space a build always leaves on the store's disk
RESERVE_BYTES = 512 * 2**20
#: how long a process waits for another one building the same store before it decodes without one
WAIT_SECONDS = 1800.0
DEFAULT_MAX_GB = 64.0
#: a reader releases its mapped pages after handing out this many bytes of images (see PixelStore.image)
RELEASE_BYTES = 64 * 2**20


class StoreError(ValueError):
    """A file that is not a usable pixel store (the message says why)."""


@dataclass(frozen=True)
class StoredImage:
    """One decoded image in a store: where its pixels are and which source file they came from."""

    name: str
    offset: int
    height: int
    width: int
    size: int
    blake2b: str

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3


@dataclass(frozen=True)
class StoredSkip:
    """A source file that could not be decoded (kept so that a later start reports it without decoding)."""

    name: str
    size: int
    blake2b: str
    reason: str


def store_key(files: Iterable[tuple[str, int, str]]) -> str:
    """The cache key of a folder: blake2b-256 over its image files' (name, size, blake2b) and the format version."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{MAGIC!r}{VERSION}\n".encode())
    for name, size, digest in sorted(files):
        h.update(f"{name}\0{size}\0{digest}\n".encode())
    return h.hexdigest()


def is_store_file(path: str | Path) -> bool:
    """Whether ``path`` is a file starting with the store's magic (says nothing about its soundness)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------
class StoreWriter:
    """Writes a store to ``<final>.<pid>.tmp``; :meth:`commit` renames it into place (atomic)."""

    def __init__(self, final: str | Path, source_name: str):
        self.final = Path(final)
        self.tmp = self.final.with_name(f"{self.final.name}.{os.getpid()}.tmp")
        self.source_name = source_name
        self.images: list[StoredImage] = []
        self.skipped: list[StoredSkip] = []
        self._f = open(self.tmp, "wb")
        self._f.write(b"\0" * DATA_START)  # the header is written last: until then the file has no magic
        self._pos = DATA_START

    def add(self, name: str, size: int, blake2b: str, pixels: np.ndarray) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"{name}: a store holds uint8 HxWx3 pixels, got {pixels.dtype} {pixels.shape}")
        pad = -self._pos % _ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self._pos += pad
        self._f.write(memoryview(np.ascontiguousarray(pixels)).cast("B"))
        h, w = pixels.shape[:2]
        self.images.append(StoredImage(name, self._pos, int(h), int(w), int(size), blake2b))
        self._pos += pixels.nbytes

    def skip(self, name: str, size: int, blake2b: str, reason: str) -> None:
        self.skipped.append(StoredSkip(name, int(size), blake2b, reason))

    def commit(self) -> Path:
        """Write the index and the header, flush to disk, rename into place; returns the store's path."""
        index = json.dumps({
            "source": self.source_name, "created": time.time(),
            "images": [[i.name, i.offset, i.height, i.width, i.size, i.blake2b] for i in self.images],
            "skipped": [[s.name, s.size, s.blake2b, s.reason] for s in self.skipped],
        }, separators=(",", ":")).encode()
        index_offset = self._pos
        self._f.write(index)
        total = index_offset + len(index)
        self._f.seek(0)
        self._f.write(_HEADER.pack(MAGIC, VERSION, 0, index_offset, len(index), total,
                                   hashlib.blake2b(index, digest_size=32).digest()))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)  # atomic: readers see no store or a whole one
        return self.final

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
class PixelStore:
    """A validated store, memory-mapped read-only.  :meth:`image` returns views into the map (no copy).

    Opening holds a shared lock on the file for the reader's lifetime, so a cache never evicts a store in
    use.  The map is opened in each process that reads (workers open the store by path, never receive
    pixels)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"pixel store {self.path} does not exist") from None
        except IsADirectoryError:
            raise StoreError(f"{self.path} is a folder, not a pixel store") from None
        try:
            self._open(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # "in use": eviction skips it
        except OSError:
            pass  # someone is evicting it right now; our map stays valid regardless

    def _open(self, fd: int) -> None:
        length = os.fstat(fd).st_size
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
            raise StoreError(f"{self.path} is not a pixel store (it does not start with the store's magic); "
                             "give a folder of images or a file written by `degrade pack`")
        if len(head) < _HEADER.size or length < DATA_START:
            raise StoreError(f"pixel store {self.path} is truncated ({length} bytes)")
        magic, version, _flags, index_offset, index_len, total, digest = _HEADER.unpack(head)
        if version != VERSION:
            raise StoreError(f"pixel store {self.path} has format version {version}; this program reads "
                             f"version {VERSION} (write it again with `degrade pack`)")
        if total != length:
            raise StoreError(f"pixel store {self.path} is truncated or padded: {length} bytes, its header says {total}")
        if index_offset < DATA_START or index_offset + index_len != total:
            raise StoreError(f"pixel store {self.path} has a damaged header (index at {index_offset}+{index_len})")
        index = os.pread(fd, index_len, index_offset)
        if hashlib.blake2b(index, digest_size=32).digest() != digest:
            raise StoreError(f"pixel store {self.path} is damaged: its index checksum does not match")
        try:
            data = json.loads(index)
            self.source_name = str(data.get("source", ""))
            images = [StoredImage(str(n), int(o), int(h), int(w), int(s), str(b)) for n, o, h, w, s, b in data["images"]]
            self.skipped = [StoredSkip(str(n), int(s), str(b), str(r)) for n, s, b, r in data["skipped"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"pixel store {self.path} has an unreadable index: {exc}") from None
        for im in images:
            if im.height <= 0 or im.width <= 0 or im.offset < DATA_START or im.offset + im.nbytes > index_offset:
                raise StoreError(f"pixel store {self.path} is damaged: image {im.name} lies outside its pixel area")
        self.images = {im.name: im for im in images}
        self.nbytes = length
        self._map: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._handed = 0  # bytes of images handed out since the map's pages were last released

    def image(self, name: str) -> np.ndarray:
        """The uint8 HxWx3 pixels of ``name``: a read-only view into the map."""
        if self._array is None:
            self._map = mmap.mmap(self._fd, self.nbytes, prot=mmap.PROT_READ)
            self._array = np.frombuffer(self._map, dtype=np.uint8)
        try:
            im = self.images[name]
        except KeyError:
            raise ValueError(f"image {name} is not in the pixel store {self.path}") from None
        self._handed += im.nbytes
        if self._handed > RELEASE_BYTES and self._map is not None:
            # Unmap the pages this process touched (they stay in the page cache; the next touch maps them
            # again for ~1 us per 64 kB): its PSS does not grow with the share of the store it has read.  Safe under views
            # still in use: a shared file mapping reads the same bytes back, never zeros.
            self._map.madvise(mmap.MADV_DONTNEED)
            self._handed = im.nbytes
        return self._array[im.offset:im.offset + im.nbytes].reshape(im.height, im.width, 3)

    def key(self) -> str:
        """:func:`store_key` of the folder this store was built from."""
        return store_key([(i.name, i.size, i.blake2b) for i in self.images.values()]
                         + [(s.name, s.size, s.blake2b) for s in self.skipped])

    def close(self) -> None:
        self._array = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive elsewhere: the map goes with them
                pass
            self._map = None
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------
def default_store_dir() -> Path | None:
    """``$DEGRADE_STORE_DIR`` ('off' disables stores), else ``$XDG_CACHE_HOME/vcisr-degrade/stores``."""
    env = os.environ.get("DEGRADE_STORE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vcisr-degrade" / "stores"


def default_max_gb() -> float:
    try:
        return float(os.environ.get("DEGRADE_STORE_MAX_GB", DEFAULT_MAX_GB))
    except ValueError:
        log.warning("DEGRADE_STORE_MAX_GB=%r is not a number; using %s", os.environ["DEGRADE_STORE_MAX_GB"],
                    DEFAULT_MAX_GB)
        return DEFAULT_MAX_GB


class StoreCache:
    """A folder of stores named by :func:`store_key`, at most ``max_bytes`` in all (least recently used go first)."""

    def __init__(self, directory: str | Path, max_gb: float | None = None):
        self.dir = Path(directory)
        self.max_bytes = int((default_max_gb() if max_gb is None else max_gb) * 1e9)

    def path_for(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def find(self, key: str) -> PixelStore | None:
        """The sound store of ``key``, or None; a damaged one is removed (it is rebuilt, never read)."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            store = PixelStore(path)
        except (StoreError, OSError) as exc:
            log.warning("%s; removing it, it will be built again", exc)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # least recently used = oldest mtime
        except OSError:
            pass
        return store

    @contextmanager
    def building(self, key: str, wait_seconds: float | None = None) -> Iterator[bool]:
        """Hold the build lock of ``key``; yields False when another process held it for ``wait_seconds``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        wait = WAIT_SECONDS if wait_seconds is None else wait_seconds
        fd = os.open(self.dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            got, told, start = False, False, time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                    break
                except BlockingIOError:
                    if not told:
                        log.info("another process is building the pixel store %s; waiting for it",
                                 self.path_for(key).name)
                        told = True
                    if time.monotonic() - start >= wait:
                        log.warning("the pixel store %s was still being built after %.0f s; decoding without it",
                                    self.path_for(key).name, wait)
                        break
                    time.sleep(0.2)
            if got:  # a temporary file of ours' key left by a builder that died is stale: we hold the lock
                for stale in self.dir.glob(f"{key}{SUFFIX}.*.tmp"):
                    stale.unlink(missing_ok=True)
            yield got
        finally:
            os.close(fd)  # releases the lock

    def make_room(self, nbytes: int, keep: str | None = None) -> str | None:
        """Evict old stores so that ``nbytes`` more fit; None when they do, else why not (a warning's text)."""
        if nbytes > self.max_bytes:
            return (f"a pixel store of {nbytes / 1e9:.2f} GB would exceed the store limit of "
                    f"{self.max_bytes / 1e9:.2f} GB (--store-max-gb)")
        stores = []
        for p in self.dir.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except OSError:
                continue
            if p.stem != keep:
                stores.append((st.st_mtime, st.st_size, p))
        stores.sort()
        used = sum(s for _, s, _ in stores)
        for _, size, p in stores:  # oldest first
            if used + nbytes <= self.max_bytes:
                break
            if _evict(p):
                used -= size
        if used + nbytes > self.max_bytes:
            return (f"a pixel store of {nbytes / 1e9:.2f} GB does not fit: the stores in use already take "
                    f"{used / 1e9:.2f} GB of the {self.max_bytes / 1e9:.2f} GB limit (--store-max-gb)")
        free = shutil.disk_usage(self.dir).free
        if free < nbytes + RESERVE_BYTES:
            return (f"not enough free disk for the pixel store in {self.dir}: it needs {nbytes / 1e9:.2f} GB "
                    f"(+{RESERVE_BYTES / 2**30:.1f} GiB kept free), {free / 1e9:.2f} GB are free")
        return None


def _evict(path: Path) -> bool:
    """Remove a store nobody has open (readers hold a shared lock); True when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
        log.info("evicted the least recently used pixel store %s", path.name)
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
def add_store_arguments(parser) -> None:
    """``--store-dir``, ``--no-store`` and ``--store-max-gb``, the same on every command that reads ``--images``."""
    parser.add_argument("--store-dir", type=Path, default=None,
                        help="where the pixel stores (the decoded images of each folder, one file per folder "
                             "version, memory-mapped) are kept; default $DEGRADE_STORE_DIR, else "
                             "~/.cache/vcisr-degrade/stores. The first start on a folder writes its store while it "
                             "decodes; later starts decode nothing")
    parser.add_argument("--no-store", action="store_true",
                        help="decode the images at every use, write no pixel store (also DEGRADE_STORE_DIR=off)")
    parser.add_argument("--store-max-gb", type=float, default=None,
                        help="at most this many GB of pixel stores in --store-dir, least recently used evicted "
                             f"first (default $DEGRADE_STORE_MAX_GB, else {DEFAULT_MAX_GB:.0f}); a folder's store "
                             "takes 3 bytes per pixel (DIV2K's 800 training images: 6.6 GB)")


def store_options(args) -> dict:
    """``ImageFolder`` keywords (``store_dir``, ``store_max_gb``) from :func:`add_store_arguments`' flags."""
    if getattr(args, "no_store", False):
        return {"store_dir": None, "store_max_gb": None}
    max_gb = getattr(args, "store_max_gb", None)
    if max_gb is not None and max_gb < 0:
        raise ValueError("--store-max-gb must be 0 or more")
    return {"store_dir": getattr(args, "store_dir", None) or default_store_dir(), "store_max_gb": max_gb}
