"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ServiceMetrics:
    """Counters and gauges of the degradation service, exported at ``/metrics``."""

    def __init__(self, *, queue_depth: Callable[[], float], skipped_images: int, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.pairs = Counter("degrade_pairs", "LR/HR pairs sent to clients", registry=r)
        self.bytes_sent = Counter("degrade_bytes_sent", "tensor bytes sent to clients", registry=r)
        self.batches = Counter("degrade_batches", "video batches sent to clients", registry=r)
        self.batch_failures = Counter("degrade_batch_failures", "video batches that could not be made", registry=r)
        self.codec_failures = Counter("degrade_codec_failures",
                                      "video batches whose first codec attempt failed (retried or fell back)",
                                      registry=r)
        self.rejected = Counter("degrade_requests_rejected", "requests refused, by gRPC status code",
                                ["code"], registry=r)
        self.streams_total = Counter("degrade_streams", "StreamBatches calls accepted", registry=r)
        self.active_streams = Gauge("degrade_active_streams", "StreamBatches calls in progress", registry=r)
        self.waiting_streams = Gauge("degrade_waiting_streams",
                                     "StreamBatches calls waiting for a slot (all --max-streams in use)", registry=r)
        self.idle_cancelled = Counter("degrade_idle_streams_cancelled",
                                      "streams cancelled because their client accepted no chunk for "
                                      "--idle-stream-seconds", registry=r)
        self.shared_batches = Counter("degrade_shared_memory_batches",
                                      "video batches delivered through a same-host shared-memory slot", registry=r)
        self.shared_bytes = Counter("degrade_shared_memory_bytes",
                                    "tensor bytes delivered through shared-memory slots (not sent)", registry=r)
        self.slots_leased = Gauge("degrade_shared_memory_slots",
                                  "shared-memory slots handed to clients and not given back yet", registry=r)
        self.slots_expired = Counter("degrade_shared_memory_slots_expired",
                                     "shared-memory slots removed because their client did not give them back "
                                     "in time (--slot-seconds)", registry=r)
        self.slot_fallbacks = Counter("degrade_shared_memory_fallbacks",
                                      "batches sent as bytes to a same-host client because no slot could be "
                                      "written (/dev/shm full or missing)", registry=r)
        self.queue = Gauge("degrade_queue_depth", "video batches being made or waiting to be sent", registry=r)
        self.queue.set_function(queue_depth)
        self.skipped = Gauge("degrade_skipped_images", "images of the dataset rejected at scan", registry=r)
        self.skipped.set(skipped_images)
        self.cpu_budget = Gauge("degrade_cpu_budget_cores",
                                "cores the server sized its workers and threads to (affinity, cgroup quota, --cpus)",
                                registry=r)
        self.rate = Gauge("degrade_pairs_per_second", "pairs sent per second over the last window", registry=r)
        self.rate.set_function(self._pairs_per_second)
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def sent(self, pairs: int, nbytes: int) -> None:
        self.pairs.inc(pairs)
        self.bytes_sent.inc(nbytes)
        now = time.monotonic()
        with self._lock:
            self._events.append((now, pairs))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()

    def _pairs_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self._window_s

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Export ``/metrics`` over HTTP; returns (http server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
