"""The split pipeline on the CPU: the same bytes as the whole-batch path, nothing lost, bounded.

Real photographs, real codecs, real worker processes and real shared memory;
the device stage runs on the CPU here and on CUDA with ``--device cuda``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from codec_fakes import BrokenBackend, DiesMidSendBackend, KillOnceBackend

from server.degradation.config import DegradationConfig
from server.degradation.images import ImageFolder
from server.pipeline.batch import BatchProducer
from server.pipeline.registry import make_producer, resolve_pipeline
from server.pipeline.shared_slots import SlotPool
from server.pipeline.split import SplitProducer

# V1 and V2 endings both common, short batches: several batches of an epoch stay cheap
MIXED = DegradationConfig(video_batch_size=3, first_batch_range=(2, 3), v2_prob=0.5)


@pytest.fixture(scope="module")
def folder(photo_dir):
    return ImageFolder(photo_dir, 360)


def same_batch(a, b) -> None:
    assert (a.epoch, a.batch_index) == (b.epoch, b.batch_index)
    assert a.lr.tobytes() == b.lr.tobytes()
    assert a.hr.tobytes() == b.hr.tobytes()
    assert (a.hr_usm is None) == (b.hr_usm is None)
    if a.hr_usm is not None:
        assert a.hr_usm.tobytes() == b.hr_usm.tobytes()
    assert a.records == b.records


def whole_batch(folder, cfg, jobs, seed=0, backend=None, want_usm=True):
    return list(BatchProducer(folder, cfg, workers=0, backend=backend).produce_jobs(seed, jobs, want_usm=want_usm))


def test_auto_is_split_on_a_gpu_and_batch_on_the_cpu():
    assert resolve_pipeline("auto", "cpu") == "batch"
    assert resolve_pipeline("auto", "cuda") == "split"
    assert resolve_pipeline("auto", "cuda:1") == "split"
    assert resolve_pipeline("split", "cpu") == "split"
    with pytest.raises(ValueError, match="pipeline must be one of"):
        resolve_pipeline("fast", "cpu")


def test_split_gives_the_same_bytes_and_records_as_the_whole_batch_path(folder, device):
    jobs = [(e, k) for e in (0, 1, 2) for k in range(3)]
    want = whole_batch(folder, MIXED, jobs, seed=7)
    endings = {r.records[0]["ending"] for r in want}
    assert endings == {"v1", "v2"}, "the chosen batches must cover both endings"
    with SplitProducer(folder, MIXED, workers=2, device=str(device), group=2) as split:
        got = list(split.produce_jobs(7, jobs))
        # a second consumer at once, with HR and USM not wanted, shares the pool and slots
        lean = list(split.produce_jobs(7, jobs[:3], want_hr=False, want_usm=False))
    if device.type != "cpu":
        # CUDA: other float kernels, so only the shape of the result and the records' draws agree
        for a, b in zip(want, got):
            assert a.lr.shape == b.lr.shape and a.hr.tobytes() == b.hr.tobytes()
            assert [r["kernel1"] for r in a.records] == [r["kernel1"] for r in b.records]
        return
    assert len(got) == len(want) == 9
    for a, b in zip(want, got):
        same_batch(a, b)
    for a, b in zip(want, lean):
        assert b.hr is None and b.hr_usm is None and a.lr.tobytes() == b.lr.tobytes()


def test_a_failing_codec_falls_back_the_same_way_in_both_paths(folder):
    cfg = DegradationConfig(video_batch_size=3, first_batch_range=(3, 3), v2_prob=1.0)
    jobs = [(0, 0), (0, 1)]
    want = whole_batch(folder, cfg, jobs, backend=BrokenBackend())
    with SplitProducer(folder, cfg, workers=1, backend=BrokenBackend()) as split:
        got = list(split.produce_jobs(0, jobs))
    for a, b in zip(want, got, strict=True):
        same_batch(a, b)
        assert b.codec_failures == 1
        assert all("encoder refused" in r["codec_failure"] for r in b.records)
        assert all(r["backend"] == "software" and r["codec"] == "libx264" for r in b.records)


@pytest.mark.parametrize("pipeline", ["split", "batch"])
def test_a_codec_worker_killed_mid_batch_loses_nothing(folder, tmp_path, pipeline):
    cfg = DegradationConfig(video_batch_size=3, first_batch_range=(3, 3), v2_prob=1.0)
    jobs = [(0, 0), (0, 1)]
    want = whole_batch(folder, cfg, jobs)
    marker = tmp_path / "killed"
    threads = set(threading.enumerate())
    with make_producer(folder, cfg, pipeline=pipeline, workers=1, backend=KillOnceBackend(str(marker))) as producer:
        got = list(producer.produce_jobs(0, jobs))
        assert not producer.failures
    assert marker.exists(), "the codec worker was never killed: the test proves nothing"
    for a, b in zip(want, got, strict=True):
        same_batch(a, b)
    # close() ended the broken pool and its replacement: no manager or device thread is left
    left = [t.name for t in set(threading.enumerate()) - threads if t.is_alive()]
    assert not left, f"threads left behind: {left}"


@pytest.mark.parametrize("pipeline", ["split", "batch"])
def test_a_worker_killed_while_sending_its_batch_loses_nothing(folder, tmp_path, pipeline, monkeypatch):
    """A worker killed half-way through sending its result leaves the pool's manager thread waiting for the
    rest for ever, unaware of the death: the producer sees the dead worker, ends the pool and redoes."""
    import server.pipeline.batch as batch_module

    monkeypatch.setattr(batch_module, "WEDGE_SECONDS", 2.0)
    cfg = DegradationConfig(video_batch_size=3, first_batch_range=(3, 3), v2_prob=1.0)
    jobs = [(0, 0), (0, 1)]
    want = whole_batch(folder, cfg, jobs)
    marker = tmp_path / "sent-half"
    with make_producer(folder, cfg, pipeline=pipeline, workers=1,
                       backend=DiesMidSendBackend(str(marker), die=True)) as producer:
        got = list(producer.produce_jobs(0, jobs))
        assert not producer.failures
    assert marker.exists(), "no worker died mid-send: the test proves nothing"
    for a, b in zip(want, got, strict=True):
        same_batch(a, b)


@pytest.mark.parametrize("pipeline", ["split", "batch"])
def test_a_batch_that_keeps_killing_workers_is_reported_and_the_run_goes_on(folder, tmp_path, pipeline):
    cfg = DegradationConfig(video_batch_size=3, first_batch_range=(3, 3), v2_prob=1.0)
    killer = KillOnceBackend(str(tmp_path / "k"), always=True)
    with make_producer(folder, cfg, pipeline=pipeline, workers=1, backend=killer) as producer:
        got = list(producer.produce_jobs(0, [(0, 0)]))
        assert got == []
        (job, reason), = producer.failures
        assert job == (0, 0) and "killed its worker process 3 times" in reason
        assert producer.failure_reason(0, 0) == reason


def test_oversize_batches_of_a_request_override_get_their_own_slot(folder):
    small = DegradationConfig(video_batch_size=2, first_batch_range=(2, 2))
    bigger = DegradationConfig(video_batch_size=5, first_batch_range=(5, 5))
    want = whole_batch(folder, bigger, [(0, 0)])
    with SplitProducer(folder, small, workers=1, slots=2) as split:
        got = list(split.produce_jobs(0, [(0, 0)], cfg=bigger))
    assert len(got[0]) == 5
    same_batch(want[0], got[0])


def test_slots_bound_the_batches_in_flight_and_come_back_when_a_consumer_leaves(folder):
    with SplitProducer(folder, MIXED, workers=1, slots=3, prefetch=0) as split:
        jobs = [(e, k) for e in range(4) for k in range(2)]
        stream = split.produce_jobs(1, jobs, window=2)
        first = next(stream)  # the consumer reads one batch, then stops reading
        assert first.batch_index == 0
        time.sleep(1.0)
        assert split.in_flight <= 2  # never more than the window, however long it waits
        stream.close()  # the consumer leaves: its slots return once their batches are done
        deadline = time.monotonic() + 120
        while len(split._slots._free) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(split._slots._free) == 3
        assert split.in_flight == 0
        # and the producer serves the next consumer
        assert len(list(split.produce_jobs(1, [(0, 1)]))) == 1


def test_stage_timings_and_busy_time_when_asked(folder):
    cfg = DegradationConfig(video_batch_size=3, first_batch_range=(3, 3), v2_prob=1.0)
    with make_producer(folder, cfg, pipeline="split", workers=1, time_stages=True, keep_precodec=True) as split:
        before = split.busy_snapshot()
        (res,) = list(split.produce_jobs(0, [(0, 0)]))
        after = split.busy_snapshot()
    assert {"load", "usm", "blur1", "noise2", "ending", "codec", "pack"} <= set(res.timings)
    assert all(v >= 0 for v in res.timings.values())
    assert after["device"] > before["device"] and after["pool"] > before["pool"]
    assert after["pool"] >= res.timings["codec"]
    assert res.precodec is not None and res.precodec.shape == res.lr.shape
    assert res.video is not None


def test_a_slot_pool_hands_out_each_slot_once():
    pool = SlotPool(2, capacity=3, patch=8, lr=2)
    try:
        a, b = pool.acquire(3), pool.acquire(3)
        assert a is not b and pool.acquire(3, block=False) is None
        a.hr[:] = 7
        pool.release(a)
        c = pool.acquire(1)
        assert c is a and int(c.hr.sum()) == 7 * c.hr.size  # reused, not reallocated
        big = pool.acquire(4)  # above the capacity: a one-off slot of its own
        assert big.hr.shape == (4, 8, 8, 3)
        pool.release(big)
        assert np.all(b.lr == 0)
    finally:
        pool.close()


def test_a_small_dev_shm_means_fewer_slots_or_a_clear_error(monkeypatch, caplog):
    import server.pipeline.shared_slots as slots

    each = slots.SlotSpec("x", 4, 16, 4).nbytes
    monkeypatch.setattr(slots, "shm_free_bytes", lambda path=slots.SHM_DIR: int(each * 3 / 0.8))
    pool = SlotPool(10, capacity=4, patch=16, lr=4)
    try:
        assert len(pool._all) == 3
        assert "instead of 10" in caplog.text
    finally:
        pool.close()
    monkeypatch.setattr(slots, "shm_free_bytes", lambda path=slots.SHM_DIR: each // 2)
    with pytest.raises(OSError, match="shm_size"):
        SlotPool(2, capacity=4, patch=16, lr=4)
