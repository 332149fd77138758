"""The ``degrade.v1.Degrader`` gRPC service: GetInfo and StreamBatches.

Requests arrive as raw bytes and are parsed here, so that even a message that
is not a valid protobuf gets INVALID_ARGUMENT (gRPC's own deserializer would
answer INTERNAL).  Every request is validated before any work; any failure
inside becomes a status with a message, never UNKNOWN.

Backpressure: a stream's generator is pulled by gRPC only as fast as the
client reads (HTTP/2 flow control), and each stream keeps a bounded window of
batches in flight in the shared worker pool, so a slow client slows its own
stream and server memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from importlib import metadata
from typing import Any, Iterator

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from client.protocol import degrade_pb2 as pb

from .config import DegradationConfig
from .engine import BatchResult
from .fingerprint import FileDigest, fingerprint
from .metrics import ServiceMetrics
from .pool import BatchProducer
from .requests import BatchJob, RequestError, resolve_config, validate_batch_request

log = logging.getLogger(__name__)

SERVICE_NAME = "degrade.v1.Degrader"


def package_version() -> str:
    try:
        return metadata.version("vcisr-degrade")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _tensor(arr: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=str(arr.dtype), shape=list(arr.shape), data=np.ascontiguousarray(arr).tobytes())


def batch_chunks(result: BatchResult, job: BatchJob,
                 dataset_fingerprint: str = "") -> Iterator[tuple[pb.PairChunk, int]]:
    """Split one batch into messages of whole patches below ``job.max_chunk_bytes``.

    Yields (message, tensor bytes in it)."""
    n = len(result)
    records = [json.dumps(r, separators=(",", ":"), default=str) for r in result.records]
    per_patch = result.lr[0].nbytes
    if job.include_hr and result.hr is not None:
        per_patch += result.hr[0].nbytes
    if job.include_hr_usm and result.hr_usm is not None:
        per_patch += result.hr_usm[0].nbytes
    budget = job.max_chunk_bytes - 4096  # room for the message's own fields
    lo = 0
    while lo < n:
        hi, size = lo, 0
        while hi < n and (hi == lo or size + per_patch + len(records[hi]) + 64 <= budget):
            size += per_patch + len(records[hi]) + 64
            hi += 1
        msg = pb.PairChunk(
            seed=result.seed, epoch=result.epoch, batch_index=result.batch_index, batch_size=n, first_patch=lo,
            lr=_tensor(result.lr[lo:hi]),
            patch_ids=[r["patch_id"] for r in result.records[lo:hi]], records_json=records[lo:hi],
            last_chunk=hi == n, dataset_fingerprint=dataset_fingerprint,
        )
        nbytes = result.lr[lo:hi].nbytes
        if job.include_hr and result.hr is not None:
            msg.hr.CopyFrom(_tensor(result.hr[lo:hi]))
            nbytes += result.hr[lo:hi].nbytes
        if job.include_hr_usm and result.hr_usm is not None:
            msg.hr_usm.CopyFrom(_tensor(result.hr_usm[lo:hi]))
            nbytes += result.hr_usm[lo:hi].nbytes
        yield msg, nbytes
        lo = hi


class DegradeService:
    """Serves one dataset with one worker pool to any number of clients (up to ``max_streams`` at once)."""

    def __init__(self, producer: BatchProducer, *, dataset_name: str, max_streams: int, max_video_batch: int = 256,
                 metrics: ServiceMetrics | None = None, codec_backends: list[str] | None = None,
                 dataset_files: list[FileDigest] | None = None):
        self._codec_backends = sorted(codec_backends or ["software"])
        #: the dataset fingerprint (server/fingerprint.py): per-file entries and the hash over them
        self.dataset_files = list(dataset_files or [])
        self.dataset_fingerprint = fingerprint(self.dataset_files) if dataset_files else ""
        self.producer = producer
        self.cfg: DegradationConfig = producer.cfg
        self.dataset_name = dataset_name
        self.max_streams = max_streams
        self.max_video_batch = max_video_batch
        self.metrics = metrics or ServiceMetrics(queue_depth=lambda: producer.in_flight,
                                                 skipped_images=len(producer.folder.skipped))
        self._active = 0
        self._lock = threading.Lock()
        self._draining = threading.Event()

    # ------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new streams (UNAVAILABLE); running streams end after their current batch."""
        self._draining.set()

    @property
    def active_streams(self) -> int:
        return self._active

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers (requests deserialized here, responses by protobuf)."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self.get_info, response_serializer=pb.ServerInfo.SerializeToString),
            "StreamBatches": grpc.unary_stream_rpc_method_handler(
                self.stream_batches, response_serializer=pb.PairChunk.SerializeToString),
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
            config_json=cfg.to_json(),
        )

    def codec_backends(self) -> list[str]:
        return list(self._codec_backends)

    def device_name(self) -> str:
        dev = torch.device(self.producer.device)
        if dev.type == "cuda":
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        return str(dev)

    # ------------------------------------------------------------------
    def stream_batches(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.PairChunk]:
        req = self._parse(raw, pb.BatchRequest, context)
        if self._draining.is_set():
            self._reject(context, grpc.StatusCode.UNAVAILABLE,
                         "this server is shutting down; ask another server for these batches")
        try:
            job = validate_batch_request(req, self.cfg, self.producer.plan, max_video_batch=self.max_video_batch)
        except RequestError as exc:
            self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            if self._active >= self.max_streams:
                full = True
            else:
                full = False
                self._active += 1
        if full:
            self._reject(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this server already runs {self.max_streams} streams (its --max-streams); "
                         "retry later or ask another server")
        self.metrics.active_streams.inc()
        self.metrics.streams_total.inc()
        try:
            yield from self._serve(job, context)
        finally:
            with self._lock:
                self._active -= 1
            self.metrics.active_streams.dec()

    def _window(self) -> int:
        """Batches one stream keeps in flight: the pool's capacity shared by the active streams."""
        p = self.producer
        return max(1, math.ceil((p.workers + p.prefetch) / max(1, self._active)))

    def _serve(self, job: BatchJob, context: grpc.ServicerContext) -> Iterator[pb.PairChunk]:
        expected = iter(job.indices)
        produced = self.producer.produce(job.seed, job.epoch, job.indices, want_hr=job.include_hr,
                                         want_usm=job.include_hr_usm, cfg=job.cfg, window=self._window())
        try:
            for result in produced:
                # batches the producer skipped (it reports them in its failures) come before this one
                for k in expected:
                    if k == result.batch_index:
                        break
                    yield self._failed_chunk(job, k)
                self.metrics.codec_failures.inc(result.codec_failures)
                for msg, nbytes in batch_chunks(result, job, self.dataset_fingerprint):
                    # counted when handed to gRPC, so the counters never lag what a client has seen
                    self.metrics.sent(len(result) if msg.last_chunk else 0, nbytes)
                    if msg.last_chunk:
                        self.metrics.batches.inc()
                    yield msg
                if self._draining.is_set() or not context.is_active():
                    break
            else:
                for k in expected:
                    yield self._failed_chunk(job, k)
                return
        except Exception as exc:  # noqa: BLE001 - the status must say what happened, never UNKNOWN
            if self._draining.is_set():  # the pool is closing under us: not a failure of this request
                self._reject(context, grpc.StatusCode.UNAVAILABLE,
                             "this server is shutting down; ask another server for the batches not yet received")
            log.exception("stream of epoch %d failed", job.epoch)
            self._reject(context, grpc.StatusCode.INTERNAL, f"the server failed while making batches: {exc}")
        finally:
            produced.close()
        if self._draining.is_set():
            self._reject(context, grpc.StatusCode.UNAVAILABLE,
                         "this server is shutting down; ask another server for the batches not yet received")

    def _failed_chunk(self, job: BatchJob, index: int) -> pb.PairChunk:
        reason = self.producer.failure_reason(job.epoch, index) or "unknown reason"
        self.metrics.batch_failures.inc()
        return pb.PairChunk(seed=job.seed, epoch=job.epoch, batch_index=index, last_chunk=True,
                            batch_error=f"video batch {index} of epoch {job.epoch} could not be made: {reason}")
