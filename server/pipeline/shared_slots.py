"""Preallocated shared-memory slots: how HR patches and video frames cross processes.

The split pipeline (``server.pipeline.split``) moves a video batch between the
pool workers (HR decode + crop, the codec round trip) and the device stage in
the main process.  Pickling those arrays would copy ~100 MB per 128-patch batch
through a pipe twice; instead each batch in flight owns one *slot*: a
POSIX shared-memory block laid out as four uint8 arrays, allocated once at
start-up and reused::

    hr     (capacity, P, P, 3)   HR crops        written by a worker (load)
    usm    (capacity, P, P, 3)   sharpened HR    written by the device stage
    frames (capacity, L, L, 3)   codec input     written by the device stage
    lr     (capacity, L, L, 3)   codec output    written by a worker (codec)

The codec writes to ``lr``, never over its own input, so a codec task whose
worker died can simply run again on the same slot.  Workers attach to a slot by
name (:func:`attach`) and keep the mapping.  A batch larger than the slots
(a per-request ``video_batch_size`` override) gets a one-off slot that is
unlinked when released.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger(__name__)

_NAMES = itertools.count()
#: where POSIX shared memory lives on Linux (a tmpfs; Docker's default is only 64 MB)
SHM_DIR = "/dev/shm"


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes of the shared-memory filesystem, or None where it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class SlotSpec:
    """What a worker needs to map a slot: its name and geometry (picklable, a few bytes)."""

    name: str
    capacity: int
    patch: int
    lr: int
    one_off: bool = False

    def layout(self) -> list[tuple[str, tuple[int, ...], int]]:
        """``(field, shape, byte offset)`` of each array, in order."""
        fields = [("hr", (self.capacity, self.patch, self.patch, 3)),
                  ("usm", (self.capacity, self.patch, self.patch, 3)),
                  ("frames", (self.capacity, self.lr, self.lr, 3)),
                  ("lr", (self.capacity, self.lr, self.lr, 3))]
        out, offset = [], 0
        for name, shape in fields:
            out.append((name, shape, offset))
            offset += int(np.prod(shape))
        return out

    @property
    def nbytes(self) -> int:
        name, shape, offset = self.layout()[-1]
        return offset + int(np.prod(shape))


class Slot:
    """One shared-memory block and its four array views (see the module docstring)."""

    def __init__(self, spec: SlotSpec, *, create: bool):
        self.spec = spec
        self._shm = shared_memory.SharedMemory(name=spec.name, create=create, size=spec.nbytes if create else 0)
        self._owner = create
        if create:
            try:  # reserve the pages now: a full /dev/shm is a clear error here, not a SIGBUS mid-batch
                os.posix_fallocate(self._shm._fd, 0, spec.nbytes)
            except (OSError, AttributeError) as exc:
                self.close()
                if isinstance(exc, AttributeError):  # pragma: no cover - no posix_fallocate on this platform
                    raise
                raise OSError(f"cannot reserve {spec.nbytes / 1e6:.0f} MB of shared memory in {SHM_DIR} "
                              f"({exc.strerror}); give the container more (docker: shm_size, "
                              "Kubernetes: an emptyDir of medium Memory at /dev/shm)") from None
        for name, shape, offset in spec.layout():
            setattr(self, name, np.ndarray(shape, dtype=np.uint8, buffer=self._shm.buf, offset=offset))

    hr: np.ndarray
    usm: np.ndarray
    frames: np.ndarray
    lr: np.ndarray

    def close(self) -> None:
        """Drop the mapping (and the name, for the creator).  Arrays still viewing it keep it alive."""
        for name, _, _ in self.spec.layout():
            self.__dict__.pop(name, None)
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            self._owner = False
        try:
            self._shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


class SlotPool:
    """``count`` slots of ``capacity`` patches, handed out one per batch in flight.

    :meth:`acquire` blocks (or returns None) when all are taken: that is the
    pipeline's memory bound and its backpressure.
    """

    def __init__(self, count: int, capacity: int, patch: int, lr: int):
        if count < 1 or capacity < 1:
            raise ValueError(f"need at least one slot of at least one patch, got {count} x {capacity}")
        self.capacity, self.patch, self.lr = capacity, patch, lr
        prefix = f"degrade-{os.getpid()}-{next(_NAMES)}"
        each = SlotSpec(prefix, capacity, patch, lr).nbytes
        free = shm_free_bytes()
        if free is not None and count * each > 0.8 * free:
            fits = int(0.8 * free // each)
            if fits < 1:
                raise OSError(f"{SHM_DIR} has {free / 1e6:.0f} MB free; one batch slot needs {each / 1e6:.0f} MB. "
                              "Give the container more shared memory (docker: shm_size, Kubernetes: an emptyDir "
                              "of medium Memory at /dev/shm)")
            log.warning("%s has %.0f MB free: %d batch slot(s) of %.0f MB instead of %d (fewer batches in flight; "
                        "raise shm_size for more)", SHM_DIR, free / 1e6, fits, each / 1e6, count)
            count = fits
        self._all = [Slot(SlotSpec(f"{prefix}-{i}", capacity, patch, lr), create=True) for i in range(count)]
        self._free = list(self._all)
        self._cond = threading.Condition()
        self._closed = False
        self._one_offs = itertools.count()
        self._prefix = prefix

    @property
    def nbytes(self) -> int:
        return sum(s.spec.nbytes for s in self._all)

    def acquire(self, n: int, *, block: bool = True, timeout: float = 0.5) -> Slot | None:
        """A free slot for ``n`` patches, or None (not blocking, or ``timeout`` passed, or closed).

        ``n`` above the capacity gets a one-off slot of its own size, at once."""
        if n > self.capacity:
            spec = SlotSpec(f"{self._prefix}-x{next(self._one_offs)}", n, self.patch, self.lr, one_off=True)
            return Slot(spec, create=True)
        with self._cond:
            if block and not self._free and not self._closed:
                self._cond.wait(timeout)
            if self._closed or not self._free:
                return None
            return self._free.pop()

    def release(self, slot: Slot) -> None:
        if slot.spec.one_off:
            slot.close()
            return
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for slot in self._all:
            slot.close()


# --- the worker side ----------------------------------------------------------
_ATTACHED: dict[str, Slot] = {}


def attach(spec: SlotSpec) -> Slot:
    """The slot named by ``spec`` in this (worker) process, mapped once and kept."""
    slot = _ATTACHED.get(spec.name)
    if slot is None:
        slot = Slot(spec, create=False)
        if not spec.one_off:
            _ATTACHED[spec.name] = slot
    return slot


def detach(slot: Slot) -> None:
    """Unmap a one-off slot after its task (the pool's slots stay mapped)."""
    if slot.spec.one_off:
        slot.close()
