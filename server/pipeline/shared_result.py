"""A made batch carried from a worker process to its consumer through a shared-memory file, not a pipe.

The whole-batch pipeline's workers return their :class:`BatchResult` through
``concurrent.futures``' result pipe.  Pickled, a 128-patch batch with HR and the
sharpened HR is ~100 MB, and the consumer's process - the server's main
process, which also sends - reads it from the pipe and unpickles it: about
three copies of every byte there.  Instead the worker writes the arrays into
one file in ``/dev/shm`` (one ``pwrite`` per array: the kernel's copy) and only
their layout is pickled; unpickling maps the file (private, copy on write) and
makes the arrays views of that mapping, so the consumer's process copies
nothing.  The arrays are writable (copy on write), as unpickled ones were.

The file itself is a :class:`BatchFile` in the result's ``shared`` field.  It
is removed when the result is dropped - or handed on, with
:meth:`BatchFile.take`, to a same-host client (server/service/slots.py), which
maps the very pages the worker wrote: the pixels cross no process boundary by
copy at all.  A mapping outlives the file's name, so removing it never pulls
memory from under an array.

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
import weakref
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


class BatchFile:
    """A batch's arrays in a file of :data:`SHM_DIR`, removed when this object goes (or by :meth:`remove`)
    unless its duty to remove the file was handed on with :meth:`take`."""

    def __init__(self, name: str, layout: list[tuple[str, str, tuple[int, ...], int]], size: int):
        self.name, self.layout, self.size = name, layout, size
        self.path = os.path.join(SHM_DIR, name)
        self._finalizer = weakref.finalize(self, _remove, self.path, name)

    @property
    def fields(self) -> set[str]:
        return {field for field, *_ in self.layout}

    def take(self) -> bool:
        """Take over removing the file (call :func:`remove_file` with ``path`` and ``name`` when done).
        False when the file is gone already or someone else took it."""
        return self._finalizer.detach() is not None

    def remove(self) -> None:
        self._finalizer()


def write_arrays(arrays: list[tuple[str, np.ndarray]], *, tag: str = "batch") -> BatchFile:
    """Write ``(field, array)`` pairs into a new file of :data:`SHM_DIR` (OSError where it cannot)."""
    name = f"degrade-{tag}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
    arrays = [(f, np.ascontiguousarray(a)) for f, a in arrays]
    layout = _write(name, arrays)
    return BatchFile(name, layout, sum(a.nbytes for _, a in arrays))


def remove_file(path: str, name: str) -> None:
    """Remove a file taken from a :class:`BatchFile` (no error if it is gone)."""
    _remove(path, name)


def sweep_orphans(older_than: float = ORPHAN_SECONDS) -> list[str]:
    """Remove batch files left by a process tree killed as a whole (the resource tracker with it): older
    than ``older_than`` seconds and made by a process that no longer exists.  Returns their names."""
    removed = []
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(("degrade-batch-", "degrade-slot-", "degrade-probe-"))]
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
    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - the tracker is gone (interpreter exit): nothing left to tell it
        pass


def _rebuild(rest: BatchResult, name: str, layout: list[tuple[str, str, tuple[int, ...], int]]) -> BatchResult:
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        _remove(path, name)
        raise
    try:
        size = os.fstat(fd).st_size
        # private and writable: pages are the file's until written (copy on write).  No MAP_POPULATE: on a
        # writable private mapping it copies every page at once (about 0.6 ms of kernel time per MB)
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else b""
    finally:
        os.close(fd)
    arrays = {field: np.frombuffer(mapped, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
              for field, dtype, shape, offset in layout}
    # the file stays (named) while the result lives: a same-host client may be handed it (server/service/slots.py)
    return dataclasses.replace(rest, **arrays, shared=BatchFile(name, layout, size))
