"""Worker pools end with their process and leave nothing behind: no thread, no worker, no wait at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from server.degradation.config import DegradationConfig
from server.degradation.images import ImageFolder
from server.pipeline.batch import BatchProducer
from server.pipeline.split import SplitProducer

ROOT = Path(__file__).resolve().parents[1]

#: a process that starts a batch whose codec never returns, then ends without closing its producer
EXITS_WITHOUT_CLOSE = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from codec_fakes import HangingBackend
    from server.degradation.config import DegradationConfig
    from server.degradation.images import ImageFolder
    from server.pipeline.registry import make_producer

    def main():
        photos, marker, pipeline = sys.argv[1:4]
        cfg = DegradationConfig(video_batch_size=2, first_batch_range=(2, 2), v2_prob=1.0)
        producer = make_producer(ImageFolder(photos, 360), cfg, pipeline=pipeline, workers=1,
                                 backend=HangingBackend(marker))
        batches = producer.produce(0, 0, [0])
        threading.Thread(target=lambda: next(batches, None), daemon=True).start()
        deadline = time.monotonic() + 120
        while not Path(marker).exists():  # a worker is inside the codec that never returns
            assert time.monotonic() < deadline, "the batch never reached its codec"
            time.sleep(0.1)
        print("worker stuck", flush=True)
        # no producer.close(): the interpreter must still exit

    if __name__ == "__main__":
        main()
""")


def _wait_for_codec(marker: Path) -> None:
    """Until a worker is inside the misbehaving codec (it writes ``marker``)."""
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, "the batch never reached its codec"
        time.sleep(0.1)


def _threads_left(before: set, *ignore: str, wait: float = 15) -> list[str]:
    """Names of the threads started since ``before`` that are still alive after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and t.name not in ignore]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("pipeline", ["batch", "split"])
def test_a_process_that_never_closes_its_producer_still_exits(photo_dir, tmp_path, pipeline):
    script, marker = tmp_path / "exits.py", tmp_path / "stuck"
    script.write_text(EXITS_WITHOUT_CLOSE)
    proc = subprocess.Popen([sys.executable, str(script), str(photo_dir), str(marker), pipeline,
                             str(ROOT / "tests")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"the process did not exit: it waits at exit for a batch nobody will receive\n{out[-2000:]}")
    assert proc.returncode == 0, out[-2000:]
    assert "worker stuck" in out
    worker = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the stuck worker process outlived its parent"


@pytest.mark.parametrize("producer_cls", [BatchProducer, SplitProducer])
def test_close_leaves_no_thread_and_refuses_later_runs(photo_dir, producer_cls):
    cfg = DegradationConfig(video_batch_size=2, first_batch_range=(2, 2))
    before = set(threading.enumerate())
    producer = producer_cls(ImageFolder(photo_dir, 360), cfg, workers=1)
    late = producer.produce(0, 0, [1])  # made before close, first read after it (a stream that starts late)
    assert next(iter(producer.produce(0, 0, [0]))).lr.shape[0] == 2
    producer.close(terminate=True)
    with pytest.raises(RuntimeError, match="shut down"):
        next(late)
    left = _threads_left(before, wait=10)
    assert not left, f"threads left behind by close(): {left}"


def test_a_test_session_that_cannot_exit_is_reported_and_ended(tmp_path):
    """The suite's exit watchdog (tests/conftest.py): a session whose process cannot exit prints every
    thread's stack and exits with the tests' own status instead of hanging until CI's time limit."""
    (tmp_path / "test_leaves_a_thread.py").write_text(textwrap.dedent("""
        import threading, time

        def test_starts_a_thread_that_never_ends():
            threading.Thread(target=lambda: time.sleep(3600), name="never-ends").start()
    """))
    env = {**os.environ, "DEGRADE_TEST_EXIT_GRACE": "3", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert "1 passed" in done.stdout, done.stdout[-2000:]
    assert done.returncode == 0, "the exit status is the tests' own"
    assert "has not exited" in done.stderr and "never-ends" in done.stderr, done.stderr[-2000:]
    assert took < 100, f"the watchdog did not end the process ({took:.0f} s)"


@pytest.mark.parametrize("pipeline", ["batch", "split"])
def test_close_ends_a_pool_whose_worker_died_while_sending_a_batch(photo_dir, tmp_path, pipeline):
    """Seen in CI: a worker ended mid-way through sending its result left the pool's manager thread
    reading the rest for ever, and the interpreter waited for that thread at exit."""
    from codec_fakes import DiesMidSendBackend

    from server.pipeline.registry import make_producer

    marker = tmp_path / "sending"
    cfg = DegradationConfig(video_batch_size=2, first_batch_range=(2, 2), v2_prob=1.0)
    before = set(threading.enumerate())
    producer = make_producer(ImageFolder(photo_dir, 360), cfg, pipeline=pipeline, workers=1,
                             backend=DiesMidSendBackend(str(marker)))
    batches = producer.produce(0, 0, [0])
    threading.Thread(target=lambda: next(batches, None), name="consumer", daemon=True).start()
    _wait_for_codec(marker)
    time.sleep(0.5)  # the manager thread is now waiting for the rest of the message
    producer.close(terminate=True)
    left = _threads_left(before, "consumer")
    assert not left, f"threads left behind by close(): {left} (the process could not exit)"


def test_a_graceful_close_does_not_wait_for_ever_on_a_pool_wedged_by_a_death_mid_send(photo_dir, tmp_path,
                                                                                        monkeypatch):
    """close() waits for running batches; a worker that died mid-send will never finish its batch, so after
    WEDGE_SECONDS the pool is ended instead of waited for."""
    from codec_fakes import DiesMidSendBackend

    import server.pipeline.batch as batch_module

    monkeypatch.setattr(batch_module, "WEDGE_SECONDS", 1.0)
    marker = tmp_path / "sent-half"
    cfg = DegradationConfig(video_batch_size=2, first_batch_range=(2, 2), v2_prob=1.0)
    before = set(threading.enumerate())
    producer = BatchProducer(ImageFolder(photo_dir, 360), cfg, workers=1, backend=DiesMidSendBackend(str(marker),
                                                                                                      die=True))
    producer._check_wedged = lambda: None  # only close() may notice the wedge here
    batches = producer.produce(0, 0, [0])
    threading.Thread(target=lambda: next(batches, None), name="consumer", daemon=True).start()
    _wait_for_codec(marker)
    done = threading.Event()
    threading.Thread(target=lambda: (producer.close(), done.set()), name="closer", daemon=True).start()
    assert done.wait(30), "close() waits for ever on the wedged pool"
    producer.close(terminate=True)  # the consumer, told its batch broke, may have started a pool again
    left = _threads_left(before, "consumer", "closer")
    assert not left, f"threads left behind by close(): {left}"
