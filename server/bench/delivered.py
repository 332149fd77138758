"""Figure 2 of BENCH.md: pairs/s delivered over gRPC on loopback to 1 and to N clients.

A real ``degrade-server`` runs as a subprocess on the same image folder and
config (all cores), and each client is its own process pulling its share of
the very (epoch, batch) jobs the engine figure used, with LR + HR + sharpened
HR, like the engine figure.  The rate is all pairs received / wall time from a
common start to the last client's end.  The clients are on the server's host,
so by default (as a trainer there) they take the tensors from its shared
memory (server/service/slots.py); ``shared_memory=False`` measures the bytes
over the socket.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from server.degradation.config import DegradationConfig


@contextmanager
def server_process(images: Path, cfg: DegradationConfig, workers: int | None, device: str = "cpu",
                   pipeline: str = "auto", *, extra: tuple[str, ...] = (), new_session: bool = False) -> Iterator[str]:
    """A degrade-server subprocess on a free port (``extra``: more flags; ``new_session``: in a session of
    its own, as a container or a systemd unit runs it); yields its address."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "bench.yaml"
        cfg_path.write_text(cfg.to_json())  # JSON is YAML
        cmd = [sys.executable, "-m", "server", "serve", "--images", str(images), "--config", str(cfg_path),
               "--host", "127.0.0.1", "--port", "0", "--device", device, "--pipeline", pipeline, "--drain-seconds", "0",
               "--grace-seconds", "2"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        with serving([*cmd, *extra], new_session=new_session) as (_, address):
            yield address


@contextmanager
def serving(cmd: list[str], *, new_session: bool = False) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run a ``degrade-server`` command line that binds ``--host 127.0.0.1 --port 0`` (``new_session``: in a
    session of its own); yields (process, address) once it listens, and stops it afterwards."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=new_session)
    try:
        address = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"listening on port (\d+)", line)
            if m:
                address = f"127.0.0.1:{m.group(1)}"
                break
            if not line and proc.poll() is not None:
                break
        if address is None:
            raise RuntimeError("the benchmark server did not start")
        yield proc, address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def touch_pages(batch) -> None:
    """Read every page of a received batch's arrays once, as a trainer would: a shared-memory slot's mapping
    faults here, so its cost is counted in the client like the copy out of a byte message."""
    for arr in (batch.lr, batch.hr, batch.hr_usm):
        if arr is not None:
            int(arr.reshape(-1)[::4096].sum())


def _client_main(address: str, seed: int, jobs: list[tuple[int, int]], ready, start, out, streams: int = 2,
                 group: int = 2, shared_memory: bool = True) -> None:
    from client import DegradeClient

    with DegradeClient(address, streams_per_server=streams, group_size=group, shared_memory=shared_memory) as client:
        client.info(seed, 0)  # connect before the clock starts
        ready.put(True)
        start.wait()
        pairs = nbytes = shared = 0
        for b in client.jobs(seed, jobs):  # one run across epoch boundaries, as a trainer's stream
            pairs += len(b)
            nbytes += b.lr.nbytes + b.hr.nbytes + b.hr_usm.nbytes
            shared += b.shared_memory
            touch_pages(b)
        out.put((pairs, nbytes, time.perf_counter(), shared))


def deliver(address: str, seed: int, jobs: list[tuple[int, int]], clients: int, *, streams: int = 2,
            group: int = 2, shared_memory: bool = True) -> dict[str, float]:
    """Pull ``jobs`` with ``clients`` client processes (jobs dealt round robin); pairs/s and bytes/s."""
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    shares = [jobs[i::clients] for i in range(clients)]
    procs = [ctx.Process(target=_client_main, args=(address, seed, share, ready, start, out, streams, group,
                                                              shared_memory),
                         daemon=True)
             for share in shares if share]
    for p in procs:
        p.start()
    for _ in procs:  # every client has imported and connected: start the clock for all at once
        ready.get(timeout=300)
    t0 = time.perf_counter()
    start.set()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(30)
    t_end = max(r[2] for r in results)
    pairs = sum(r[0] for r in results)
    nbytes = sum(r[1] for r in results)
    dt = t_end - t0
    return {"pairs_per_s": pairs / dt, "bytes_per_s": nbytes / dt, "pairs": pairs, "seconds": dt,
            "shared_batches": sum(r[3] for r in results)}
