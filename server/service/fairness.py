"""Fair shares of a server's scarce things: stream slots and production tickets.

:class:`FairShare` grants units of one resource (``capacity`` of them) to
waiting requests.  Whenever a unit is free it goes to the waiter whose client
holds the fewest units; among those, to the client served least recently; and
for one client, to its request that has waited longest.  So units go
round-robin across clients (and, within a client, across its streams):
with more demand than capacity nobody waits behind the others for long, and a
client with many streams gets no more than one with few.

The service uses two: the ``--max-streams`` stream slots (streams past them
wait in a bounded queue instead of being refused at once), and the worker
pool's ``workers + prefetch`` production tickets (a stream submits a batch to
the pool only with a ticket). Neither looks inside the pool, so any producer
with ``produce``/``workers``/``prefetch`` is scheduled the same way.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from typing import Callable, Hashable


class QueueFull(Exception):
    """No unit is free and the waiting queue is at its limit."""


@dataclass(eq=False)
class _Waiter:
    client: Hashable
    want: int
    seq: int
    granted: int = 0
    event: threading.Event = field(default_factory=threading.Event)


class FairShare:
    """``capacity`` units, granted least-served client first, FIFO among equals (see the module doc).

    ``max_waiting``: at most this many requests wait for a unit; past it
    :meth:`acquire` raises :class:`QueueFull` at once (None: no limit).
    """

    def __init__(self, capacity: int, *, max_waiting: int | None = None):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = int(capacity)
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._held: Counter = Counter()
        self._last: dict[Hashable, int] = {}  # client -> number of its latest grant (round-robin order)
        self._grants = count(1)
        self._in_use = 0
        self._waiters: list[_Waiter] = []
        self._seq = count()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def held(self, client: Hashable) -> int:
        with self._lock:
            return self._held[client]

    def acquire(self, client: Hashable, want: int = 1, *, stop: Callable[[], bool] | None = None,
                poll: float = 0.5) -> int:
        """Wait for 1..``want`` units (as many as are free when this request's turn comes) and
        return how many were granted; 0 when ``stop()`` turned true while waiting.
        Raises :class:`QueueFull` when nothing is free and ``max_waiting`` requests already wait."""
        waiter = _Waiter(client, max(1, int(want)), 0)
        with self._lock:
            if (self._in_use >= self.capacity and self.max_waiting is not None
                    and len(self._waiters) >= self.max_waiting):
                raise QueueFull()
            waiter.seq = next(self._seq)
            self._waiters.append(waiter)
            self._dispatch()
        while not waiter.event.wait(poll):
            if stop is not None and stop():
                with self._lock:
                    if not waiter.event.is_set():
                        self._waiters.remove(waiter)
                        return 0
                self.release(client, waiter.granted)  # granted just now: give it back
                return 0
        return waiter.granted

    def release(self, client: Hashable, n: int = 1) -> None:
        """Give back ``n`` units held by ``client``; they go to the next waiters at once."""
        if n <= 0:
            return
        with self._lock:
            if self._held[client] < n:
                raise ValueError(f"{client!r} releases {n} units but holds {self._held[client]}")
            self._held[client] -= n
            if not self._held[client]:
                del self._held[client]
            self._in_use -= n
            self._dispatch()

    def _dispatch(self) -> None:
        while self._in_use < self.capacity and self._waiters:
            waiter = min(self._waiters, key=lambda w: (self._held[w.client], self._last.get(w.client, 0), w.seq))
            self._waiters.remove(waiter)
            waiter.granted = min(waiter.want, self.capacity - self._in_use)
            self._held[waiter.client] += waiter.granted
            self._in_use += waiter.granted
            self._last[waiter.client] = next(self._grants)
            waiter.event.set()
        if len(self._last) > 4096:  # forget clients long gone (each connection is a client)
            keep = set(self._held) | {w.client for w in self._waiters}
            self._last = {c: n for c, n in self._last.items() if c in keep}
