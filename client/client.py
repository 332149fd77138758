"""``DegradeClient``: every patch of an epoch exactly once, from one or many servers.

Video batch k of epoch e is a pure function of (dataset, config, seed, e, k),
so the client needs no coordinator: it splits an epoch's batch indices into
small groups, runs ``streams_per_server`` concurrent streams per server, and
when a stream breaks (server killed, UNAVAILABLE, shutting down) puts exactly
the indices it has not fully received back in the queue for any live server.
A batch is delivered only once all its chunks have arrived, and each index at
most once, so nothing is lost and nothing is duplicated.

The output queue is bounded: a consumer that stops reading stops the streams,
and through gRPC flow control, the servers (which cancel a stream that stays
unread for their ``--idle-stream-seconds``; its batches are asked for again).

Slow is not dead.  A trainer waits as long as a server is there, however slow:
a stream that is open to a server whose health says SERVING is slow, and
RESOURCE_EXHAUSTED (the server is full) means "wait your turn", retried with
backoff.  Dead peers are found by gRPC keepalive (client/connection.py: a
connection whose pings go unanswered for 30 s is closed and its streams fail
UNAVAILABLE) and by the standard health service, which the client asks
whenever it has heard nothing from a server for ``health_interval`` seconds.
Only when no server has shown a sign of life (data, a health answer of
SERVING, any reply) for ``unreachable_timeout`` seconds does the client raise
:class:`DegradeError`, naming the batches it never got.  Until then it retries
with backoff and logs a warning, with the wait so far, every ``warn_after``
seconds without data.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Sized
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .connection import TLS, auth_metadata, make_channel
from .errors import DatasetMismatchError, DegradeError, LocalError
from .protocol import degrade_pb2 as pb
from .protocol import degrade_pb2_grpc as pbg
from .shared_memory import SharedMemoryReader, SlotError, read_slot

log = logging.getLogger(__name__)

#: Default ``unreachable_timeout``: long enough for a server (or its container or pod) to restart.
DEFAULT_UNREACHABLE_TIMEOUT = 600.0

#: The service whose health the client asks (grpc.health.v1).
HEALTH_SERVICE = "degrade.v1.Degrader"

#: Status codes after which a batch is re-requested (from another server, or the same one later).
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
})


@dataclass
class VideoBatch:
    """One video batch as received: uint8 NHWC arrays and one record per patch."""

    seed: int
    epoch: int
    index: int
    lr: np.ndarray
    hr: np.ndarray | None
    hr_usm: np.ndarray | None
    records: list[dict[str, Any]]
    patch_ids: list[str]
    server: str = ""
    dataset_fingerprint: str = ""  # of the server that made it
    wire_bytes: int = 0  # bytes of the chunk messages received for it
    shared_memory: bool = False  # its tensors were read from a same-host server's shared memory

    def __len__(self) -> int:
        return len(self.patch_ids)


@dataclass
class ClientStats:
    batches: int = 0
    pairs: int = 0
    bytes: int = 0  # received: the chunk messages (tensors, records, ids) as they came off the wire
    shared_batches: int = 0  # batches whose tensors were read from a same-host server's shared memory
    shared_bytes: int = 0    # their tensor bytes (not in ``bytes``: they never crossed the socket)
    retries: int = 0
    per_server: dict[str, int] = field(default_factory=dict)


class _Assembly:
    """The chunks of one batch, copied straight into arrays allocated once for the whole batch."""

    def __init__(self, first: pb.PairChunk):
        self.index = first.batch_index
        self.size = first.batch_size
        self.filled = 0
        self.arrays: dict[str, np.ndarray] = {}
        for name in ("lr", "hr", "hr_usm"):
            if first.HasField(name):
                t = getattr(first, name)
                if t.dtype != "uint8" or len(t.shape) != 4:
                    raise DegradeError(f"unexpected tensor {name}: dtype {t.dtype!r}, shape {list(t.shape)}")
                self.arrays[name] = np.empty((self.size, *t.shape[1:]), np.uint8)
        if "lr" not in self.arrays:
            raise DegradeError(f"batch {self.index}: a chunk without LR")
        self.ids: list[str] = []
        self.records: list[str] = []
        self.fingerprint = first.dataset_fingerprint
        self.wire_bytes = 0

    def add(self, chunk: pb.PairChunk) -> bool:
        if chunk.first_patch != self.filled or chunk.batch_size != self.size:
            raise DegradeError(f"batch {self.index}: chunk at patch {chunk.first_patch} of {chunk.batch_size}, "
                               f"expected {self.filled} of {self.size}")
        n = chunk.lr.shape[0] if chunk.lr.shape else 0
        if n < 1 or self.filled + n > self.size:
            raise DegradeError(f"batch {self.index}: a chunk of {n} patches at {self.filled} of {self.size}")
        for name, out in self.arrays.items():
            t = getattr(chunk, name)
            data = np.frombuffer(t.data, np.uint8)
            if tuple(t.shape) != (n, *out.shape[1:]) or data.size != out[0].size * n:
                raise DegradeError(f"batch {self.index}: {name} chunk of shape {list(t.shape)}, "
                                   f"{data.size} bytes does not fit {out.shape}")
            out[self.filled:self.filled + n] = data.reshape(n, *out.shape[1:])
        self.ids.extend(chunk.patch_ids)
        self.records.extend(chunk.records_json)
        self.filled += n
        self.wire_bytes += chunk.ByteSize()
        return chunk.last_chunk

    def build(self, seed: int, epoch: int, server: str) -> VideoBatch:
        if not (self.filled == len(self.ids) == len(self.records) == self.size):
            raise DegradeError(f"batch {self.index}: {self.filled} patches, {len(self.ids)} ids, "
                               f"{len(self.records)} records, announced {self.size}")
        records = [json.loads(r) for r in self.records]
        a = self.arrays
        return VideoBatch(seed, epoch, self.index, a["lr"], a.get("hr"), a.get("hr_usm"), records, self.ids, server,
                          self.fingerprint, self.wire_bytes)


class DegradeClient:
    """Pulls degraded LR/HR pairs from one or many ``degrade-server`` addresses.

    ``addresses``: one or several ``host:port`` (or ``dns:///name:port``) strings.
    ``token``: the bearer token of the servers, if they need one.  ``tls``: None
    (plaintext), True (system CAs), a CA certificate path or :class:`TLS`.
    ``unreachable_timeout``: raise :class:`DegradeError` only after this many
    seconds in which no server could be reached at all (default 600: a server
    restart fits in it); a slow server is waited for without limit.
    ``warn_after``: log a warning after this many seconds without data (and
    again every ``warn_after`` seconds).  ``health_interval``: ask a server's
    health after this many seconds without hearing from it.
    ``give_up_after`` is the old name of ``unreachable_timeout`` (deprecated).

    ``wire`` (see :mod:`client.wire`): ``"full"`` - LR, HR and the sharpened HR
    come from the server; ``"lr-hr"`` - LR and HR come, the sharpened HR is made
    here (on ``sharpen_device``, byte-identical to the server's on the CPU);
    ``"lr"`` - LR and the records come, HR is cut here from ``hr_root`` (checked
    against the server's dataset fingerprint before the first batch) and
    sharpened here.  ``sharpen_device=None`` leaves ``hr_usm`` empty for a caller
    that sharpens on its own device (``client.wire.Sharpener.targets``).  The local
    work runs in the stream threads, in parallel; on the CPU, ``torch.set_num_threads(1)``
    in the process is fastest (DataLoader workers have it already).

    ``shared_memory`` (default True): from a server on this host that offers it, take the
    tensors from its shared memory instead of the socket (client.shared_memory: only once
    this process has shown it can read the server's ``/dev/shm``; other servers send bytes,
    and the arrays are the same).  False: always bytes.
    """

    def __init__(self, addresses: str | Sequence[str], *, token: str | None = None,
                 tls: TLS | bool | str | None = None, streams_per_server: int = 2, group_size: int = 2,
                 include_hr: bool = True, include_hr_usm: bool = True, config_overrides: dict | None = None,
                 unreachable_timeout: float = DEFAULT_UNREACHABLE_TIMEOUT, warn_after: float = 60.0,
                 health_interval: float = 5.0, queue_batches: int | None = None,
                 give_up_after: float | None = None, wire: str = "full",
                 hr_root: str | Path | None = None, sharpen_device: str | None = "cpu", shared_memory: bool = True):
        from .wire import check_wire, wire_flags  # here, not above: client.wire imports torch, `import client` does not

        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("give at least one server address, e.g. 'localhost:50051'")
        self.addresses = [a.strip() for a in addresses]
        self._channels = {a: make_channel(a, tls) for a in self.addresses}
        self._stubs = {a: pbg.DegraderStub(ch) for a, ch in self._channels.items()}
        self._health = {a: health_pb2_grpc.HealthStub(ch) for a, ch in self._channels.items()}
        self._metadata = auth_metadata(token)
        self._runs: weakref.WeakSet[_Run] = weakref.WeakSet()  # runs whose streams close() must stop first
        self.streams_per_server = max(1, int(streams_per_server))
        self.group_size = max(1, int(group_size))
        self.wire = check_wire(wire, hr_root)
        self.hr_root = Path(hr_root) if hr_root is not None else None
        self.sharpen_device = sharpen_device
        #: ask servers on this host for shared-memory slots (client/shared_memory.py)
        self.shared_memory = bool(shared_memory)
        self.shm = SharedMemoryReader()
        self._probe_lock = threading.Lock()
        #: the sharpened HR is made here (wire modes lr-hr and lr)
        self.local_usm = wire != "full" and include_hr_usm and sharpen_device is not None
        # what the requests ask for
        self.include_hr, self.include_hr_usm = (include_hr, include_hr_usm) if wire == "full" else wire_flags(wire)
        self._side: Any = None  # client.wire.WireSide, made by prepare()
        self._side_lock = threading.Lock()
        self.config_overrides_json = json.dumps(config_overrides) if config_overrides else ""
        if give_up_after is not None:
            warnings.warn("DegradeClient(give_up_after=...) is now unreachable_timeout=... (seconds without any "
                          "reachable server)", DeprecationWarning, stacklevel=2)
            unreachable_timeout = give_up_after
        if unreachable_timeout <= 0:
            raise ValueError("unreachable_timeout must be positive (seconds)")
        self.unreachable_timeout = float(unreachable_timeout)
        self.warn_after = float(warn_after)
        self.health_interval = float(health_interval)
        self.queue_batches = queue_batches or max(2, len(self.addresses) * self.streams_per_server)
        self.stats = ClientStats()
        #: batches a server reported it could not make, as (epoch, index, reason)
        self.failures: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()
        #: per server: when it last showed it is alive (data, SERVING, any reply), and what we last heard
        self._contact: dict[str, float] = {}
        self._heard: dict[str, str] = {a: "not contacted yet" for a in self.addresses}

    # ---- slow or dead? ----
    def _alive(self, address: str, what: str = "") -> None:
        """``address`` showed it is alive and serving (or alive and full)."""
        self._contact[address] = time.monotonic()
        if what:
            self._heard[address] = what

    def last_contact(self) -> float:
        """``time.monotonic()`` of the latest sign of life of any server (-inf: none yet)."""
        return max(self._contact.values(), default=float("-inf"))

    def probe(self, address: str, timeout: float = 10.0) -> bool:
        """Ask ``address``'s health service: True (and noted as a sign of life) when it says SERVING or
        answers at all while overloaded; False when it is NOT_SERVING (shutting down) or unreachable."""
        try:
            reply = self._health[address].Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE),
                                                metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # gRPC's own limit: it is there, and busy
                self._alive(address, "alive, every call slot busy")
                return True
            self._heard[address] = f"unreachable ({exc.code().name}: {exc.details()})"
            return False
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            self._alive(address, "SERVING")
            return True
        self._heard[address] = f"health {status}"
        return False

    def describe_servers(self) -> str:
        now = time.monotonic()
        parts = []
        for a in self.addresses:
            seen = self._contact.get(a)
            ago = f", last sign of life {now - seen:.0f} s ago" if seen is not None else ", never reached"
            parts.append(f"{a}: {self._heard[a]}{ago}")
        return "; ".join(parts)

    # ------------------------------------------------------------------
    def info(self, seed: int = 0, epoch: int = 0, timeout: float = 10.0, *,
             dataset_files: bool = False) -> pb.ServerInfo:
        """The ``ServerInfo`` of the first server that answers (for this seed/epoch/config;
        ``dataset_files``: with the per-file dataset fingerprint).

        ``timeout`` is per call; while no server answers the calls are retried with backoff, and
        :class:`DegradeError` is raised once no server has been reachable for ``unreachable_timeout`` s
        (a server that is only slow, SERVING but late, is waited for)."""
        start = time.monotonic()
        backoff = 0.2
        request = pb.InfoRequest(seed=seed, epoch=epoch, config_overrides_json=self.config_overrides_json,
                                 include_dataset_files=dataset_files)
        while True:
            errors = []
            for address, stub in self._stubs.items():
                try:
                    reply = stub.GetInfo(request, metadata=self._metadata, timeout=timeout)
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code not in RETRYABLE:
                        raise DegradeError(f"{address}: {code.name}: {exc.details()}", code) from None
                    errors.append(f"{address}: {code.name}: {exc.details()}")
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self._alive(address, "alive, full (RESOURCE_EXHAUSTED)")
                    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        self.probe(address, timeout)  # slow or gone? its health service says
                    continue
                self._alive(address, "answered GetInfo")
                if self.shared_memory:
                    self._take_probe(address, reply)
                return reply
            waited = time.monotonic() - max(start, self.last_contact())
            if waited >= self.unreachable_timeout:
                raise DegradeError(f"no server answered for {waited:.0f} s: " + "; ".join(errors),
                                   grpc.StatusCode.UNAVAILABLE)
            (log.warning if waited >= self.warn_after else log.info)(
                "no server answered GetInfo for %.0f s (%s); retrying in %.1f s", waited, "; ".join(errors), backoff)
            time.sleep(min(backoff, max(0.05, self.unreachable_timeout - waited)))
            backoff = min(backoff * 2, 5.0)

    def _ask_probe(self, address: str) -> None:
        """Before the first stream to ``address``: does it offer shared memory this process can read?
        (Otherwise the first streams would carry bytes while the first one learns it.)"""
        if not self.shared_memory:
            return
        with self._probe_lock:  # the other streams to it wait for the answer
            if not self.shm.first_ask(address):
                return
            try:
                reply = self._stubs[address].GetInfo(
                    pb.InfoRequest(config_overrides_json=self.config_overrides_json), metadata=self._metadata,
                    timeout=10)
            except grpc.RpcError:  # the stream will tell (and name the probe) all the same
                return
            self._take_probe(address, reply)

    def _take_probe(self, address: str, reply: pb.ServerInfo) -> None:
        """What ``address``'s GetInfo says of shared memory: asked once; its probe read, if it names one."""
        self.shm.first_ask(address)
        if reply.shared_memory_probe:
            self.shm.learn(address, reply.shared_memory_probe)

    def num_batches(self, seed: int, epoch: int) -> int:
        return int(self.info(seed, epoch).batches_per_epoch)

    def prepare(self) -> Any:
        """Get ready for the wire mode once (done before the first batch of any run): the server's
        degradation config, and in mode 'lr' the check of the local dataset copy against the server's
        fingerprint (:class:`DatasetMismatchError` naming the files that differ). Returns the
        ``client.wire.WireSide``."""
        with self._side_lock:
            if self._side is None:
                from .wire import WireSide

                self._side = WireSide.connect(self)
            return self._side

    def degradation_config(self) -> Any:
        """The ``server.degradation.config.DegradationConfig`` the servers make this client's batches with."""
        return self.prepare().cfg

    # ------------------------------------------------------------------
    def epoch(self, seed: int, epoch: int, *, indices: Sequence[int] | None = None,
              shard: tuple[int, int] = (0, 1), ordered: bool = False) -> Iterator[VideoBatch]:
        """The video batches of one epoch (all, ``indices``, or shard ``i`` of ``n``: indices i, i+n, ...),
        each exactly once: in arrival order, or with ``ordered`` in the order of ``indices``
        (a deterministic stream, e.g. for exactly resumable training)."""
        if indices is None:
            i, n = _check_shard(shard)
            indices = range(i, self.num_batches(seed, epoch), n)
        indices = list(indices)
        if len(set(indices)) != len(indices):
            raise ValueError("indices must not repeat")
        return self.jobs(seed, [(epoch, k) for k in indices], ordered=ordered)

    def epochs(self, seed: int, start_epoch: int = 0, *, shard: tuple[int, int] = (0, 1),
               ordered: bool = False) -> Iterator[VideoBatch]:
        """Endless: epoch after epoch of video batches. The streams run on across epoch
        boundaries (the next epoch's batches are requested while the last ones arrive)."""
        i, n = _check_shard(shard)

        def jobs() -> Iterator[tuple[int, int]]:
            for e in count(start_epoch):
                for k in range(i, self.num_batches(seed, e), n):
                    yield e, k

        return self.jobs(seed, jobs(), ordered=ordered)

    def jobs(self, seed: int, jobs: Iterable[tuple[int, int]], *, ordered: bool = False) -> Iterator[VideoBatch]:
        """The video batches named by ``(epoch, index)`` pairs (a list or an endless iterator), each
        exactly once; ``ordered`` keeps the order of ``jobs``."""
        total = len(jobs) if isinstance(jobs, Sized) else None
        side = self.prepare() if self.wire != "full" else None  # e.g. the local copy is checked first
        run = _Run(self, seed, iter(jobs), total, side)
        self._runs.add(run)
        try:
            if not ordered:
                for item in run.results():
                    if isinstance(item, VideoBatch):
                        yield item
                return
            # reorder: hold early arrivals until every job before them has arrived (or failed)
            waiting: dict[int, Any] = {}
            nxt = 0
            for item in run.results():
                seq = run.seq_of(item)
                waiting[seq] = item
                while nxt in waiting:
                    got = waiting.pop(nxt)
                    if isinstance(got, VideoBatch):
                        yield got
                    nxt += 1
        finally:
            self._runs.discard(run)
            run.stop()
            if side is not None:  # local work (torch) in the stream threads must not outlive the run
                run.join(timeout=60)

    def close(self) -> None:
        """Close the channels.  A run still streaming (``close()`` from another thread, or between two
        batches) is stopped first, and its consumer gets a :class:`DegradeError` saying so."""
        for run in list(self._runs):
            run.abort(DegradeError("the client was closed while this run was streaming"))
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> "DegradeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {shard}: need 0 <= i < n")
    return i, n


@dataclass(frozen=True)
class _Failed:
    """A batch a server reported it could not make (accounted for, not delivered)."""

    epoch: int
    index: int


class _Run:
    """Streams for a sequence of (epoch, index) jobs: one thread per (server, stream slot), each
    taking the next group of jobs (one epoch, up to ``group_size``), so every server stays busy
    across epoch boundaries.  Jobs come from an iterator (possibly endless), pulled only when a
    stream is free: at most streams x group_size jobs are requested ahead of the consumer."""

    def __init__(self, client: DegradeClient, seed: int, jobs: Iterator[tuple[int, int]], total: int | None = None,
                 side: Any = None):
        self.client, self.seed = client, seed
        self.side = side  # client.wire.WireSide: what the wire mode leaves to this side
        self._jobs = jobs
        self.total = total  # number of jobs, when known
        self._peek: tuple[int, int] | None = None
        self.exhausted = False
        self.dispatched = 0  # jobs pulled from the iterator
        self.seq: dict[tuple[int, int], int] = {}
        self.remaining: set[tuple[int, int]] = set()  # pulled, not yet delivered or failed
        self.todo: deque[list[tuple[int, int]]] = deque()  # groups put back after a failure
        self.cond = threading.Condition()
        self.out: queue.Queue = queue.Queue(maxsize=client.queue_batches)
        self.stopping = threading.Event()
        self.aborted: BaseException | None = None  # set by abort(): what the consumer raises next
        self.calls: set[Any] = set()
        self.started = self.last_progress = time.monotonic()
        self.threads = [
            threading.Thread(target=self._worker, args=(address,), daemon=True, name=f"degrade-{address}-{slot}")
            for address in client.addresses for slot in range(client.streams_per_server)
        ] + [
            threading.Thread(target=self._monitor, args=(address,), daemon=True, name=f"degrade-health-{address}")
            for address in client.addresses
        ]
        for t in self.threads:
            t.start()

    def seq_of(self, item: "VideoBatch | _Failed") -> int:
        return self.seq[(item.epoch, item.index)]

    # ---- consumer side ----
    def results(self) -> Iterator["VideoBatch | _Failed"]:
        """Batches as they arrive, and a :class:`_Failed` for each batch a server could not make."""
        accounted = 0
        client = self.client
        warned = self.started
        while True:
            with self.cond:
                if self.exhausted and accounted == self.dispatched:
                    return
            try:
                item = self.out.get(timeout=0.5)
            except queue.Empty:
                if self.aborted is not None:
                    raise self.aborted
                now = time.monotonic()
                unreachable = now - max(self.started, client.last_contact())
                if unreachable > client.unreachable_timeout:
                    with self.cond:
                        missing = sorted(self.remaining)
                        later = None if self.total is None else self.total - self.dispatched
                    more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
                    later = f"; {later} later one(s) not asked for yet" if later else ""
                    raise DegradeError(
                        f"no server reachable for {unreachable:.0f} s (unreachable_timeout "
                        f"{client.unreachable_timeout:g} s; {client.describe_servers()}); {len(missing)} video "
                        f"batch(es) asked for and never received, (epoch, batch): {missing[:20]}{more}{later}",
                        grpc.StatusCode.UNAVAILABLE)
                quiet = now - max(self.last_progress, warned)
                if quiet >= client.warn_after:
                    warned = now
                    with self.cond:
                        waiting = len(self.remaining)
                    log.warning("nothing received for %.0f s (%d video batch(es) asked for and not yet here); "
                                "servers: %s. Waiting: a slow server is not an error; giving up only after %g s "
                                "with no server reachable", now - self.last_progress, waiting,
                                client.describe_servers(), client.unreachable_timeout)
                continue
            if isinstance(item, BaseException):
                raise item
            accounted += 1
            yield item

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
            calls = list(self.calls)
        for call in calls:
            call.cancel()
        while True:  # unblock producers waiting on a full queue
            try:
                self.out.get_nowait()
            except queue.Empty:
                break

    def abort(self, exc: BaseException) -> None:
        """Stop every stream (batches not yet taken are dropped); the consumer raises ``exc`` next."""
        self.aborted = exc
        self.stop()

    def join(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s in all) for the stream threads to end after :meth:`stop`."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- stream side ----
    def _pull(self) -> tuple[int, int] | None:
        """The next job from the iterator (under the lock), or None when it is exhausted."""
        if self._peek is not None:
            job, self._peek = self._peek, None
            return job
        if self.exhausted:
            return None
        job = next(self._jobs, None)  # may call GetInfo (endless epochs): errors reach the consumer
        if job is None:
            self.exhausted = True
            return None
        job = (int(job[0]), int(job[1]))
        if job in self.seq:
            raise ValueError(f"job {job} appears twice")
        self.seq[job] = self.dispatched
        self.dispatched += 1
        self.remaining.add(job)
        return job

    def _take(self) -> list[tuple[int, int]] | None:
        with self.cond:
            while True:
                if self.stopping.is_set():
                    return None
                if self.todo:
                    return self.todo.popleft()
                first = self._pull()
                if first is not None:
                    group = [first]
                    while len(group) < self.client.group_size:
                        nxt = self._pull()
                        if nxt is None:
                            break
                        if nxt[0] != first[0]:  # one request = one epoch
                            self._peek = nxt
                            break
                        group.append(nxt)
                    return group
                if not self.remaining:
                    return None
                self.cond.wait(0.5)  # others are in flight and may be put back

    def _put_back(self, group: list[tuple[int, int]]) -> None:
        with self.cond:
            missing = [job for job in group if job in self.remaining]
            if missing:
                self.todo.appendleft(missing)
                self.cond.notify_all()

    def _emit(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fatal(self, exc: BaseException) -> None:
        self._emit(exc)
        self.stopping.set()

    def _monitor(self, address: str) -> None:
        """Ask ``address``'s health whenever nothing has been heard from it for ``health_interval`` s,
        so that a stream that is merely slow is told from a server that is gone."""
        client = self.client
        interval = client.health_interval
        while not self.stopping.wait(interval):
            if time.monotonic() - client._contact.get(address, float("-inf")) >= interval:
                client.probe(address, timeout=max(interval, 10.0))

    def _wait(self, backoff: float) -> float:
        """Sleep ``backoff`` s, jittered (so that many clients do not retry in step); the next backoff."""
        self.stopping.wait(backoff * random.uniform(0.5, 1.5))
        return min(backoff * 2, 5.0)

    def _worker(self, address: str) -> None:
        client = self.client
        stub = client._stubs[address]
        backoff = 0.2
        while not self.stopping.is_set():
            try:
                group = self._take()
            except Exception as exc:  # noqa: BLE001 - e.g. no server answered GetInfo for the next epoch
                self._fatal(exc if isinstance(exc, DegradeError) else DegradeError(str(exc)))
                return
            if group is None:
                return
            client._ask_probe(address)
            epoch = group[0][0]
            request = pb.BatchRequest(seed=self.seed, epoch=epoch,
                                      index_list=pb.IndexList(indices=[k for _, k in group]),
                                      include_hr=client.include_hr, include_hr_usm=client.include_hr_usm,
                                      config_overrides_json=client.config_overrides_json,
                                      shared_memory=client.shared_memory,
                                      shared_memory_token=client.shm.token(address) if client.shared_memory else b"")
            try:
                call = stub.StreamBatches(request, metadata=client._metadata)
            except ValueError as exc:  # grpc: "Channel closed!" - close() ran between our check and this call
                if not self.stopping.is_set():
                    self._fatal(DegradeError(f"{address}: the client was closed while streaming ({exc})"))
                return
            with self.cond:
                self.calls.add(call)
            try:
                self._receive(call, address, epoch)
                backoff = 0.2
                self._put_back(group)  # jobs the server never mentioned (should not happen) go back too
            except grpc.RpcError as exc:
                code = exc.code()
                if self.stopping.is_set():
                    return
                if code not in RETRYABLE:
                    self._fatal(DegradeError(f"{address}: {code.name}: {exc.details()}", code))
                    return
                with client._lock:
                    client.stats.retries += 1
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # alive and full: wait our turn, never fatal
                    client._alive(address, "alive, full (RESOURCE_EXHAUSTED)")
                    log.info("%s is full (%s); asking again in a while", address, exc.details())
                else:
                    log.warning("%s: %s (%s); re-requesting %s", address, code.name, exc.details(),
                                [job for job in group if job in self.remaining])
                self._put_back(group)
                backoff = self._wait(backoff)  # let the other servers take the group first
            except SlotError as exc:  # e.g. a slot removed before we read it: ask again for bytes, at once
                call.cancel()
                log.warning("%s: %s; asking again for %s as bytes", address, exc,
                            [job for job in group if job in self.remaining])
                client.shm.forget(address)
                self._put_back(group)
            except LocalError as exc:  # this side's dataset copy or sharpening: no server can help
                call.cancel()
                self._fatal(exc)
                return
            except DegradeError as exc:  # a malformed reply: treat the server as broken
                log.error("%s: %s; re-requesting elsewhere", address, exc)
                self._put_back(group)
                backoff = self._wait(backoff)
            finally:
                with self.cond:
                    self.calls.discard(call)

    def _receive(self, call: Any, address: str, epoch: int) -> None:
        current: _Assembly | None = None
        for chunk in call:
            self.client._alive(address, "streaming")
            if self.stopping.is_set():
                call.cancel()
                return
            if chunk.shared_memory_probe:  # the server offers shared memory: can this process read it?
                self.client.shm.learn(address, chunk.shared_memory_probe)
            if chunk.batch_error:
                self._done(epoch, chunk.batch_index, None, chunk.batch_error)
                current = None
                continue
            if chunk.HasField("slot"):
                batch = self._from_slot(chunk, address, epoch)
                if self.side is not None:
                    batch = self.side.complete(batch)
                self._done(epoch, batch.index, batch, None)
                current = None
                continue
            if current is None or current.index != chunk.batch_index:
                current = _Assembly(chunk)
            if current.add(chunk):
                batch = current.build(self.seed, epoch, address)
                current = None
                if self.side is not None:  # wire modes lr-hr, lr: HR and/or the sharpened HR made here
                    batch = self.side.complete(batch)
                self._done(epoch, batch.index, batch, None)

    def _from_slot(self, chunk: pb.PairChunk, address: str, epoch: int) -> VideoBatch:
        """A whole batch whose tensors are in the server's shared memory (client/shared_memory.py): mapped,
        then the slot is given back at once (the mapping keeps the pages)."""
        slot = chunk.slot
        try:
            n = chunk.batch_size
            if not (n >= 1 and chunk.first_patch == 0 and chunk.last_chunk and len(chunk.patch_ids) == n
                    and len(chunk.records_json) == n):
                raise SlotError(f"batch {chunk.batch_index}: a shared-memory batch of {n} patches with "
                                f"{len(chunk.patch_ids)} ids and {len(chunk.records_json)} records")
            arrays, nbytes = read_slot(slot, n)
        finally:
            try:
                self.client._stubs[address].ReleaseSlots(pb.SlotRelease(leases=[slot.lease]),
                                                         metadata=self.client._metadata, timeout=10)
            except grpc.RpcError as exc:  # the server removes it after its timeout all the same
                log.debug("%s: ReleaseSlots failed (%s)", address, exc.code().name)
        with self.client._lock:
            self.client.stats.shared_batches += 1
            self.client.stats.shared_bytes += nbytes
        records = [json.loads(r) for r in chunk.records_json]
        return VideoBatch(self.seed, epoch, chunk.batch_index, arrays["lr"], arrays.get("hr"), arrays.get("hr_usm"),
                          records, list(chunk.patch_ids), address, chunk.dataset_fingerprint, chunk.ByteSize(),
                          shared_memory=True)

    def _done(self, epoch: int, index: int, batch: VideoBatch | None, error: str | None) -> None:
        with self.cond:
            if (epoch, index) not in self.remaining:  # already delivered by another stream: drop the copy
                return
            self.remaining.discard((epoch, index))
            self.last_progress = time.monotonic()
            self.cond.notify_all()
        client = self.client
        if batch is None:
            with client._lock:
                client.failures.append((epoch, index, error or ""))
            log.error("server could not make a batch: %s", error)
            self._emit(_Failed(epoch, index))
            return
        with client._lock:
            s = client.stats
            s.batches += 1
            s.pairs += len(batch)
            s.bytes += batch.wire_bytes
            s.per_server[batch.server] = s.per_server.get(batch.server, 0) + len(batch)
        self._emit(batch)
