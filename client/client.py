"""``DegradeClient``: every patch of an epoch exactly once, from one or many servers.

Video batch k of epoch e is a pure function of (dataset, config, seed, e, k),
so the client needs no coordinator: it splits an epoch's batch indices into
small groups, runs ``streams_per_server`` concurrent streams per server, and
when a stream breaks (server killed, UNAVAILABLE, shutting down) puts exactly
the indices it has not fully received back in the queue for any live server.
A batch is delivered only once all its chunks have arrived, and each index at
most once, so nothing is lost and nothing is duplicated.

The output queue is bounded: a consumer that stops reading stops the streams,
and through gRPC flow control, the servers.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Iterator, Sequence

import grpc
import numpy as np

from .connection import TLS, auth_metadata, make_channel
from .protocol import degrade_pb2 as pb
from .protocol import degrade_pb2_grpc as pbg

log = logging.getLogger(__name__)

#: Status codes after which a batch is re-requested from another server.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
})


class DegradeError(RuntimeError):
    """A request no server can serve (bad request, wrong token) or no server reachable."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


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

    def __len__(self) -> int:
        return len(self.patch_ids)


@dataclass
class ClientStats:
    batches: int = 0
    pairs: int = 0
    bytes: int = 0
    retries: int = 0
    per_server: dict[str, int] = field(default_factory=dict)


def _array(t: pb.Tensor) -> np.ndarray:
    if t.dtype != "uint8":
        raise DegradeError(f"unexpected tensor dtype {t.dtype!r} from the server (expected uint8)")
    shape = tuple(int(s) for s in t.shape)
    arr = np.frombuffer(t.data, dtype=np.uint8)
    if arr.size != int(np.prod(shape)):
        raise DegradeError(f"tensor of shape {shape} carries {arr.size} bytes")
    return arr.reshape(shape)


class _Assembly:
    """The chunks of one batch, until the last arrives."""

    def __init__(self, first: pb.PairChunk):
        self.index = first.batch_index
        self.size = first.batch_size
        self.parts: list[pb.PairChunk] = []

    def add(self, chunk: pb.PairChunk) -> bool:
        expected = sum(c.lr.shape[0] for c in self.parts)
        if chunk.first_patch != expected:
            raise DegradeError(f"batch {self.index}: chunk at patch {chunk.first_patch}, expected {expected}")
        self.parts.append(chunk)
        return chunk.last_chunk

    def build(self, seed: int, epoch: int, server: str) -> VideoBatch:
        lr = np.concatenate([_array(c.lr) for c in self.parts])
        hr = np.concatenate([_array(c.hr) for c in self.parts]) if self.parts[0].HasField("hr") else None
        usm = np.concatenate([_array(c.hr_usm) for c in self.parts]) if self.parts[0].HasField("hr_usm") else None
        ids = [i for c in self.parts for i in c.patch_ids]
        records = [json.loads(r) for c in self.parts for r in c.records_json]
        if not (len(lr) == len(ids) == len(records) == self.size):
            raise DegradeError(f"batch {self.index}: {len(lr)} patches, {len(ids)} ids, {len(records)} records, "
                               f"announced {self.size}")
        return VideoBatch(seed, epoch, self.index, lr, hr, usm, records, ids, server)


class DegradeClient:
    """Pulls degraded LR/HR pairs from one or many ``degrade-server`` addresses.

    ``addresses``: one or several ``host:port`` (or ``dns:///name:port``) strings.
    ``token``: the bearer token of the servers, if they need one.  ``tls``: None
    (plaintext), True (system CAs), a CA certificate path or :class:`TLS`.
    """

    def __init__(self, addresses: str | Sequence[str], *, token: str | None = None,
                 tls: TLS | bool | str | None = None, streams_per_server: int = 2, group_size: int = 2,
                 include_hr: bool = True, include_hr_usm: bool = True, config_overrides: dict | None = None,
                 give_up_after: float = 60.0, queue_batches: int | None = None):
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("give at least one server address, e.g. 'localhost:50051'")
        self.addresses = [a.strip() for a in addresses]
        self._channels = {a: make_channel(a, tls) for a in self.addresses}
        self._stubs = {a: pbg.DegraderStub(ch) for a, ch in self._channels.items()}
        self._metadata = auth_metadata(token)
        self.streams_per_server = max(1, int(streams_per_server))
        self.group_size = max(1, int(group_size))
        self.include_hr = include_hr
        self.include_hr_usm = include_hr_usm
        self.config_overrides_json = json.dumps(config_overrides) if config_overrides else ""
        self.give_up_after = give_up_after
        self.queue_batches = queue_batches or max(2, len(self.addresses) * self.streams_per_server)
        self.stats = ClientStats()
        #: batches a server reported it could not make, as (epoch, index, reason)
        self.failures: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------
    def info(self, seed: int = 0, epoch: int = 0, timeout: float = 10.0) -> pb.ServerInfo:
        """The ``ServerInfo`` of the first server that answers (for this seed/epoch/config)."""
        errors = []
        for address, stub in self._stubs.items():
            try:
                return stub.GetInfo(pb.InfoRequest(seed=seed, epoch=epoch,
                                                   config_overrides_json=self.config_overrides_json),
                                    metadata=self._metadata, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise DegradeError(f"{address}: {exc.code().name}: {exc.details()}", exc.code()) from None
                errors.append(f"{address}: {exc.code().name}: {exc.details()}")
        raise DegradeError("no server answered: " + "; ".join(errors), grpc.StatusCode.UNAVAILABLE)

    def num_batches(self, seed: int, epoch: int) -> int:
        return int(self.info(seed, epoch).batches_per_epoch)

    # ------------------------------------------------------------------
    def epoch(self, seed: int, epoch: int, *, indices: Sequence[int] | None = None,
              shard: tuple[int, int] = (0, 1), ordered: bool = False) -> Iterator[VideoBatch]:
        """The video batches of one epoch (all, ``indices``, or shard ``i`` of ``n``: indices i, i+n, ...),
        each exactly once: in arrival order, or with ``ordered`` in the order of ``indices``
        (a deterministic stream, e.g. for exactly resumable training)."""
        if indices is None:
            i, n = shard
            if not 0 <= i < n:
                raise ValueError(f"shard {shard}: need 0 <= i < n")
            indices = range(i, self.num_batches(seed, epoch), n)
        return self._fetch(seed, epoch, list(indices), ordered)

    def epochs(self, seed: int, start_epoch: int = 0, *, shard: tuple[int, int] = (0, 1),
               ordered: bool = False) -> Iterator[VideoBatch]:
        """Endless: epoch after epoch of video batches."""
        for e in count(start_epoch):
            yield from self.epoch(seed, e, shard=shard, ordered=ordered)

    # ------------------------------------------------------------------
    def _fetch(self, seed: int, epoch: int, indices: list[int], ordered: bool = False) -> Iterator[VideoBatch]:
        if len(set(indices)) != len(indices):
            raise ValueError("indices must not repeat")
        run = _EpochRun(self, seed, epoch, indices)
        try:
            if not ordered:
                yield from run.results()
                return
            # reorder: hold early arrivals until every batch before them has arrived (or failed)
            waiting: dict[int, VideoBatch] = {}
            order = iter(indices)
            nxt = next(order, None)
            for batch in run.results(with_failures=True):
                waiting[batch if isinstance(batch, int) else batch.index] = batch
                while nxt is not None and nxt in waiting:
                    item = waiting.pop(nxt)
                    if not isinstance(item, int):
                        yield item
                    nxt = next(order, None)
        finally:
            run.stop()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> "DegradeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EpochRun:
    """The streams of one epoch: a queue of index groups, one thread per (server, stream slot)."""

    def __init__(self, client: DegradeClient, seed: int, epoch: int, indices: list[int]):
        self.client, self.seed, self.epoch = client, seed, epoch
        self.remaining = set(indices)
        self.total = len(indices)
        self.todo: deque[list[int]] = deque(
            indices[i:i + client.group_size] for i in range(0, len(indices), client.group_size))
        self.cond = threading.Condition()
        self.out: queue.Queue = queue.Queue(maxsize=client.queue_batches)
        self.stopping = threading.Event()
        self.delivered: set[int] = set()
        self.calls: set[Any] = set()
        self.last_progress = time.monotonic()
        self.threads = [
            threading.Thread(target=self._worker, args=(address,), daemon=True, name=f"degrade-{address}-{slot}")
            for address in client.addresses for slot in range(client.streams_per_server)
        ]
        for t in self.threads:
            t.start()

    # ---- consumer side ----
    def results(self, with_failures: bool = False) -> Iterator[VideoBatch | int]:
        """Batches as they arrive (and, ``with_failures``, the index of each batch a server could not make)."""
        accounted = 0  # batches received plus batches a server reported it could not make
        while accounted < self.total:
            try:
                item = self.out.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() - self.last_progress > self.client.give_up_after:
                    raise DegradeError(f"no server delivered anything for {self.client.give_up_after:.0f} s; "
                                       f"{len(self.remaining)} batch(es) of epoch {self.epoch} missing: "
                                       f"{sorted(self.remaining)[:10]}", grpc.StatusCode.UNAVAILABLE)
                continue
            if isinstance(item, BaseException):
                raise item
            accounted += 1
            if isinstance(item, VideoBatch):
                yield item
            elif with_failures:
                yield item[1]

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

    # ---- stream side ----
    def _take(self) -> list[int] | None:
        with self.cond:
            while not self.todo:
                if self.stopping.is_set() or not self.remaining:
                    return None
                self.cond.wait(0.5)
            if self.stopping.is_set():
                return None
            return self.todo.popleft()

    def _put_back(self, group: list[int]) -> None:
        with self.cond:
            missing = [k for k in group if k in self.remaining]
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

    def _worker(self, address: str) -> None:
        client = self.client
        stub = client._stubs[address]
        backoff = 0.2
        while not self.stopping.is_set():
            group = self._take()
            if group is None:
                return
            request = pb.BatchRequest(seed=self.seed, epoch=self.epoch, index_list=pb.IndexList(indices=group),
                                      include_hr=client.include_hr, include_hr_usm=client.include_hr_usm,
                                      config_overrides_json=client.config_overrides_json)
            call = stub.StreamBatches(request, metadata=client._metadata)
            with self.cond:
                self.calls.add(call)
            try:
                self._receive(call, address)
                backoff = 0.2
                # indices of the group the server never mentioned (should not happen) go back too
                self._put_back(group)
            except grpc.RpcError as exc:
                code = exc.code()
                if self.stopping.is_set():
                    return
                if code not in RETRYABLE:
                    self._emit(DegradeError(f"{address}: {code.name}: {exc.details()}", code))
                    self.stopping.set()
                    return
                with client._lock:
                    client.stats.retries += 1
                log.warning("%s: %s (%s); re-requesting batches %s elsewhere", address, code.name, exc.details(),
                            [k for k in group if k in self.remaining])
                self._put_back(group)
                self.stopping.wait(backoff)  # let the other servers take the group first
                backoff = min(backoff * 2, 5.0)
            except DegradeError as exc:  # a malformed reply: treat the server as broken
                log.error("%s: %s; re-requesting elsewhere", address, exc)
                self._put_back(group)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with self.cond:
                    self.calls.discard(call)

    def _receive(self, call: Any, address: str) -> None:
        client = self.client
        current: _Assembly | None = None
        for chunk in call:
            if self.stopping.is_set():
                call.cancel()
                return
            if chunk.batch_error:
                self._done(chunk.batch_index, None, chunk.batch_error)
                current = None
                continue
            if current is None or current.index != chunk.batch_index:
                current = _Assembly(chunk)
            if current.add(chunk):
                batch = current.build(self.seed, self.epoch, address)
                current = None
                self._done(batch.index, batch, None)

    def _done(self, index: int, batch: VideoBatch | None, error: str | None) -> None:
        with self.cond:
            if index not in self.remaining:  # already delivered by another stream: drop the copy
                return
            self.remaining.discard(index)
            self.delivered.add(index)
            self.last_progress = time.monotonic()
            self.cond.notify_all()
        client = self.client
        if batch is None:
            with client._lock:
                client.failures.append((self.epoch, index, error or ""))
            log.error("server could not make a batch: %s", error)
            self._emit(("failed", index))
            return
        with client._lock:
            s = client.stats
            s.batches += 1
            s.pairs += len(batch)
            s.bytes += batch.lr.nbytes + (batch.hr.nbytes if batch.hr is not None else 0) + (
                batch.hr_usm.nbytes if batch.hr_usm is not None else 0)
            s.per_server[batch.server] = s.per_server.get(batch.server, 0) + len(batch)
        self._emit(batch)
