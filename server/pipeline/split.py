"""The split pipeline: image stages on the device, HR decoding and codec round trips on every core.

``--pipeline split``, the default whenever the engine's device is not the CPU.
A video batch travels through three places, each bounded::

    pool worker          device stage (main process)        pool worker          consumer
    HR decode + crop  -> USM, 1st/2nd order, ending     -> video block       -> copy out, records
    (slot.hr)            (slot.usm, slot.frames)            (slot.lr)

* the **device stage** is one thread, the only owner of the GPU.  It takes the
  batches whose HR crops are loaded, up to ``group`` at a time, issues all their
  device work back to back and only then copies their results to the host, so
  the GPU never idles while Python waits on a copy between two batches;
* the **pool** (``workers`` processes, by default every core but the one the
  device stage uses) decodes and crops HR images and runs the video block
  (software encode + decode, or whatever the codec plan's backend does);
* arrays cross processes through preallocated shared-memory **slots**
  (``server.pipeline.shared_slots``), one per batch in flight: only a few bytes of
  parameters are pickled.  The slot count bounds memory; a consumer that stops
  reading keeps its slots, so the pipeline stops with it (backpressure).

Every step calls the same functions as the whole-batch path
(:func:`server.degradation.engine.crop_patches`, :meth:`Engine.device_stage`,
:func:`server.degradation.engine.video_block`), so on the CPU both give the same bytes and
the same records.  A worker that dies is replaced and its task (load or codec,
whose input is still in the slot) runs again; a batch that kills workers
three times is reported as failed, like any batch that cannot be made.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from server.codecs import CodecBackend, VideoRoundTrip
from server.degradation.config import DegradationConfig
from server.degradation.engine import NO_CODEC, BatchResult, DeviceOutput, Engine, crop_patches, video_block
from server.degradation.epoch_plan import PatchRef
from server.degradation.images import ImageFolder, ImageInfo

from .batch import MAX_KILLS, BatchProducer, _EngineCache
from .shared_slots import Slot, SlotPool, SlotSpec, attach, detach

log = logging.getLogger(__name__)

# --- worker processes ------------------------------------------------------
_WORKER: dict = {}


def _init_worker(root: str, images: list[ImageInfo], patch_size: int, backend: CodecBackend | None,
                 store: str | None = None) -> None:
    torch.set_num_threads(1)  # the workers decode and code; torch is not used there
    _WORKER["folder"] = ImageFolder(root, patch_size, images=images, store=store)  # the store: mapped by path
    _WORKER["codec"] = VideoRoundTrip(backend)


def _load_task(spec: SlotSpec, refs: tuple[PatchRef, ...]) -> float:
    """Decode (or copy from the pixel store's map) and crop the HR patches of a batch into ``slot.hr``;
    returns the busy seconds."""
    t0 = time.perf_counter()
    slot = attach(spec)
    try:
        crop_patches(_WORKER["folder"], refs, spec.patch, out=slot.hr[:len(refs)])
    finally:
        detach(slot)
    return time.perf_counter() - t0


def _codec_task(spec: SlotSpec, n: int, video) -> tuple[dict, float]:
    """The video block on ``slot.frames[:n]`` into ``slot.lr[:n]``; returns the codec outcome and busy seconds."""
    t0 = time.perf_counter()
    slot = attach(spec)
    try:
        out, info = video_block(slot.frames[:n], video, _WORKER["codec"])
        slot.lr[:n] = out
    finally:
        detach(slot)
    return info, time.perf_counter() - t0


# --- one batch on its way ---------------------------------------------------
@dataclass(eq=False)
class _Job:
    seed: int
    epoch: int
    index: int
    refs: tuple[PatchRef, ...]
    cfg_key: str | None
    want_hr: bool
    want_usm: bool
    slot: Slot
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    params: Any = None
    codec_info: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    kills: int = 0
    abandoned: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.index)

    @property
    def n(self) -> int:
        return len(self.refs)


class SplitProducer(BatchProducer):
    """:class:`~server.pipeline.batch.BatchProducer`'s interface on the split pipeline (see the module docstring).

    ``workers``: pool processes (default: every core but one; at least one).
    ``group``: batches per device launch group.  ``slots``: batches in flight in
    all (default ``workers + prefetch + group + 1``).
    """

    pipeline = "split"
    pool_with_gpu = True

    def __init__(self, folder: ImageFolder, cfg: DegradationConfig, *, workers: int | None = None,
                 device: str = "cpu", prefetch: int | None = None, keep_precodec: bool = False,
                 backend: CodecBackend | None = None, time_stages: bool = False, group: int = 2,
                 slots: int | None = None, cpus: int | None = None):
        super().__init__(folder, cfg, workers=None if workers is None else max(1, int(workers)), device=device,
                         prefetch=prefetch, keep_precodec=keep_precodec, backend=backend, time_stages=time_stages,
                         cpus=cpus)
        self.group = max(1, int(group))
        capacity = max(cfg.video_batch_size, cfg.first_batch_range[1])
        count = slots if slots is not None else self.workers + self.prefetch + self.group + 1
        self._slots = SlotPool(max(1, count), capacity, cfg.patch_size, cfg.lr_size)
        self._engines = _EngineCache(cfg, device, time_stages=time_stages)
        self._engine_lock = threading.Lock()
        self._device_q: queue.Queue[_Job | None] = queue.Queue()
        self._device_thread: threading.Thread | None = None
        self._torch_threads = torch.get_num_threads()  # restored at close (the device stage may change it)
        self._job_lock = threading.Lock()
        #: busy seconds of the device stage and of the pool workers (all together), since start
        self.busy = {"device": 0.0, "pool": 0.0}
        log.info("split pipeline: device stage on %s, %d pool worker(s), %d slot(s) of %d patches (%.0f MB shared)",
                 device, self.workers, count, capacity, self._slots.nbytes / 1e6)

    @staticmethod
    def default_pool_size(cpus: int) -> int:
        """Pool processes when none are asked for: every core of the budget but the device stage's."""
        return max(1, cpus - 1)

    # ------------------------------------------------------------------
    def _pool_initializer(self) -> tuple:
        return _init_worker, (str(self.folder.root), self.folder.images, self.cfg.patch_size, self.backend,
                              self.folder.store_path)

    def _engine(self, cfg_key: str | None) -> Engine:
        with self._engine_lock:
            return self._engines.get(cfg_key)

    def _ensure_device_thread(self) -> None:
        with self._lock:
            if self._closed:  # a run that starts after close() must not leave a device stage nobody stops
                raise RuntimeError("the batch producer was shut down")
            if self._device_thread is None:
                self._device_thread = threading.Thread(target=self._device_loop, name="device-stage", daemon=True)
                self._device_thread.start()

    def _submit(self, job: _Job, stage: str) -> None:
        """Send ``job``'s ``stage`` ("load" or "codec") to the pool; its callback moves the job on."""
        try:
            pool, generation = self._ensure_pool()
            if stage == "load":
                fut = pool.submit(_load_task, job.slot.spec, job.refs)
            else:
                fut = pool.submit(_codec_task, job.slot.spec, job.n, job.params.video)
        except RuntimeError as exc:  # shut down, or a pool broken under us: handled like a dead worker
            if self._closed:
                self._finish(job, exc)
                return
            self._broken(job, stage, None)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. no worker process could be started: this batch fails
            log.error("batch %s: its %s stage could not be sent to the pool: %s", job.key, stage, exc)
            self._finish(job, exc)
            return
        fut.add_done_callback(lambda f: self._stage_done(job, stage, generation, f))

    def _stage_done(self, job: _Job, stage: str, generation: int, fut: Future) -> None:
        try:
            out = fut.result()
        except BrokenProcessPool:
            self._broken(job, stage, generation)
            return
        except BaseException as exc:  # ValueError/OSError: an image changed on disk; anything else: a bug
            self._finish(job, exc)
            return
        if stage == "load":
            self._account("pool", out)
            job.timings["load"] = job.timings.get("load", 0.0) + out
            self._device_q.put(job)
        else:
            job.codec_info, busy = out
            self._account("pool", busy)
            job.timings["codec"] = busy
            self._finish(job)

    def _broken(self, job: _Job, stage: str, generation: int | None) -> None:
        """A worker died while ``job`` was in the pool: restart the pool and run the stage again."""
        if self._closed:
            self._finish(job, RuntimeError("the batch producer was shut down"))
            return
        job.kills += 1
        if job.kills > MAX_KILLS:
            self._finish(job, RuntimeError(f"batch {job.key} killed its worker process {job.kills} times; "
                                           "giving up on it"))
            return
        log.error("a worker process died while batch %s was in its %s stage; restarting the pool", job.key, stage)
        self._restart(generation)
        self._submit(job, stage)

    def _account(self, what: str, seconds: float) -> None:
        with self._lock:
            self.busy[what] += seconds

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        """The job is complete (or failed): wake its consumer, or free its slot if nobody waits."""
        with self._job_lock:
            job.error = error
            job.done.set()
            abandoned = job.abandoned
        if abandoned:
            self._slots.release(job.slot)

    def _abandon(self, job: _Job) -> None:
        """The consumer left: the job's slot is freed now if it is complete, else when it completes."""
        with self._job_lock:
            job.abandoned = True
            complete = job.done.is_set()
        if complete:
            self._slots.release(job.slot)

    # ------------------------------------------------------------------
    def _device_loop(self) -> None:
        if self.device == "cpu":
            # on the CPU the device stage is one core's work, like each worker's: torch's threads would
            # only fight the pool for the other cores (7x slower here with both cores busy)
            torch.set_num_threads(1)
        while True:
            job = self._device_q.get()
            if job is None:
                return
            group = [job]
            while len(group) < self.group:
                try:
                    nxt = self._device_q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._device_q.put(None)  # keep the stop signal for the loop
                    break
                group.append(nxt)
            t0 = time.perf_counter()
            issued: list[tuple[_Job, Engine, DeviceOutput, Any]] = []
            for j in group:  # all device work of the group first ...
                if j.abandoned:
                    self._finish(j, RuntimeError("abandoned"))
                    continue
                try:
                    engine = self._engine(j.cfg_key)
                    out = engine.device_stage(j.slot.hr[:j.n], j.seed, j.epoch, j.index, want_usm=j.want_usm)
                    issued.append((j, engine, out, engine.pop_timings()))
                except Exception as exc:  # noqa: BLE001 - a failing batch must not stop the device stage
                    log.exception("device stage failed on batch %s", j.key)
                    self._finish(j, exc)
            for j, engine, out, popped in issued:  # ... then the copies to the host
                try:
                    self._hand_over(j, out)
                    j.timings.update(Engine.read_timings(popped))
                except Exception as exc:  # noqa: BLE001
                    log.exception("device stage failed on batch %s", j.key)
                    self._finish(j, exc)
                    continue
                if out.needs_codec:
                    self._submit(j, "codec")  # never raises: a stage the pool cannot take fails its batch
                else:
                    j.codec_info = dict(NO_CODEC)
                    self._finish(j)
            self._account("device", time.perf_counter() - t0)

    def _hand_over(self, job: _Job, out: DeviceOutput) -> None:
        """Copy the device stage's results into the job's slot."""
        n = job.n
        job.params = out.params
        if out.usm is not None:
            torch.from_numpy(job.slot.usm[:n]).copy_(out.usm)
        dest = job.slot.frames if out.needs_codec else job.slot.lr
        torch.from_numpy(dest[:n]).copy_(out.lr)

    # ------------------------------------------------------------------
    def _run(self, seed: int, jobs: list[tuple[int, int]], want_hr: bool, want_usm: bool,
             cfg: DegradationConfig | None, window: int) -> Iterator[BatchResult]:
        cfg_key = self._cfg_key(cfg)
        todo = deque(jobs)
        pending: deque[_Job] = deque()
        self._ensure_device_thread()
        try:
            while todo or pending:
                # fill the window; block for a slot only when holding none (no deadlock between consumers)
                while todo and len(pending) < window:
                    epoch, k = todo[0]
                    refs = self.plan(seed, epoch, cfg).batch(k)
                    slot = self._slots.acquire(len(refs), block=not pending)
                    if slot is None:
                        if self._closed:
                            return
                        break
                    todo.popleft()
                    job = _Job(seed, epoch, k, refs, cfg_key, want_hr, want_usm, slot)
                    pending.append(job)
                    self._count(1)
                    self._submit(job, "load")
                if not pending:
                    continue
                job = pending[0]
                while not job.done.wait(0.5):
                    if self._closed:
                        return
                    self._check_wedged()
                pending.popleft()
                self._count(-1)
                try:
                    if job.error is not None:
                        if self._closed:
                            return
                        self._failed(job.key, job.error)
                        continue
                    result = self._collect(job)
                finally:
                    self._slots.release(job.slot)
                yield result
        finally:
            for job in pending:
                self._abandon(job)
            self._count(-len(pending))

    def _collect(self, job: _Job) -> BatchResult:
        """Copy one finished batch out of its slot (the slot is reused at once) and write its records."""
        n, slot = job.n, job.slot
        info = job.codec_info or dict(NO_CODEC)
        t0 = time.perf_counter()
        records = self._engine(job.cfg_key).records(job.seed, job.epoch, job.index, job.refs, job.params, info)
        result = BatchResult(
            seed=job.seed, epoch=job.epoch, batch_index=job.index, lr=slot.lr[:n].copy(),
            hr=slot.hr[:n].copy() if job.want_hr else None,
            hr_usm=slot.usm[:n].copy() if job.want_usm else None,
            records=records, codec_failures=int(info.get("codec_failure") is not None),
            precodec=slot.frames[:n].copy() if (self.keep_precodec and job.params.ending == "v2") else None,
            video=job.params.video if job.params.ending == "v2" else None,
        )
        if self.time_stages:
            result.timings = {**job.timings, "pack": time.perf_counter() - t0}
        return result

    # ------------------------------------------------------------------
    def busy_snapshot(self) -> dict[str, float]:
        """Busy seconds so far of the device stage and of the pool (all workers), and the wall clock."""
        with self._lock:
            return {**self.busy, "wall": time.perf_counter()}

    def close(self, *, terminate: bool = False) -> None:
        """Stop the pool, the device stage and free the slots; consumers still waiting return."""
        with self._lock:
            thread, self._device_thread = self._device_thread, None
            self._closed = True  # final: no stage is submitted any more, no new pool starts
        super().close(terminate=terminate)
        if thread is not None:
            self._device_q.put(None)
            thread.join(30 if not terminate else 5)
            torch.set_num_threads(self._torch_threads)
        self._slots.close()

