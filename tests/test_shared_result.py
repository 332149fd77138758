"""Batches from the whole-batch pipeline's workers travel through /dev/shm files (server/pipeline/shared_result.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.codecs import VideoRoundTrip
from server.degradation.config import DegradationConfig
from server.degradation.engine import BatchResult, Engine
from server.degradation.epoch_plan import make_epoch_plan
from server.degradation.images import ImageFolder
from server.pipeline import shared_result
from server.pipeline.batch import BatchProducer
from server.pipeline.shared_result import SHM_DIR, SharedBatch, share

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm")


def fake(n: int = 3) -> BatchResult:
    rng = np.random.default_rng(n)
    return BatchResult(seed=5, epoch=2, batch_index=7, lr=rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8),
                       hr=None, hr_usm=rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8),
                       records=[{"patch_id": f"p{i}"} for i in range(n)], timings={"codec": 1.5}, codec_failures=1)


def test_a_shared_batch_unpickles_as_the_batch_and_leaves_no_file():
    result = fake()
    shared = share(result)
    assert isinstance(shared, SharedBatch)
    path = Path(SHM_DIR) / shared.name
    assert path.exists() and path.stat().st_size == result.lr.nbytes + result.hr_usm.nbytes
    raw = pickle.dumps(shared)
    assert len(raw) < 2000  # only the layout and the records travel in the pickle
    got = pickle.loads(raw)
    assert path.exists() and got.shared.path == str(path)  # named while the result lives (a slot may take it)
    assert got.shared.fields == {"lr", "hr_usm"}
    assert isinstance(got, BatchResult) and got.hr is None and got.precodec is None
    assert (got.seed, got.epoch, got.batch_index, got.records, got.timings, got.codec_failures) == \
        (5, 2, 7, result.records, {"codec": 1.5}, 1)
    assert got.lr.tobytes() == result.lr.tobytes() and got.hr_usm.tobytes() == result.hr_usm.tobytes()
    assert got.lr.shape == result.lr.shape and got.lr.dtype == np.uint8
    got.lr[0] = 0  # writable, like an unpickled array, and private: nothing else sees it
    assert got.lr[0].sum() == 0
    lr = got.lr
    del got
    assert not path.exists()  # removed with the result; its arrays live on
    assert lr[0].sum() == 0 and lr[1:].tobytes() == result.lr[1:].tobytes()


def test_a_taken_file_stays_until_its_new_owner_removes_it():
    got = pickle.loads(pickle.dumps(share(fake())))
    path, name = got.shared.path, got.shared.name
    assert got.shared.take() and not got.shared.take()  # one owner
    del got
    assert Path(path).exists()
    shared_result.remove_file(path, name)
    assert not Path(path).exists()


def test_without_shared_memory_the_batch_goes_through_the_pipe(monkeypatch, tmp_path):
    monkeypatch.setattr(shared_result, "SHM_DIR", str(tmp_path / "missing"))
    result = fake()
    assert share(result) is result


def test_a_batch_never_received_is_removed_when_the_process_tree_ends(tmp_path):
    code = ("import numpy as np; from server.pipeline.shared_result import share; "
            "from server.degradation.engine import BatchResult; "
            "s = share(BatchResult(1, 2, 3, np.ones((2, 4, 4, 3), np.uint8), None, None, [{}, {}])); "
            "print(s.name, flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    path = Path(SHM_DIR) / out.stdout.split()[0]
    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists(), "an orphaned batch file was left in /dev/shm"


def test_worker_batches_equal_the_engines_and_leave_no_files(photo_dir):
    cfg = DegradationConfig(video_batch_size=2, first_batch_range=(2, 2))
    folder = ImageFolder(photo_dir, cfg.patch_size)
    plan = make_epoch_plan(folder.images, cfg, 0, 0)
    engine = Engine(cfg, codec=VideoRoundTrip())
    with BatchProducer(folder, cfg, workers=1) as producer:
        got = list(producer.produce(0, 0, [0, 1], want_hr=True, want_usm=True))
        pids = producer.worker_pids()
    assert pids
    for b in got:
        want = engine.make_batch(folder, plan, b.batch_index)
        assert b.lr.tobytes() == want.lr.tobytes() and b.hr.tobytes() == want.hr.tobytes()
        assert b.hr_usm.tobytes() == want.hr_usm.tobytes() and b.records == want.records
    del got, b  # the files go with the results
    left = [p for p in os.listdir(SHM_DIR) if any(p.startswith(f"degrade-batch-{pid}-") for pid in pids)]
    assert not left


def test_orphans_of_a_killed_process_tree_are_swept_once_old(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_result, "SHM_DIR", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old_dead, new_dead, old_alive = (tmp_path / f"degrade-batch-{dead}-0-aa", tmp_path / f"degrade-batch-{dead}-1-bb",
                                     tmp_path / f"degrade-batch-{os.getpid()}-0-cc")
    other = tmp_path / "not-ours"
    for p in (old_dead, new_dead, old_alive, other):
        p.write_bytes(b"x")
    for p in (old_dead, old_alive, other):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert shared_result.sweep_orphans() == [old_dead.name]
    assert not old_dead.exists() and new_dead.exists() and old_alive.exists() and other.exists()
