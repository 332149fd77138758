"""The worker pool: every core busy, memory bounded.

Measured on the 2-core development machine (see README "Performance"): the
codecs hold the GIL for part of their work and the torch image stages are
most efficient single-threaded per patch batch, so the pool runs one
single-threaded worker *process* per core, each making whole video batches.
At most ``workers + prefetch`` batches are in flight, so a slow consumer slows
production instead of growing memory.  ``workers=0`` runs inline in the
calling thread (tests, debugging, CUDA).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from server.codecs import CodecBackend, VideoRoundTrip
from server.degradation.config import DegradationConfig
from server.degradation.cpu_budget import cpu_budget
from server.degradation.engine import BatchResult, Engine
from server.degradation.epoch_plan import EpochPlan, PatchRef, make_epoch_plan
from server.degradation.images import ImageFolder, ImageInfo

from .shared_result import SharedBatch, share

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker process per core of the CPU budget (affinity, cgroup quota, ``$DEGRADE_CPUS``)."""
    return cpu_budget().cores


#: producers whose worker pool is running.  A process that exits without closing one (an exception, a
#: script that forgot) would otherwise wait at exit, in concurrent.futures' own exit hook, for the
#: batches its workers are still making - or for ever, if a worker cannot finish.  Our hook runs before
#: that one (hooks run in reverse order of registration) and ends those workers at once.
_OPEN_POOLS: "weakref.WeakSet[BatchProducer]" = weakref.WeakSet()


def _terminate_open_pools() -> None:
    for producer in list(_OPEN_POOLS):
        try:
            producer.close(terminate=True)
        except Exception:  # noqa: BLE001 - exiting anyway: the next producer must still be ended
            log.exception("could not end the worker pool of %r at exit", producer)


if hasattr(threading, "_register_atexit"):  # CPython >= 3.9: runs before the interpreter joins threads
    threading._register_atexit(_terminate_open_pools)


@dataclass(frozen=True)
class _Retired:
    """What ends a pool after ``shutdown(wait=False)``, which makes the executor forget it: its manager
    thread, its live dict of worker processes and the queue the workers send results on."""

    manager: threading.Thread | None
    procs: dict
    results: Any

    @property
    def running(self) -> bool:
        return self.manager is not None and self.manager.is_alive()


def _retire(pool: ProcessPoolExecutor) -> _Retired:
    """Shut ``pool`` down without waiting: its running batches still finish."""
    retired = _Retired(getattr(pool, "_executor_manager_thread", None),
                       getattr(pool, "_processes", None) or {},  # the live dict: a worker started meanwhile too
                       getattr(pool, "_result_queue", None))
    pool.shutdown(wait=False, cancel_futures=True)
    return retired


def _end_workers(pool: _Retired, *, terminate: bool) -> None:
    """Wait for a retired pool to finish its batches, or with ``terminate`` end its workers at once
    (SIGTERM, then SIGKILL after 5 s) and its manager thread with them."""
    if terminate:
        for proc in list(pool.procs.values()):
            proc.terminate()
        for proc in list(pool.procs.values()):
            proc.join(5)
            if proc.exitcode is None:
                log.warning("worker process %d ignored SIGTERM for 5 s; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        if pool.running and all(proc.exitcode is not None for proc in pool.procs.values()):
            # A worker ended while it was sending a batch leaves the manager thread reading the rest of that
            # message for ever: this process holds the pipe's other write end, so no end-of-file comes (it
            # then blocks interpreter exit; seen in CI).  Every worker is dead, so nothing writes there any
            # more: closing our end gives the reader its end-of-file, the pool counts as broken and ends.
            pool.manager.join(0.5)
            writer = getattr(pool.results, "_writer", None)
            if pool.running and writer is not None:
                writer.close()
    if pool.manager is None or pool.manager is threading.current_thread():
        return
    if terminate:
        pool.manager.join(5)
        if pool.manager.is_alive():
            log.warning("the worker pool's manager thread is still running 5 s after its workers ended")
        return
    dead_since = None
    while pool.manager.is_alive():  # the batches finish; unless a worker died mid-send and the pool is wedged
        pool.manager.join(1.0)
        if pool.running and any(proc.exitcode is not None for proc in list(pool.procs.values())):
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since >= WEDGE_SECONDS:
                log.error("a worker process died while sending a batch; ending its wedged pool")
                _end_workers(pool, terminate=True)
                return


#: how often a worker may die on the same batch before the batch is reported as failed
MAX_KILLS = 2

#: seconds a worker may lie dead before a pool that has not noticed is taken for wedged (see
#: :meth:`BatchProducer._check_wedged`); a pool notices an ordinary death within milliseconds
WEDGE_SECONDS = 10.0


# --- worker process state -------------------------------------------------
_WORKER: dict = {}


def _init_worker(root: str, images: list[ImageInfo], cfg_dict: dict, device: str, keep_precodec: bool,
                 backend: CodecBackend | None = None, time_stages: bool = False, store: str | None = None) -> None:
    # One compute thread per worker process, whatever the budget: parallelism comes from the processes.
    # Several OpenMP threads in one worker spin at every barrier while they wait for each other, and when
    # the scheduler gives this process less CPU than it has threads (a busy neighbour in another session,
    # a cgroup quota, --workers below the core count) the spinning thread burns the share the working one
    # needed: a 1-worker server with 2 threads fell from ~30 to ~1 pair/s beside one busy process.
    torch.set_num_threads(1)
    cfg = DegradationConfig.from_dict(cfg_dict)
    _WORKER["folder"] = ImageFolder(root, cfg.patch_size, images=images, store=store)  # the store: mapped by path
    _WORKER["engines"] = _EngineCache(cfg, device, keep_precodec, backend, time_stages)


class _EngineCache:
    """One engine per config seen (the default plus a few request overrides), least recent evicted."""

    SIZE = 4

    def __init__(self, default: DegradationConfig, device: str, keep_precodec: bool = False,
                 backend: CodecBackend | None = None, time_stages: bool = False):
        self.default, self.device, self.keep_precodec, self.backend = default, device, keep_precodec, backend
        self.time_stages = time_stages
        self._engines: OrderedDict[str | None, Engine] = OrderedDict()

    def get(self, cfg_json: str | None) -> Engine:
        engine = self._engines.get(cfg_json)
        if engine is None:
            cfg = self.default if cfg_json is None else DegradationConfig.from_dict(json.loads(cfg_json))
            engine = self._engines[cfg_json] = Engine(cfg, device=self.device, keep_precodec=self.keep_precodec,
                                                        codec=VideoRoundTrip(self.backend), time_stages=self.time_stages)
            while len(self._engines) > self.SIZE:
                self._engines.popitem(last=False)
        self._engines.move_to_end(cfg_json)
        return engine


def _work(cfg_json: str | None, seed: int, epoch: int, index: int, refs: tuple[PatchRef, ...], want_hr: bool,
          want_usm: bool) -> SharedBatch | BatchResult:
    """One batch, in a worker; it reaches the consumer through shared memory (server/pipeline/shared_result.py)."""
    return share(_WORKER["engines"].get(cfg_json).make_batch_from_refs(_WORKER["folder"], seed, epoch, index, refs,
                                                                       want_hr=want_hr, want_usm=want_usm))


class BatchProducer:
    """Makes video batches for (seed, epoch, indices) on a pool of worker processes.

    Thread-safe: several consumers (e.g. one per gRPC stream) may call
    :meth:`produce_jobs` at once; they share the worker processes, each keeping
    at most ``workers + prefetch`` of its own batches in flight.

    This is the *whole-batch* pipeline (``--pipeline batch``): each worker makes
    whole batches on the CPU.  ``server.pipeline.split.SplitProducer`` has the
    same interface and splits a batch between a device stage and the pool.
    """

    #: the name of ``--pipeline`` this class implements
    pipeline = "batch"
    #: whether worker processes may run beside a GPU engine (the whole-batch path runs in-process there)
    pool_with_gpu = False

    def __init__(self, folder: ImageFolder, cfg: DegradationConfig, *, workers: int | None = None,
                 device: str = "cpu", prefetch: int | None = None, keep_precodec: bool = False,
                 backend: CodecBackend | None = None, time_stages: bool = False, cpus: int | None = None):
        self.folder = folder
        self.time_stages = time_stages
        self.backend = backend  # None: the software codecs
        self.keep_precodec = keep_precodec
        self.cfg = cfg
        self.device = device
        #: the CPU budget in cores (server.degradation.cpu_budget) this producer sizes itself to
        self.cpus = default_workers() if cpus is None else max(1, int(cpus))
        self.workers = self.default_pool_size(self.cpus) if workers is None else max(0, int(workers))
        if device != "cpu" and self.workers > 0 and not self.pool_with_gpu:
            log.info("device %s: running the engine in-process (one GPU feeder)", device)
            self.workers = 0
        if self.workers > self.cpus:
            log.warning("%d worker processes on a CPU budget of %d core(s): they share it (each single-threaded, "
                        "so each is slower, none stalls)", self.workers, self.cpus)
        self.prefetch = self.workers if prefetch is None else max(0, prefetch)
        self._lock = threading.RLock()
        self._plans: OrderedDict[tuple[str | None, int, int], EpochPlan] = OrderedDict()
        self._pool: ProcessPoolExecutor | None = None
        #: pools dropped by a restart, maybe still finishing a batch
        self._retired: list[_Retired] = []
        self._generation = 0  # bumped at each pool restart, so one broken pool is restarted once
        self._dead_since: dict[int, float] = {}  # dead workers of the current pool, and since when
        self._closed = False
        self._engines: _EngineCache | None = None
        self._inline_lock = threading.Lock()  # one in-process engine: one batch at a time
        #: batches submitted and not yet handed to their consumer (all consumers together)
        self.in_flight = 0
        #: batches that could not be made, as ((epoch, index), reason); the run goes on without them
        #: (the latest 10,000, so that a long-running server's memory stays bounded)
        self.failures: deque[tuple[tuple[int, int], str]] = deque(maxlen=10_000)

    @staticmethod
    def default_pool_size(cpus: int) -> int:
        """Worker processes when none are asked for: one per core of the budget."""
        return max(1, cpus)

    # ------------------------------------------------------------------
    def _cfg_key(self, cfg: DegradationConfig | None) -> str | None:
        return None if cfg is None or cfg == self.cfg else cfg.to_json()

    def plan(self, seed: int, epoch: int, cfg: DegradationConfig | None = None) -> EpochPlan:
        key = (self._cfg_key(cfg), seed, epoch)
        with self._lock:
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
                return found
        made = make_epoch_plan(self.folder.images, cfg or self.cfg, seed, epoch)
        with self._lock:
            self._plans[key] = made
            while len(self._plans) > 16:
                self._plans.popitem(last=False)
        return made

    def _ensure_pool(self) -> tuple[ProcessPoolExecutor, int]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the batch producer was shut down")
            if self._pool is None:
                initializer, initargs = self._pool_initializer()
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("forkserver"),
                                                 initializer=initializer, initargs=initargs)
                _OPEN_POOLS.add(self)
            return self._pool, self._generation

    def _pool_initializer(self) -> tuple:
        """``(initializer, initargs)`` of the worker processes."""
        return _init_worker, (str(self.folder.root), self.folder.images, self.cfg.to_dict(), self.device,
                              self.keep_precodec, self.backend, self.time_stages, self.folder.store_path)

    def produce(self, seed: int, epoch: int, indices: Iterable[int], *, want_hr: bool = True,
                want_usm: bool = True, cfg: DegradationConfig | None = None,
                window: int | None = None) -> Iterator[BatchResult]:
        """Yield the batches of ``indices`` of one epoch in order (see :meth:`produce_jobs`)."""
        return self.produce_jobs(seed, [(epoch, k) for k in indices], want_hr=want_hr, want_usm=want_usm, cfg=cfg,
                                 window=window)

    def produce_jobs(self, seed: int, jobs: Iterable[tuple[int, int]], *, want_hr: bool = True,
                     want_usm: bool = True, cfg: DegradationConfig | None = None,
                     window: int | None = None) -> Iterator[BatchResult]:
        """Yield the batches named by ``(epoch, index)`` pairs, in order, keeping every worker busy
        across epoch boundaries, with at most ``window`` (default workers + prefetch) batches in flight.

        ``cfg`` (default: the producer's) must keep the producer's patch size, which the
        image folder was scanned for.
        """
        if cfg is not None and cfg.patch_size != self.cfg.patch_size:
            raise ValueError(f"patch_size {cfg.patch_size} differs from the folder's {self.cfg.patch_size}")
        jobs = list(jobs)
        for epoch, k in jobs:
            plan = self.plan(seed, epoch, cfg)
            if not 0 <= k < plan.num_batches:
                raise IndexError(f"video batch {k} out of range: epoch {epoch} has {plan.num_batches} batches")
        window = self.workers + self.prefetch if window is None else max(1, int(window))
        return self._run(seed, jobs, want_hr, want_usm, cfg, window)

    def _count(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def _run(self, seed: int, jobs: list[tuple[int, int]], want_hr: bool, want_usm: bool,
             cfg: DegradationConfig | None, window: int) -> Iterator[BatchResult]:
        cfg_key = self._cfg_key(cfg)
        if self.workers == 0:
            for epoch, k in jobs:
                self._count(1)
                try:
                    with self._inline_lock:
                        if self._engines is None:
                            self._engines = _EngineCache(self.cfg, self.device, self.keep_precodec, self.backend,
                                                         self.time_stages)
                        engine = self._engines.get(cfg_key)
                        result = engine.make_batch(self.folder, self.plan(seed, epoch, cfg), k, want_hr=want_hr,
                                                   want_usm=want_usm)
                except (ValueError, OSError) as exc:
                    self._failed((epoch, k), exc)
                    continue
                finally:
                    self._count(-1)
                yield result
            return
        pending: deque[tuple[tuple[int, int], int, Future]] = deque()
        todo = iter(jobs)
        kills: dict[tuple[int, int], int] = {}

        def submit(job: tuple[int, int]) -> None:
            epoch, k = job
            refs = self.plan(seed, epoch, cfg).batch(k)
            pool, generation = self._ensure_pool()
            pending.append((job, generation, pool.submit(_work, cfg_key, seed, epoch, k, refs, want_hr, want_usm)))
            self._count(1)

        def submit_next() -> None:
            for nxt in todo:
                submit(nxt)
                break

        try:
            for job in todo:
                submit(job)
                if len(pending) >= window:
                    break
            while pending:
                job, generation, fut = pending.popleft()
                self._count(-1)
                try:
                    result = self._result(fut)
                except BrokenProcessPool:
                    if self._closed:  # close(terminate=True) ended the workers: nobody waits for this batch
                        return
                    kills[job] = kills.get(job, 0) + 1
                    retry = [other for other, _, _ in pending]  # their futures broke with the pool
                    self._count(-len(pending))
                    pending.clear()
                    self._restart(generation)
                    if kills[job] > MAX_KILLS:  # a batch that crashes any worker: reported, the run goes on
                        self._failed(job, RuntimeError(f"batch {job} killed its worker process {kills[job]} times; "
                                                       "giving up on it"))
                    else:
                        log.error("a worker process died while making batch %s; restarting the pool", job)
                        retry.insert(0, job)
                    for r in retry:
                        submit(r)
                    if len(pending) < window:
                        submit_next()
                    continue
                except (ValueError, OSError) as exc:  # e.g. an image changed on disk since the scan
                    self._failed(job, exc)
                    submit_next()
                    continue
                submit_next()
                yield result
        finally:
            for _, _, fut in pending:
                fut.cancel()
            self._count(-len(pending))

    def _result(self, fut: Future):
        """``fut.result()``, checking every second that the pool is not wedged."""
        while True:
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if fut.done():  # the batch itself raised TimeoutError
                    raise
                self._check_wedged()

    def _check_wedged(self) -> None:
        """End the pool if one of its workers has been dead for :data:`WEDGE_SECONDS` without the pool noticing.

        That worker died while it was sending a batch (say, killed for memory while pickling one): the
        pool's manager thread waits for the rest of that message for ever, and would never report the
        death.  Ending the whole pool breaks it the ordinary way, so its batches are made again like
        those of any worker that dies."""
        now = time.monotonic()
        with self._lock:
            pool = self._pool
            if pool is None or getattr(pool, "_broken", False):
                return
            procs = getattr(pool, "_processes", None) or {}
            dead = [pid for pid, proc in list(procs.items()) if proc.exitcode is not None]
            self._dead_since = {pid: self._dead_since.get(pid, now) for pid in dead}
            if not any(now - since >= WEDGE_SECONDS for since in self._dead_since.values()):
                return
            log.error("worker process(es) %s died while sending a batch and the pool did not notice in %.0f s; "
                      "ending the pool, its batches are made again", sorted(dead), WEDGE_SECONDS)
            retired = _retire(pool)
            self._pool, self._dead_since = None, {}
            self._generation += 1
        _end_workers(retired, terminate=True)

    def _failed(self, job: tuple[int, int], exc: BaseException) -> None:
        log.error("video batch %d of epoch %d could not be made and is skipped: %s", job[1], job[0], exc)
        with self._lock:
            self.failures.append((job, str(exc)))

    def failure_reason(self, epoch: int, index: int) -> str | None:
        """Why batch ``index`` of ``epoch`` was skipped (the latest report), or None."""
        with self._lock:
            for job, reason in reversed(self.failures):
                if job == (epoch, index):
                    return reason
        return None

    def _restart(self, generation: int | None = None) -> None:
        """Drop the pool (if it is still the one of ``generation``); the next submit starts a new one."""
        with self._lock:
            if self._pool is not None and (generation is None or generation == self._generation):
                # its running batches still finish (their callbacks may resubmit); close() ends it for good
                self._retired = [r for r in self._retired if r.running]
                self._retired.append(_retire(self._pool))
                self._pool = None
                self._generation += 1

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (for memory accounting)."""
        procs = getattr(self._pool, "_processes", None) or {}
        return list(procs)

    def close(self, *, terminate: bool = False) -> None:
        """Stop the worker processes: after their current batch, or at once with ``terminate``
        (a server shutting down does not wait for batches nobody will receive)."""
        with self._lock:
            pools = self._retired + ([_retire(self._pool)] if self._pool is not None else [])
            self._pool, self._retired = None, []
            self._closed = self._closed or terminate
            _OPEN_POOLS.discard(self)
        for pool in pools:
            _end_workers(pool, terminate=terminate)

    def __enter__(self) -> "BatchProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
