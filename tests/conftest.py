"""Shared fixtures: real photographs (from scikit-image) and a small, fast config.

GPU tests are marked ``gpu`` and skip cleanly without CUDA; ``--device cuda``
runs the device-parametrised tests on the GPU too (kornia style); those are
marked ``on_device`` here, so ``-m "gpu or on_device" --device cuda`` runs
every CUDA test and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from server.degradation.config import DegradationConfig
from server.degradation.video import VideoParams


def pytest_configure(config):
    """SIGTERM (``timeout``, a CI runner or a developer stopping the suite) ends the run like Ctrl-C, so
    fixture teardowns and ``finally`` blocks still kill the servers, clients and busy loops the tests
    started in sessions of their own; the default action would orphan them, still eating the cores."""
    import signal
    import threading

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


#: seconds the interpreter may take to exit after the last test before the watchdog ends it
EXIT_GRACE_SECONDS = float(os.environ.get("DEGRADE_TEST_EXIT_GRACE", "90"))
_SESSION_STATUS: list[int] = [1]


def pytest_sessionfinish(session, exitstatus):
    _SESSION_STATUS[0] = int(exitstatus)


def pytest_unconfigure(config):
    """A process that cannot exit after the tests (a thread or worker process that outlived them: once in
    CI, the interpreter waited in concurrent.futures' exit hook until the runner's time limit) is reported
    and ended: the watchdog prints every thread's stack and the live child processes, ends the children and
    exits with the tests' own status, so the log names the culprit and the run does not hang."""
    import threading

    threading.Thread(target=_exit_watchdog, args=(EXIT_GRACE_SECONDS,), name="exit-watchdog", daemon=True).start()


def _exit_watchdog(grace: float) -> None:
    import faulthandler
    import signal
    import sys
    import threading
    import time

    time.sleep(grace)
    err = sys.__stderr__
    err.write(f"\n*** the tests ended {grace:.0f} s ago, but this process has not exited. Every thread's stack "
              "follows, then the child processes still running; they are killed and the process exits with the "
              f"tests' own status ({_SESSION_STATUS[0]}). ***\n")
    for thread in threading.enumerate():  # faulthandler's stacks name threads by id only
        err.write(f"*** thread 0x{thread.ident or 0:016x}: {thread.name}{' (daemon)' if thread.daemon else ''}\n")
    err.flush()
    faulthandler.dump_traceback(file=err, all_threads=True)
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        children += [int(pid) for pid in task.read_text().split()]
    for pid in children:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        err.write(f"*** child {pid}: {cmd[:300]}\n")
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    err.flush()
    os._exit(_SESSION_STATUS[0])


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default="cpu", help="torch device for device tests: cpu or cuda")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    # every test that runs on --device is marked, so `-m "gpu or on_device" --device cuda` selects
    # all CUDA tests (benchmarks/gpu_check.sh)
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory):
    """Dataset fingerprints cache their file hashes in a file of this session, not in ~/.cache
    (servers started as subprocesses inherit it)."""
    os.environ.setdefault("DEGRADE_HASH_CACHE", str(tmp_path_factory.mktemp("hash-cache") / "file-hashes.json"))
    # pixel stores (built by default by degrade-server and the degrade commands) too
    os.environ.setdefault("DEGRADE_STORE_DIR", str(tmp_path_factory.mktemp("pixel-stores")))


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    dev = torch.device(pytestconfig.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA GPU")
    return dev


def _photo(name: str) -> np.ndarray:
    import skimage.data as d

    if name == "motorcycle":
        return d.stereo_motorcycle()[0]
    return getattr(d, name)()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A small folder of real colour photographs: 6 patches of 360x360 per epoch."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "rocket", "motorcycle"):  # 1 + 1 + 1 + 2 patches
        Image.fromarray(_photo(name)).save(root / f"{name}.png")
    im = Image.fromarray(_photo("astronaut")).resize((760, 400), Image.Resampling.LANCZOS)
    im.save(root / "z_wide.jpg", quality=95)  # 2 patches, offsets vary in x
    return root


@pytest.fixture(scope="session")
def small_cfg() -> DegradationConfig:
    """The spec's degradation with short video batches, so engine tests stay fast on 2 cores."""
    return DegradationConfig(video_batch_size=4, first_batch_range=(2, 4))


@pytest.fixture(scope="session")
def photo_patches() -> np.ndarray:
    """Eight real 360x360 uint8 crops (NHWC)."""
    out = []
    for name in ("astronaut", "coffee", "rocket", "motorcycle"):
        img = _photo(name)
        out.append(img[:360, :360])
        out.append(img[-360:, -360:])
    return np.stack(out)


#: One mid-range draw per codec of the spec's table (the codec tests' standard parameters).
MID = {
    "mpeg2video": VideoParams("mpeg2video", fps=25, bitrate_kbps=5000),
    "mpeg4": VideoParams("mpeg4", fps=24, bitrate_kbps=5000),
    "libx264": VideoParams("libx264", fps=24, crf=26, preset="medium"),
    "libx265": VideoParams("libx265", fps=24, crf=31, preset="fast"),
}


# --- the gRPC service -------------------------------------------------------
SERVICE_CFG = "video_batch_size = 2\nfirst_batch_range = [1, 2]\n"


@pytest.fixture(scope="session")
def service_cfg_file(tmp_path_factory) -> Path:
    """A degradation config with tiny video batches: photo_dir makes 4-5 batches per epoch."""
    path = tmp_path_factory.mktemp("svc") / "service.toml"
    path.write_text(SERVICE_CFG)
    return path


@pytest.fixture()
def make_server(photo_dir, service_cfg_file):
    """Start in-process servers on port 0 (``make_server(**ServerConfig fields)``); all stopped afterwards."""
    from server.service.serve import ServerConfig, create_server

    started = []

    def make(**kw):
        kw.setdefault("images", photo_dir)
        kw.setdefault("config_file", service_cfg_file)
        kw.setdefault("workers", 1)
        kw.setdefault("device", "cpu")
        kw.setdefault("host", "127.0.0.1")
        srv, port = create_server(ServerConfig(port=0, **kw))
        srv.start()
        started.append(srv)
        return srv, f"127.0.0.1:{port}"

    yield make
    for srv in started:
        srv.stop_now()


@pytest.fixture(scope="session")
def big_photo_dir(tmp_path_factory) -> Path:
    """64 patches of real photographs (upscaled to 1440x1440): one epoch is far more than transport buffers hold."""
    import skimage.data as d

    root = tmp_path_factory.mktemp("big")
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        img = Image.fromarray(getattr(d, name)()).resize((1440, 1440), Image.Resampling.BICUBIC)
        img.save(root / f"{i}_{name}.png")
    return root


def spawn_server(photo_dir, cfg_file, *extra: str):
    """``python -m server serve`` on port 0 with one worker, in a session of its own (so cleanup can kill
    the whole group, worker processes of a SIGKILLed server too): ``(Popen, address)``."""
    import re
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "server", "serve", "--images", str(photo_dir), "--config", str(cfg_file),
           "--host", "127.0.0.1", "--port", "0", "--workers", "1", "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on port (\d+)", line)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture()
def server_process(photo_dir, service_cfg_file):
    """Start ``python -m server serve`` processes on port 0 (``server_process(*flags)`` -> (Popen, address)),
    each in a session of its own; at teardown every one is killed with its whole group (worker processes
    too), and continued first in case a test stopped it."""
    import signal

    procs = []

    def start(*extra: str):
        proc, address = spawn_server(photo_dir, service_cfg_file, *extra)
        procs.append(proc)
        return proc, address

    yield start
    for proc in procs:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
