"""The dataset fingerprint: names, sizes and content hashes of the usable HR images.

A client that cuts HR patches from its own copy of the dataset must cut them
from the very pictures the server degraded, or its targets are silently
wrong.  The server hashes every usable image once at start-up (blake2b-256 of
the file's bytes) and publishes the list and one hash over it in GetInfo
(every PairChunk carries that hash too); the client hashes its copy the same
way and compares before the first batch.

Hashing is cheap (blake2b runs at about 1 GB/s per core and releases the GIL,
so a few threads hash a DIV2K-sized set in seconds) and is done once per file
version: digests are cached per (absolute path, size, mtime) in a JSON file
(``$DEGRADE_HASH_CACHE``, default ``~/.cache/vcisr-degrade/file-hashes.json``;
``off`` disables it).  A file modified within the last few seconds is never
cached: its mtime could still be shared with a later write of the same size
(the "racy timestamp" problem), so it is hashed again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .cpu_budget import budget_threads

log = logging.getLogger(__name__)

#: Files modified less than this long ago are hashed but not cached (see module doc).
RACY_SECONDS = 3.0
_READ = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """One image of a dataset: its name relative to the folder, size, blake2b-256 (hex) and pixel size."""

    name: str
    size: int
    blake2b: str
    width: int = 0
    height: int = 0


def default_cache_path() -> Path | None:
    env = os.environ.get("DEGRADE_HASH_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "vcisr-degrade" / "file-hashes.json"


class DigestCache:
    """blake2b digests per (absolute path, size, mtime_ns), kept in a JSON file (best effort)."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._entries: dict[str, list] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if path is not None:
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("files"), dict):
                    self._entries = data["files"]
            except (OSError, ValueError):
                pass

    def get(self, key: str, size: int, mtime_ns: int) -> str | None:
        with self._lock:
            e = self._entries.get(key)
        if isinstance(e, list) and len(e) == 3 and e[0] == size and e[1] == mtime_ns:
            return e[2]
        return None

    def put(self, key: str, size: int, mtime_ns: int, digest: str) -> None:
        if time.time_ns() - mtime_ns < RACY_SECONDS * 1e9:
            return  # racy: a write within the same timestamp tick could go unnoticed
        with self._lock:
            self._entries[key] = [size, mtime_ns, digest]
            self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with self._lock:
                # files that are gone (a deleted test folder, a moved dataset) leave the cache
                self._entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
                tmp.write_text(json.dumps({"version": 1, "files": self._entries}))
                self._dirty = False
            os.replace(tmp, self.path)  # atomic: concurrent writers never leave a torn file
        except OSError as exc:
            log.debug("cannot write the hash cache %s: %s", self.path, exc)


def hash_file(path: str | Path, cache: DigestCache | None = None) -> tuple[int, str]:
    """(size, blake2b-256 hex) of a file's bytes, from the cache when its size and mtime are unchanged."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    if cache is not None:
        hit = cache.get(key, st.st_size, st.st_mtime_ns)
        if hit is not None:
            return st.st_size, hit
    h = hashlib.blake2b(digest_size=32)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
            size += len(chunk)
    digest = h.hexdigest()
    if cache is not None and size == st.st_size:
        cache.put(key, st.st_size, st.st_mtime_ns, digest)
    return size, digest


def dataset_digests(root: str | Path, images: Iterable, *, cache_path: Path | None | str = "default",
                    threads: int | None = None) -> list[FileDigest]:
    """The fingerprint entries of ``images`` (``ImageInfo``s: name, width, height) under ``root``, in name order."""
    root = Path(root)
    infos = sorted(images, key=lambda i: i.name)
    cache = DigestCache(default_cache_path() if cache_path == "default" else cache_path)  # type: ignore[arg-type]

    def one(info) -> FileDigest:
        size, digest = hash_file(root / info.name, cache)
        return FileDigest(info.name, size, digest, int(info.width), int(info.height))

    with ThreadPoolExecutor(max_workers=max(1, threads or budget_threads(8))) as pool:
        out = list(pool.map(one, infos))
    cache.save()
    return out


def fingerprint(files: Sequence[FileDigest]) -> str:
    """One blake2b-256 (hex) over the entries' names, sizes and hashes, in name order."""
    h = hashlib.blake2b(digest_size=32)
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name}\0{f.size}\0{f.blake2b}\n".encode())
    return h.hexdigest()


class DatasetMismatch(ValueError):
    """A local copy of the dataset differs from the server's; the message names the files."""

    def __init__(self, message: str, files: list[str]):
        super().__init__(message)
        self.files = files


def store_digests(store) -> list[FileDigest]:
    """The fingerprint entries of every image in a pixel store (:class:`~.pixel_store.PixelStore`): its index
    keeps each source file's name, size and blake2b, so a store's fingerprint equals its folder's."""
    return [FileDigest(i.name, i.size, i.blake2b, i.width, i.height) for i in store.images.values()]


def verify_copy(root: str | Path, expected: Sequence[FileDigest], *, cache_path: Path | None | str = "default",
                threads: int | None = None, what: str = "the server's dataset") -> None:
    """Check that ``root`` holds every file of ``expected`` with the same size and content.

    Raises :class:`DatasetMismatch` naming each missing or different file (extra local files are fine).
    ``root`` may be a pixel store file (``degrade pack``): its index holds each source file's size and hash."""
    root = Path(root)
    stored: dict[str, FileDigest] | None = None
    if root.is_file():
        from .pixel_store import PixelStore, StoreError

        try:
            store = PixelStore(root)
        except StoreError as exc:
            raise DatasetMismatch(str(exc), []) from None
        stored = {d.name: d for d in store_digests(store)}
        store.close()
    elif not root.is_dir():
        raise DatasetMismatch(f"the local dataset copy {root} does not exist or is not a folder or pixel store", [])
    cache = DigestCache(default_cache_path() if cache_path == "default" else cache_path)  # type: ignore[arg-type]

    def local(f: FileDigest) -> tuple[int, str] | None:
        """(size, blake2b) of the local copy of ``f`` (the digest only when the size matches), None if missing."""
        if stored is not None:
            got = stored.get(f.name)
            return None if got is None else (got.size, got.blake2b)
        path = root / f.name
        if not path.is_file():
            return None
        size = path.stat().st_size
        return (size, hash_file(path, cache)[1] if size == f.size else "")

    def check(f: FileDigest) -> str | None:
        try:
            got = local(f)
        except OSError as exc:
            return f"{f.name}: unreadable ({exc.strerror or exc})"
        if got is None:
            return f"{f.name}: missing (the server's is {f.size} bytes)"
        size, digest = got
        if size != f.size:
            return f"{f.name}: {size} bytes here, {f.size} bytes on the server"
        if digest != f.blake2b:
            return f"{f.name}: different content (blake2b {digest[:16]}... here, {f.blake2b[:16]}... on the server)"
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads or budget_threads(8))) as pool:
        problems = [p for p in pool.map(check, expected) if p is not None]
    cache.save()
    if problems:
        names = [p.split(": ", 1)[0] for p in problems]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetMismatch(
            f"the local dataset copy {root} does not match {what} ({len(problems)} of {len(expected)} files "
            f"differ): {shown}. Copy the server's images again (same names and bytes), or do not cut HR "
            "locally (--wire lr-hr)", names)
