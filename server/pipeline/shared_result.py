"""A made batch carried from a worker process to its consumer through a shared-memory file, not a pipe.

The whole-batch pipeline's workers return their :class:`BatchResult` through
``concurrent.futures``' result pipe.  Pickled, a 128-patch batch with HR and the
sharpened HR is ~100 MB, and the consumer's process - the server's main
process, which also sends - reads it from the pipe and unpickles it: about
three copies of every byte there.  Instead the worker writes the arrays into
one file in ``/dev/shm`` (one ``pwrite`` per array: the kernel's copy) and only
their layout is pickled; unpickling maps the file (private, copy on write),
unlinks it and makes the arrays views of that mapping, so the consumer's
process copies nothing.  The mapping lives as long as the arrays do, and the
arrays are writable (copy on write), as unpickled ones were.

A file whose batch never arrives (its worker killed after writing it, the
consumer killed before reading it) is registered with multiprocessing's
resource tracker, which removes it when the process tree ends.  Where
``/dev/shm`` is full or missing the batch travels through the pipe as before.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import mmap
import os
import secrets
import time
from multiprocessing import resource_tracker

import numpy as np

from server.degradation.engine import BatchResult

log = logging.getLogger(__name__)

#: where the files are made (a tmpfs on Linux)
SHM_DIR = "/dev/shm"
#: the BatchResult fields that travel in the file
ARRAY_FIELDS = ("lr", "hr", "hr_usm", "precodec")

_counter = itertools.count()
_warned = False
_swept = False
#: a batch file lives from its worker's write to the consumer's mapping (well under a second); one this old
#: whose worker is gone was never received
ORPHAN_SECONDS = 600.0


class SharedBatch:
    """A BatchResult whose arrays are in a shared-memory file; unpickles as the BatchResult (see module doc)."""

    def __init__(self, rest: BatchResult, name: str, layout: list[tuple[str, str, tuple[int, ...], int]]):
        self.rest, self.name, self.layout = rest, name, layout

    def __reduce__(self):
        return _rebuild, (self.rest, self.name, self.layout)

    def load(self) -> BatchResult:
        """The BatchResult, in this process (what unpickling does in the consumer's)."""
        return _rebuild(self.rest, self.name, self.layout)


def share(result: BatchResult) -> SharedBatch | BatchResult:
    """In a worker: write ``result``'s arrays into a new shared-memory file.  Returns what to send back
    (the result itself where the file cannot be made)."""
    global _warned, _swept
    if not _swept:
        _swept = True
        sweep_orphans()
    arrays = [(f, np.ascontiguousarray(a)) for f in ARRAY_FIELDS if (a := getattr(result, f)) is not None]
    name = f"degrade-batch-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
    try:
        layout = _write(name, arrays)
    except OSError as exc:
        if not _warned:
            _warned = True
            log.warning("cannot write a batch into %s (%s); batches go through the pipe instead", SHM_DIR, exc)
        return result
    return SharedBatch(dataclasses.replace(result, **{f: None for f, _ in arrays}), name, layout)


def sweep_orphans(older_than: float = ORPHAN_SECONDS) -> list[str]:
    """Remove batch files left by a process tree killed as a whole (the resource tracker with it): older
    than ``older_than`` seconds and made by a process that no longer exists.  Returns their names."""
    removed = []
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith("degrade-batch-")]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        try:
            pid = int(name.split("-")[2])
            if now - os.stat(os.path.join(SHM_DIR, name)).st_mtime < older_than:
                continue
            os.kill(pid, 0)  # still there: not ours to judge
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
        except (ValueError, IndexError, OSError):  # not a name of ours, gone already, or not allowed to ask
            continue
    if removed:
        log.warning("removed %d orphaned batch file(s) from %s", len(removed), SHM_DIR)
    return removed


def _write(name: str, arrays: list[tuple[str, np.ndarray]]) -> list[tuple[str, str, tuple[int, ...], int]]:
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    resource_tracker.register("/" + name, "shared_memory")  # removed at the end of the process tree if orphaned
    try:
        layout, offset = [], 0
        for field, arr in arrays:
            data = memoryview(arr).cast("B")
            done = 0
            while done < len(data):  # a tmpfs writes it all at once; a short write just goes on
                done += os.pwrite(fd, data[done:], offset + done)
            layout.append((field, str(arr.dtype), tuple(arr.shape), offset))
            offset += arr.nbytes
        return layout
    except BaseException:
        _remove(path, name)
        raise
    finally:
        os.close(fd)


def _remove(path: str, name: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    resource_tracker.unregister("/" + name, "shared_memory")


def _rebuild(rest: BatchResult, name: str, layout: list[tuple[str, str, tuple[int, ...], int]]) -> BatchResult:
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        # private and writable: pages are the file's until written (copy on write).  No MAP_POPULATE: on a
        # writable private mapping it copies every page at once (about 0.6 ms of kernel time per MB)
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else b""
    finally:
        os.close(fd)
        _remove(path, name)  # the mapping stays valid: the memory goes when the arrays do
    arrays = {field: np.frombuffer(mapped, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
              for field, dtype, shape, offset in layout}
    return dataclasses.replace(rest, **arrays)
