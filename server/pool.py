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

import logging
import multiprocessing as mp
import os
from collections import OrderedDict, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

import torch

from .config import DegradationConfig
from .engine import BatchResult, Engine
from .epoch_plan import EpochPlan, PatchRef, make_epoch_plan
from .images import ImageFolder, ImageInfo

log = logging.getLogger(__name__)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# --- worker process state -------------------------------------------------
_WORKER: dict = {}


def _init_worker(root: str, images: list[ImageInfo], cfg_dict: dict, device: str, threads: int,
                 keep_precodec: bool) -> None:
    torch.set_num_threads(threads)
    cfg = DegradationConfig.from_dict(cfg_dict)
    _WORKER["folder"] = ImageFolder(root, cfg.patch_size, images=images)
    _WORKER["engine"] = Engine(cfg, device=device, keep_precodec=keep_precodec)


def _work(seed: int, epoch: int, index: int, refs: tuple[PatchRef, ...], want_hr: bool,
          want_usm: bool) -> BatchResult:
    return _WORKER["engine"].make_batch_from_refs(_WORKER["folder"], seed, epoch, index, refs,
                                                  want_hr=want_hr, want_usm=want_usm)


class BatchProducer:
    """Makes video batches for (seed, epoch, indices) on a pool of worker processes."""

    def __init__(self, folder: ImageFolder, cfg: DegradationConfig, *, workers: int | None = None,
                 device: str = "cpu", prefetch: int | None = None, keep_precodec: bool = False):
        self.folder = folder
        self.keep_precodec = keep_precodec
        self.cfg = cfg
        self.device = device
        self.workers = default_workers() if workers is None else max(0, int(workers))
        if device != "cpu" and self.workers > 0:
            log.info("device %s: running the engine in-process (one GPU feeder)", device)
            self.workers = 0
        self.prefetch = self.workers if prefetch is None else max(0, prefetch)
        self._plans: OrderedDict[tuple[int, int], EpochPlan] = OrderedDict()
        self._pool: ProcessPoolExecutor | None = None
        self._engine: Engine | None = None
        #: batches that could not be made, as ((epoch, index), reason); the run goes on without them
        self.failures: list[tuple[tuple[int, int], str]] = []

    # ------------------------------------------------------------------
    def plan(self, seed: int, epoch: int) -> EpochPlan:
        key = (seed, epoch)
        if key not in self._plans:
            self._plans[key] = make_epoch_plan(self.folder.images, self.cfg, seed, epoch)
            while len(self._plans) > 4:
                self._plans.popitem(last=False)
        return self._plans[key]

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            threads = max(1, default_workers() // max(1, self.workers))
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("forkserver"),
                initializer=_init_worker,
                initargs=(str(self.folder.root), self.folder.images, self.cfg.to_dict(), self.device, threads,
                          self.keep_precodec),
            )
        return self._pool

    def produce(self, seed: int, epoch: int, indices: Iterable[int], *, want_hr: bool = True,
                want_usm: bool = True) -> Iterator[BatchResult]:
        """Yield the batches of ``indices`` of one epoch in order (see :meth:`produce_jobs`)."""
        return self.produce_jobs(seed, [(epoch, k) for k in indices], want_hr=want_hr, want_usm=want_usm)

    def produce_jobs(self, seed: int, jobs: Iterable[tuple[int, int]], *, want_hr: bool = True,
                     want_usm: bool = True) -> Iterator[BatchResult]:
        """Yield the batches named by ``(epoch, index)`` pairs, in order, keeping every worker busy
        across epoch boundaries, with at most workers + prefetch batches in flight."""
        jobs = list(jobs)
        for epoch, k in jobs:
            plan = self.plan(seed, epoch)
            if not 0 <= k < plan.num_batches:
                raise IndexError(f"video batch {k} out of range: epoch {epoch} has {plan.num_batches} batches")
        return self._run(seed, jobs, want_hr, want_usm)

    def _run(self, seed: int, jobs: list[tuple[int, int]], want_hr: bool, want_usm: bool) -> Iterator[BatchResult]:
        if self.workers == 0:
            if self._engine is None:
                self._engine = Engine(self.cfg, device=self.device, keep_precodec=self.keep_precodec)
            for epoch, k in jobs:
                try:
                    result = self._engine.make_batch(self.folder, self.plan(seed, epoch), k, want_hr=want_hr,
                                                     want_usm=want_usm)
                except (ValueError, OSError) as exc:
                    self._failed((epoch, k), exc)
                    continue
                yield result
            return
        window = self.workers + self.prefetch
        pending: deque[tuple[tuple[int, int], Future]] = deque()
        todo = iter(jobs)
        restarted: set[tuple[int, int]] = set()

        def submit(job: tuple[int, int]) -> None:
            epoch, k = job
            refs = self.plan(seed, epoch).batch(k)
            pending.append((job, self._ensure_pool().submit(_work, seed, epoch, k, refs, want_hr, want_usm)))

        try:
            for job in todo:
                submit(job)
                if len(pending) >= window:
                    break
            while pending:
                job, fut = pending.popleft()
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    if job in restarted:
                        raise RuntimeError(f"batch {job} killed its worker process twice; giving up") from None
                    restarted.add(job)
                    log.error("a worker process died while making batch %s; restarting the pool", job)
                    retry = [job] + [other for other, _ in pending]
                    pending.clear()
                    self._restart()
                    for r in retry:
                        submit(r)
                    continue
                except (ValueError, OSError) as exc:  # e.g. an image changed on disk since the scan
                    self._failed(job, exc)
                    for nxt in todo:
                        submit(nxt)
                        break
                    continue
                for nxt in todo:
                    submit(nxt)
                    break
                yield result
        finally:
            for _, fut in pending:
                fut.cancel()

    def _failed(self, job: tuple[int, int], exc: BaseException) -> None:
        log.error("video batch %d of epoch %d could not be made and is skipped: %s", job[1], job[0], exc)
        self.failures.append((job, str(exc)))

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (for memory accounting)."""
        procs = getattr(self._pool, "_processes", None) or {}
        return list(procs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "BatchProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
