"""Same-host delivery: a batch's tensors handed to the client as a shared-memory slot, not sent as bytes.

A trainer on the server's own host need not receive ~800 kB per pair through
a socket.  When it asks (``BatchRequest.shared_memory``) and *proves* it sees
the server's shared memory, each batch goes out as one small ``PairChunk``
(ids, records and a ``SharedSlot``: a file path, a lease, the tensors' shapes
and offsets), and the client maps the file and reads the pixels there.

The proof: the server keeps a probe file in :data:`SHM_DIR` holding 32 random
bytes, readable by its own user only (like the batch files).  A request that
asks for shared memory without those bytes as its token gets today's bytes,
and the stream's first message names the probe; a client that can open it is
on this host (same tmpfs, same user) and sends its bytes next time.  A client
on another host, in a container with another ``/dev/shm`` or as another user
cannot, and keeps getting bytes.  Nothing is assumed from addresses.

Slots: a slot is the batch's file in ``/dev/shm``.  From the whole-batch
pipeline it is the very file the worker wrote (``BatchResult.shared``): the
main process copies nothing.  Other batches (the split pipeline, in-process
engines, a batch that came through the pipe) are written into a new file
first, one copy.  Every slot is leased: the client maps it and gives it back
(``ReleaseSlots``); the mapping keeps the pages after the file is removed.  A
slot not given back within ``timeout`` seconds (a client stopped, wedged,
killed before it could answer) is removed all the same, and so are the slots
of a stream whose client went away.  A stream holds at most ``per_stream``
slots not given back; past that its sender waits (counted as "offered and not
taken" by the idle-stream watchdog), so a client that stops reading holds at
most that many files.

On CUDA the same lease/release protocol can carry IPC handles of device
tensors (``SharedSlot.kind``); that is not built.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Callable

from server.degradation.engine import BatchResult
from server.pipeline import shared_result
from server.pipeline.shared_result import BatchFile, remove_file, write_arrays

log = logging.getLogger(__name__)

#: default seconds a slot waits for its client's ReleaseSlots before it is removed anyway
DEFAULT_TIMEOUT = 60.0
#: default slots a stream may hold not given back before its sender waits
DEFAULT_PER_STREAM = 2
#: bytes of the probe file (the token)
TOKEN_BYTES = 32


@dataclass
class _Slot:
    path: str
    name: str
    stream: int
    deadline: float
    nbytes: int


class SlotTable:
    """The leased slots of one server, its probe file, and their timeouts.  Thread-safe."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, per_stream: int = DEFAULT_PER_STREAM,
                 on_expired: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.timeout = float(timeout)
        self.per_stream = max(1, int(per_stream))
        self._on_expired = on_expired or (lambda n: None)
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._held: dict[int, int] = {}  # stream id -> slots not given back
        self._cond = threading.Condition()
        self._probe: tuple[str, bytes] | None = None
        self._probe_failed = False
        self._closed = False

    # ---- the proof ----
    def probe_path(self) -> str | None:
        """The probe file's path (made on first use), or None where no file can be made there."""
        with self._cond:
            if self._probe is None and not self._probe_failed and not self._closed:
                token = secrets.token_bytes(TOKEN_BYTES)
                name = f"degrade-probe-{os.getpid()}-{secrets.token_hex(4)}"
                path = os.path.join(shared_result.SHM_DIR, name)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.write(fd, token)
                    finally:
                        os.close(fd)
                    resource_tracker.register("/" + name, "shared_memory")  # gone with the server, however it ends
                except OSError as exc:
                    self._probe_failed = True
                    log.warning("no same-host delivery: cannot write a probe file in %s (%s); every client gets "
                                "bytes", shared_result.SHM_DIR, exc)
                    return None
                self._probe = (path, token)
            return self._probe[0] if self._probe else None

    def verify(self, token: bytes) -> bool:
        """Whether ``token`` is the probe file's content (the client read this host's shared memory)."""
        with self._cond:
            probe = self._probe
        return probe is not None and len(token) == TOKEN_BYTES and hmac.compare_digest(token, probe[1])

    # ---- slots ----
    def file_for(self, result: BatchResult, fields: list[str]) -> BatchFile:
        """A file holding ``fields`` of ``result`` whose removal is now the caller's: the worker's own file
        when it has them all, else a new one (OSError where it cannot be written)."""
        shared = result.shared
        if isinstance(shared, BatchFile) and set(fields) <= shared.fields and shared.take():
            return shared
        made = write_arrays([(f, getattr(result, f)) for f in fields], tag="slot")
        made.take()
        return made

    def lease(self, file: BatchFile, stream: int) -> int:
        """Lease ``file`` (taken) to ``stream``'s client: returns the lease id to send."""
        lease = secrets.randbits(64) or 1
        with self._cond:
            if self._closed:
                remove_file(file.path, file.name)
                raise RuntimeError("the server is shutting down")
            self._slots[lease] = _Slot(file.path, file.name, stream, self._clock() + self.timeout, file.size)
            self._held[stream] = self._held.get(stream, 0) + 1
        return lease

    def held(self, stream: int) -> int:
        with self._cond:
            return self._held.get(stream, 0)

    @property
    def leased(self) -> int:
        """Slots not given back yet (all streams)."""
        with self._cond:
            return len(self._slots)

    def wait_for_room(self, stream: int, stop: Callable[[], bool]) -> bool:
        """Block until ``stream`` holds fewer than ``per_stream`` slots (True) or ``stop()`` (False)."""
        with self._cond:
            while self._held.get(stream, 0) >= self.per_stream:
                if stop():
                    return False
                self._cond.wait(0.25)
            return True

    def _drop(self, lease: int) -> _Slot | None:
        """Forget one lease (under the lock); the caller removes its file."""
        slot = self._slots.pop(lease, None)
        if slot is not None:
            n = self._held.get(slot.stream, 0) - 1
            if n > 0:
                self._held[slot.stream] = n
            else:
                self._held.pop(slot.stream, None)
        return slot

    def _remove(self, slots: list[_Slot]) -> None:
        for slot in slots:
            remove_file(slot.path, slot.name)

    def release(self, leases: list[int]) -> int:
        """The client is done with these slots (it mapped or copied them): remove them.  Returns how many
        were still held (a repeated, timed-out or unknown lease is ignored)."""
        with self._cond:
            slots = [s for lease in leases if (s := self._drop(int(lease))) is not None]
            if slots:
                self._cond.notify_all()
        self._remove(slots)
        return len(slots)

    def release_stream(self, stream: int) -> int:
        """``stream``'s client went away: remove the slots it still holds.  Returns how many."""
        with self._cond:
            mine = [lease for lease, s in self._slots.items() if s.stream == stream]
            slots = [s for lease in mine if (s := self._drop(lease)) is not None]
            if slots:
                self._cond.notify_all()
        self._remove(slots)
        return len(slots)

    def expire(self) -> int:
        """Remove the slots whose client did not give them back in time.  Returns how many."""
        now = self._clock()
        with self._cond:
            late = [lease for lease, s in self._slots.items() if s.deadline <= now]
            slots = [s for lease in late if (s := self._drop(lease)) is not None]
            if slots:
                self._cond.notify_all()
        if slots:
            log.warning("%d shared-memory slot(s) not given back within %g s; removed", len(slots), self.timeout)
            self._remove(slots)
            self._on_expired(len(slots))
        return len(slots)

    def close(self) -> None:
        """Remove every slot and the probe file (the server is stopping)."""
        with self._cond:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
            self._held.clear()
            probe, self._probe = self._probe, None
            self._cond.notify_all()
        self._remove(slots)
        if probe is not None:
            remove_file(probe[0], os.path.basename(probe[0]))
