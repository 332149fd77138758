"""The client's side of same-host delivery: read a batch's tensors from the server's shared memory.

A client that asks for it (``DegradeClient(shared_memory=True)``, the default)
sends ``BatchRequest.shared_memory``.  A server that offers it names a probe
file in the stream's first message; if this process can open that file it
shares the server's host, ``/dev/shm`` and user, and the file's bytes are the
token that makes the server send slots from then on.  A server on another
host, or behind a container boundary that hides its ``/dev/shm``, goes on
sending bytes: nothing is assumed from the address.

A slot is mapped privately (copy on write): the arrays are writable and
changing them changes nothing the server or another client sees.  The client
gives the slot back as soon as it is mapped; the mapping keeps the pages after
the server removes the file, and they are freed when the arrays go.  The
server side is ``server/service/slots.py``.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Any

import numpy as np

from .errors import DegradeError

log = logging.getLogger(__name__)

#: longest probe file read (the server's token is 32 bytes)
MAX_TOKEN_BYTES = 64
#: slot kinds this client reads
KINDS = ("file",)
TENSORS = ("lr", "hr", "hr_usm")


class SlotError(DegradeError):
    """A shared-memory slot could not be read (gone, another host's, malformed): the batch is asked for again,
    as bytes."""


class SharedMemoryReader:
    """Per server address: the token that proves this client reads that server's shared memory."""

    def __init__(self) -> None:
        self._tokens: dict[str, bytes] = {}
        self._refused: dict[str, str] = {}  # address -> why its probe could not be read (logged once)
        self._asked: set[str] = set()  # addresses whose GetInfo was asked for the probe
        self._lock = threading.Lock()

    def first_ask(self, address: str) -> bool:
        """True once per address: the caller asks its GetInfo for the probe before the first stream."""
        with self._lock:
            if address in self._asked:
                return False
            self._asked.add(address)
            return True

    def token(self, address: str) -> bytes:
        with self._lock:
            return self._tokens.get(address, b"")

    def learn(self, address: str, probe: str) -> bool:
        """Read the probe file ``address`` named; True when this client shares its host's memory."""
        try:
            fd = os.open(probe, os.O_RDONLY)
            try:
                token = os.read(fd, MAX_TOKEN_BYTES)
            finally:
                os.close(fd)
        except OSError as exc:
            with self._lock:
                first = address not in self._refused
                self._refused[address] = exc.strerror or str(exc)
                self._tokens.pop(address, None)
            if first:
                log.info("%s: its shared memory is not readable here (%s: %s); its batches come as bytes",
                         address, probe, exc.strerror)
            return False
        with self._lock:
            first = address not in self._tokens
            self._tokens[address] = token
            self._refused.pop(address, None)
        if first:
            log.info("%s shares this host's memory: batches come through shared-memory slots", address)
        return True

    def forget(self, address: str) -> None:
        """Stop sending ``address`` the token (its slots could not be read); a later probe may restore it."""
        with self._lock:
            self._tokens.pop(address, None)

    def describe(self, address: str) -> str:
        with self._lock:
            if address in self._tokens:
                return "shared memory"
            why = self._refused.get(address)
        return f"bytes ({why})" if why else "bytes"


def read_slot(slot: Any, count: int) -> tuple[dict[str, np.ndarray], int]:
    """The tensors of a ``SharedSlot`` holding ``count`` patches, as arrays over a private mapping of its file,
    and their bytes.  :class:`SlotError` when it cannot be read or does not hold what it says."""
    if slot.kind not in KINDS:
        raise SlotError(f"shared-memory slot of kind {slot.kind!r}, which this client cannot read")
    try:
        fd = os.open(slot.path, os.O_RDONLY)
    except OSError as exc:
        raise SlotError(f"cannot open shared-memory slot {slot.path}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size != slot.size or size == 0:
            raise SlotError(f"shared-memory slot {slot.path} has {size} bytes, the server said {slot.size}")
        # private and writable: the arrays may be changed in place (copy on write) without touching the file
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    arrays: dict[str, np.ndarray] = {}
    nbytes = 0
    for t in slot.tensors:
        shape = tuple(int(d) for d in t.shape)
        if t.name not in TENSORS or t.name in arrays or t.dtype != "uint8" or len(shape) != 4 or shape[0] != count:
            raise SlotError(f"shared-memory slot tensor {t.name!r}: dtype {t.dtype!r}, shape {list(shape)} "
                            f"(expected uint8 NHWC with {count} patches)")
        n = int(np.prod(shape))
        if t.offset + n > size:
            raise SlotError(f"shared-memory slot tensor {t.name!r} ends at byte {t.offset + n} of a {size}-byte file")
        arrays[t.name] = np.frombuffer(mapped, np.uint8, count=n, offset=int(t.offset)).reshape(shape)
        nbytes += n
    if "lr" not in arrays:
        raise SlotError("shared-memory slot without LR")
    return arrays, nbytes
