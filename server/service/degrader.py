"""The ``degrade.v1.Degrader`` gRPC service: GetInfo and StreamBatches.

Requests arrive as raw bytes and are parsed here, so that even a message that
is not a valid protobuf gets INVALID_ARGUMENT (gRPC's own deserializer would
answer INTERNAL).  Every request is validated before any work; any failure
inside becomes a status with a message, never UNKNOWN.

Backpressure: a stream's generator is pulled by gRPC only as fast as the
client reads (HTTP/2 flow control), and each stream keeps a bounded window of
batches in flight in the shared worker pool, so a slow client slows its own
stream and server memory stays bounded.

Fairness under overload (server/service/fairness.py): the ``max_streams`` stream slots
and the pool's ``workers + prefetch`` production tickets are both granted
least-served client first, round-robin among equals.  Streams past the slots
wait in a bounded queue (past that: RESOURCE_EXHAUSTED); a stream submits a
batch to the pool only with a ticket, so batches go out round-robin across
clients whatever order the pool works in.  Each stream has a small "pump"
thread that drives the producer, so a stream blocked on a slow reader holds no
ticket.

Idle streams: a stream whose client has not accepted a chunk for
``idle_stream_seconds`` (it holds a slot and reads nothing) is cancelled with
ABORTED "stream idle for N s: cancelled to free its slot", counted in
``degrade_idle_streams_cancelled_total``.  Time spent waiting for a slot or for
the pool does not count: only a chunk offered and not taken (or, for a
same-host client, a stream waiting for it to give slots back).

Same-host clients (server/service/slots.py): a client that asks for shared
memory and proves it reads the server's ``/dev/shm`` gets each batch as one
small PairChunk naming a shared-memory slot; the pixels are not sent at all.
It gives slots back with ``ReleaseSlots``; slots not given back in time, or of
a stream whose client went away, are removed by the server.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from itertools import count
from typing import Any, Iterator

import grpc
import torch
from google.protobuf.message import DecodeError

from client.protocol import degrade_pb2 as pb
from server.degradation.config import DegradationConfig
from server.degradation.cpu_budget import CpuBudget, cpu_budget as find_cpu_budget
from server.degradation.fingerprint import FileDigest, fingerprint
from server.pipeline.batch import BatchProducer

from .allocator import keep_large_buffers
from .chunks import SHARED_MEMORY_PROBE, batch_chunks, slot_chunk, string_field
from .fairness import FairShare, QueueFull
from .metrics import ServiceMetrics
from .requests import BatchJob, RequestError, resolve_config, validate_batch_request
from .slots import DEFAULT_PER_STREAM, DEFAULT_TIMEOUT, SlotTable

log = logging.getLogger(__name__)

SERVICE_NAME = "degrade.v1.Degrader"


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    try:
        return metadata.version("vcisr-degrade")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def cancel_with_status(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End an RPC from any thread with ``code`` and ``details`` (``context.abort`` works only in the
    handler's own thread, which may be blocked in flow control; ``context.cancel`` has no message)."""
    try:  # grpc's own call object cancels with a status (grpc_call_cancel_with_status)
        context._rpc_event.call.cancel(code.value[0], details)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - another grpc version: cancel without the message
        context.cancel()


@dataclass(eq=False)
class _Stream:
    """One running StreamBatches call, as the idle watchdog sees it."""

    id: int
    client: str
    context: Any
    offered_at: float | None = None  # a chunk handed to gRPC and not yet accepted: since when
    cancelled: bool = False
    unsent: int = 0  # batches made for this stream and not yet taken by its sender
    prefix: bytes = b""  # fields to put in the stream's first message (the shared-memory probe)


_DONE = object()


class DegradeService:
    """Serves one dataset with one worker pool to any number of clients (up to ``max_streams`` at once,
    ``max_waiting_streams`` more waiting their turn)."""

    def __init__(self, producer: BatchProducer, *, dataset_name: str, max_streams: int, max_video_batch: int = 256,
                 metrics: ServiceMetrics | None = None, codec_backends: list[str] | None = None,
                 max_waiting_streams: int | None = None, idle_stream_seconds: float = 60.0,
                 dataset_files: list[FileDigest] | None = None, cpu_budget: CpuBudget | None = None,
                 shared_memory: bool = True, slot_seconds: float = DEFAULT_TIMEOUT,
                 slots_per_stream: int = DEFAULT_PER_STREAM):
        keep_large_buffers()  # chunks of a few MB are sent all the time: reuse their memory (allocator.py)
        self._codec_backends = sorted(codec_backends or ["software"])
        #: the dataset fingerprint (server/degradation/fingerprint.py): per-file entries and the hash over them
        self.dataset_files = list(dataset_files or [])
        self.dataset_fingerprint = fingerprint(self.dataset_files) if dataset_files else ""
        self.producer = producer
        #: the cores the server sized itself to (reported by GetInfo and as a metric)
        self.cpu_budget = cpu_budget or find_cpu_budget(getattr(producer, "cpus", None))
        self.cfg: DegradationConfig = producer.cfg
        self.dataset_name = dataset_name
        self.max_streams = max_streams
        self.max_waiting_streams = max_streams if max_waiting_streams is None else max(0, int(max_waiting_streams))
        self.idle_stream_seconds = float(idle_stream_seconds)
        self.max_video_batch = max_video_batch
        self.metrics = metrics or ServiceMetrics(queue_depth=lambda: producer.in_flight,
                                                 skipped_images=len(producer.folder.skipped))
        self.metrics.cpu_budget.set(self.cpu_budget.cores)
        #: stream slots: --max-streams of them, granted fairly; a bounded queue waits for them
        self._slots = FairShare(max_streams, max_waiting=self.max_waiting_streams)
        #: production tickets: one per batch a stream may have in the pool (workers + prefetch in all)
        self._tickets = FairShare(self.production_capacity)
        self.metrics.waiting_streams.set_function(lambda: self._slots.waiting)
        #: same-host delivery through shared memory (None: off, every client gets bytes)
        self.shared = SlotTable(timeout=slot_seconds, per_stream=slots_per_stream,
                                on_expired=self.metrics.slots_expired.inc) if shared_memory else None
        self.metrics.slots_leased.set_function(lambda: self.shared.leased if self.shared else 0)
        self._fallback_warned = False
        self._streams: dict[int, _Stream] = {}
        self._ids = count()
        self._lock = threading.Lock()
        self._draining = threading.Event()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_idle, name="idle-streams", daemon=True)
        self._watchdog.start()

    @property
    def production_capacity(self) -> int:
        """Batches the pool works on at once for all streams together (its workers + prefetch, at least 1)."""
        return max(1, self.producer.workers + self.producer.prefetch)

    def close(self) -> None:
        """Stop the idle watchdog and remove the shared-memory slots (after the gRPC server has stopped)."""
        self._closed.set()
        if self.shared is not None:
            self.shared.close()

    # ------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new streams (UNAVAILABLE); running streams end after their current batch."""
        self._draining.set()

    @property
    def active_streams(self) -> int:
        return self._slots.in_use

    @property
    def waiting_streams(self) -> int:
        return self._slots.waiting

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers (requests deserialized here; StreamBatches yields its chunks already serialized,
        so gRPC sends its bytes as they are: no response serializer)."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self.get_info, response_serializer=pb.ServerInfo.SerializeToString),
            "StreamBatches": grpc.unary_stream_rpc_method_handler(self.stream_batches, response_serializer=None),
            "ReleaseSlots": grpc.unary_unary_rpc_method_handler(
                self.release_slots, response_serializer=pb.SlotReleaseReply.SerializeToString),
        })

    # ------------------------------------------------------------------
    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.rejected.labels(code.name).inc()
        log.info("rejected %s: %s", code.name, message)
        context.abort(code, message)

    def _parse(self, raw: bytes, cls: type, context: grpc.ServicerContext) -> Any:
        msg = cls()
        try:
            msg.ParseFromString(raw)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"the request is not a valid degrade.v1.{cls.__name__} message: {exc}")
        return msg

    def get_info(self, raw: bytes, context: grpc.ServicerContext) -> pb.ServerInfo:
        req = self._parse(raw, pb.InfoRequest, context)
        try:
            cfg = resolve_config(self.cfg, req.config_overrides_json, max_video_batch=self.max_video_batch)
            plan = self.producer.plan(int(req.seed), int(req.epoch), cfg)
        except RequestError as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ServerInfo(
            version=package_version(), dataset_name=self.dataset_name,
            num_images=len(self.producer.folder.images), num_skipped_images=len(self.producer.folder.skipped),
            patches_per_epoch=plan.num_patches, batches_per_epoch=plan.num_batches,
            scale=cfg.scale, hr_patch_size=cfg.patch_size, lr_patch_size=cfg.lr_size,
            video_batch_size=cfg.video_batch_size, codec_backends=self.codec_backends(),
            device=self.device_name(), profile=self.cfg.profile, default_config_json=self.cfg.to_json(),
            max_streams=self.max_streams, max_indices_per_request=plan.num_batches,
            workers=self.producer.workers, dataset_fingerprint=self.dataset_fingerprint,
            dataset_files=[pb.DatasetFile(name=f.name, size=f.size, blake2b=f.blake2b, width=f.width, height=f.height)
                           for f in self.dataset_files] if req.include_dataset_files else [],
            config_json=cfg.to_json(), cpu_budget_cores=self.cpu_budget.cores,
            cpu_budget=self.cpu_budget.describe(),
            shared_memory_probe=(self.shared.probe_path() or "") if self.shared is not None else "",
        )

    def release_slots(self, raw: bytes, context: grpc.ServicerContext) -> pb.SlotReleaseReply:
        """A same-host client is done with these shared-memory slots."""
        req = self._parse(raw, pb.SlotRelease, context)
        return pb.SlotReleaseReply(released=self.shared.release(list(req.leases)) if self.shared else 0)

    def codec_backends(self) -> list[str]:
        return list(self._codec_backends)

    def device_name(self) -> str:
        dev = torch.device(self.producer.device)
        if dev.type == "cuda":
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        return str(dev)

    # ------------------------------------------------------------------
    def stream_batches(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Serialized ``PairChunk`` messages (server/service/chunks.py)."""
        req = self._parse(raw, pb.BatchRequest, context)
        if self._draining.is_set():
            self._reject(context, grpc.StatusCode.UNAVAILABLE,
                         "this server is shutting down; ask another server for these batches")
        try:
            job = validate_batch_request(req, self.cfg, self.producer.plan, max_video_batch=self.max_video_batch)
        except RequestError as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        client = context.peer() or "unknown"
        try:  # wait for a slot, fairly (see server/service/fairness.py)
            got = self._slots.acquire(client, 1, stop=lambda: self._draining.is_set() or not context.is_active())
        except QueueFull:
            got = -1
        if got < 0:
            self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this server already runs {self.max_streams} streams (its --max-streams) and "
                         f"{self.max_waiting_streams} more wait for a slot; retry later or ask another server")
        if got == 0:
            if self._draining.is_set():
                self._reject(context, grpc.StatusCode.UNAVAILABLE,
                             "this server is shutting down; ask another server for these batches")
            return  # the client went away while waiting
        stream = _Stream(next(self._ids), client, context)
        with self._lock:
            self._streams[stream.id] = stream
        self.metrics.active_streams.inc()
        self.metrics.streams_total.inc()
        try:
            yield from self._serve(job, context, stream)
        finally:
            with self._lock:
                self._streams.pop(stream.id, None)
            self._slots.release(client, 1)
            self.metrics.active_streams.dec()

    def _share(self) -> int:
        """Batches one stream may have in the pool at once: the pool's capacity shared by the active streams."""
        return max(1, math.ceil(self.production_capacity / max(1, self._slots.in_use)))

    def _pump(self, job: BatchJob, stream: _Stream, out: queue.SimpleQueue, cond: threading.Condition,
              stop: threading.Event) -> None:
        """Drive the producer for one stream (its own thread): take tickets, submit that many batches,
        hand each made batch to the sender and give its ticket back at once.  The next grant is asked
        for only when the sender has taken every batch made so far, so a stream whose client reads
        slowly holds no ticket and keeps at most one grant of batches in memory."""
        indices = list(job.indices)
        i = 0
        try:
            while i < len(indices) and not stop.is_set():
                with cond:
                    while stream.unsent and not stop.is_set():
                        cond.wait(0.5)
                if stop.is_set():
                    break
                held = self._tickets.acquire(stream.client, min(len(indices) - i, self._share()), stop=stop.is_set)
                if not held:
                    break
                grant, i = indices[i:i + held], i + held
                produced = self.producer.produce(job.seed, job.epoch, grant, want_hr=job.include_hr,
                                                 want_usm=job.include_hr_usm, cfg=job.cfg, window=held)
                try:
                    for result in produced:
                        self._tickets.release(stream.client, 1)
                        held -= 1
                        with cond:
                            stream.unsent += 1
                        out.put(result)
                        if stop.is_set():
                            break
                finally:
                    produced.close()
                    self._tickets.release(stream.client, held)  # batches the producer skipped or never made
        except BaseException as exc:  # noqa: BLE001 - the sender turns it into a status
            out.put(exc)
        else:
            out.put(_DONE)

    def _next_result(self, out: queue.SimpleQueue, context: grpc.ServicerContext) -> Any:
        while True:
            try:
                return out.get(timeout=0.5)
            except queue.Empty:
                if self._draining.is_set() or not context.is_active():
                    return None

    def _serve(self, job: BatchJob, context: grpc.ServicerContext, stream: _Stream) -> Iterator[bytes]:
        shared = self.shared if job.shared_memory else None
        proved = shared is not None and shared.verify(job.shared_memory_token)
        if shared is not None and not proved:  # bytes this time; the first message names the probe to read
            path = shared.probe_path()
            stream.prefix = string_field(SHARED_MEMORY_PROBE, path) if path else b""
        expected = iter(job.indices)
        out: queue.SimpleQueue = queue.SimpleQueue()
        cond = threading.Condition()
        stop = threading.Event()
        pump = threading.Thread(target=self._pump, args=(job, stream, out, cond, stop), daemon=True,
                                name=f"pump-{stream.id}")
        pump.start()
        try:
            while True:
                result = self._next_result(out, context)
                if result is None:  # shutting down, or the client went away, while the batch was being made
                    break
                if result is _DONE:
                    for k in expected:
                        yield from self._offer(stream, self._failed_chunk(job, k))
                    return
                if isinstance(result, BaseException):
                    raise result
                with cond:
                    stream.unsent -= 1
                    cond.notify_all()
                # batches the producer skipped (it reports them in its failures) come before this one
                for k in expected:
                    if k == result.batch_index:
                        break
                    yield from self._offer(stream, self._failed_chunk(job, k))
                self.metrics.codec_failures.inc(result.codec_failures)
                slot_msg = None
                if proved:
                    stream.offered_at = time.monotonic()  # waiting for slots back counts as not taking chunks
                    room = shared.wait_for_room(stream.id, lambda: stream.cancelled or self._draining.is_set()
                                                or not context.is_active())
                    stream.offered_at = None
                    if not room:
                        break
                    slot_msg = self._slot_chunk(job, result, stream)  # None: /dev/shm refused it, bytes instead
                if slot_msg is not None:
                    self.metrics.sent(len(result), 0)
                    self.metrics.batches.inc()
                    yield from self._offer(stream, slot_msg)
                else:
                    for chunk in batch_chunks(result, include_hr=job.include_hr, include_hr_usm=job.include_hr_usm,
                                              max_chunk_bytes=job.max_chunk_bytes,
                                              dataset_fingerprint=self.dataset_fingerprint):
                        # counted when handed to gRPC, so the counters never lag what a client has seen
                        self.metrics.sent(len(result) if chunk.last else 0, chunk.tensor_bytes)
                        if chunk.last:
                            self.metrics.batches.inc()
                        yield from self._offer(stream, chunk.data)
                if self._draining.is_set() or not context.is_active():
                    break
        except Exception as exc:  # noqa: BLE001 - the status must say what happened, never UNKNOWN
            if self._draining.is_set():  # the pool is closing under us: not a failure of this request
                self._reject(context, grpc.StatusCode.UNAVAILABLE,
                             "this server is shutting down; ask another server for the batches not yet received")
            log.exception("stream of epoch %d failed", job.epoch)
            self._reject(context, grpc.StatusCode.INTERNAL, f"the server failed while making batches: {exc}")
        finally:
            stop.set()
            with cond:
                cond.notify_all()
            if self.shared is not None and not context.is_active():  # the client went away (or was cancelled):
                self.shared.release_stream(stream.id)                  # the slots it did not give back go now
        if self._draining.is_set():
            self._reject(context, grpc.StatusCode.UNAVAILABLE,
                         "this server is shutting down; ask another server for the batches not yet received")

    @staticmethod
    def _offer(stream: _Stream, msg: bytes) -> Iterator[bytes]:
        """Yield one chunk; the idle watchdog sees it as offered until gRPC takes it (the generator resumes)."""
        if stream.prefix:  # fields for the stream's first message (serialized messages concatenate as a merge)
            msg, stream.prefix = stream.prefix + msg, b""
        stream.offered_at = time.monotonic()
        yield msg
        stream.offered_at = None

    def _slot_chunk(self, job: BatchJob, result: Any, stream: _Stream) -> bytes | None:
        """The batch as one PairChunk naming a shared-memory slot leased to ``stream``; None (send bytes)
        where no slot can be written."""
        fields = ["lr"] + [f for f, want in (("hr", job.include_hr), ("hr_usm", job.include_hr_usm))
                           if want and getattr(result, f) is not None]
        try:
            file = self.shared.file_for(result, fields)
        except OSError as exc:
            self.metrics.slot_fallbacks.inc()
            if not self._fallback_warned:
                self._fallback_warned = True
                log.warning("cannot write a shared-memory slot (%s); sending bytes to same-host clients "
                            "until it can", exc)
            return None
        lease = self.shared.lease(file, stream.id)
        where = {f: (dtype, shape, offset) for f, dtype, shape, offset in file.layout}
        slot = pb.SharedSlot(kind="file", path=file.path, lease=lease, size=file.size,
                             timeout_ms=int(self.shared.timeout * 1000),
                             tensors=[pb.SlotTensor(name=f, dtype=where[f][0], shape=where[f][1], offset=where[f][2])
                                      for f in fields])
        self.metrics.shared_batches.inc()
        self.metrics.shared_bytes.inc(sum(getattr(result, f).nbytes for f in fields))
        return slot_chunk(result, slot.SerializeToString(), dataset_fingerprint=self.dataset_fingerprint)

    def _watch_idle(self) -> None:
        """Cancel streams whose client has not accepted a chunk for ``idle_stream_seconds``; remove
        shared-memory slots not given back in time."""
        limit = self.idle_stream_seconds
        while not self._closed.wait(min(1.0, limit / 4) if limit > 0 else 1.0):
            if self.shared is not None:
                self.shared.expire()
            if limit <= 0:
                continue
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._streams.values()
                        if not s.cancelled and s.offered_at is not None and now - s.offered_at > limit]
                for s in idle:
                    s.cancelled = True
            for s in idle:
                self.metrics.idle_cancelled.inc()
                log.warning("stream %d of %s: no chunk accepted for %.0f s; cancelled to free its slot",
                            s.id, s.client, limit)
                cancel_with_status(s.context, grpc.StatusCode.ABORTED,
                                   f"stream idle for {limit:g} s: cancelled to free its slot "
                                   "(the server's --idle-stream-seconds); ask again for the batches not received")

    def _failed_chunk(self, job: BatchJob, index: int) -> bytes:
        reason = self.producer.failure_reason(job.epoch, index) or "unknown reason"
        self.metrics.batch_failures.inc()
        return pb.PairChunk(seed=job.seed, epoch=job.epoch, batch_index=index, last_chunk=True,
                            batch_error=f"video batch {index} of epoch {job.epoch} could not be made: {reason}"
                            ).SerializeToString()
