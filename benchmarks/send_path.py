"""CPU per pair on the send path: ``python -m benchmarks.send_path``.

A ``degrade-server --workers 1`` runs as a subprocess on loopback, once per
pipeline (batch, split); for each wire mode one client process pulls a fixed
list of video batches.  Measured, start-up excluded:

* **server main process**: utime + stime of the server's main process alone
  (``/proc/PID/stat``: all its threads, gRPC's included; its worker processes
  are separate processes and not counted), read just before the client starts
  pulling and just after its last batch arrived (a warm-up batch before that
  starts the workers and connects);
* **client process**: ``os.times()`` of the client process around the same pull
  (its decoding, and in modes lr-hr / lr the sharpening and HR cutting it does);
* the **send ceiling** these imply: pairs/s one core could send, 1000 / (main-process ms per pair, idle share taken off);
* the server's **idle** CPU (its timers, gRPC's pollers: ~1 ms per second here), measured for
  ``--idle-seconds`` before each pull, and its share of each pair at the pull's rate: on a busy
  machine where a pull runs at a pair per second it is a millisecond per pair, not the send path.

With ``--pipeline split`` the device stage (the image work, ~30 ms per pair on
the CPU) runs in the main process too, so only the differences between wire
modes are the send path there; the batch pipeline's main process does only
the receiving from its worker and the sending.  ``replay`` is the service alone:
a ``DegradeService`` in a process of its own whose producer hands out one made
batch again and again (no image work, no workers, arrays already in memory),
pulled as the wire mode asks, without the client's local work; at thousands of
pairs per second its figures are the send path's own, whatever the load of the
machine.  ``/proc`` counts in clock
ticks (10 ms): a run of ~200 pairs resolves ~0.05 ms per pair.

Each run is made with both **deliveries** (``--delivery``): ``bytes``, the
tensors over the socket, and ``shared``, the same-host delivery through
shared-memory slots (server/service/slots.py; only ids, records and the slot
cross the socket).  In both the client touches every page of every array it
receives (a trainer reads them all), so the page faults of a shared mapping
are counted where they happen, in the client.  For ``replay`` with
``shared``, each replayed batch is a hard link to one file written once, as a
worker's batch file would be: the main process's figure is the slot's cost.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from server.bench.delivered import serving, touch_pages
from .wire import _commit

MODES = ("full", "lr-hr", "lr")
PIPELINES = ("batch", "split", "replay")
DELIVERIES = ("bytes", "shared")


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid`` (all its threads, living and ended), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def server(images: Path, cfg_file: Path, pipeline: str, extra: list[str]):
    """``python -m server serve --workers 1 --port 0``: a context yielding (process, address)."""
    cmd = [sys.executable, "-m", "server", "serve", "--images", str(images), "--config", str(cfg_file),
           "--host", "127.0.0.1", "--port", "0", "--workers", "1", "--device", "cpu", "--pipeline", pipeline,
           "--drain-seconds", "0", "--grace-seconds", "2", *extra]
    return serving(cmd)


def _replay_server(video_batch: int, port_q, stop) -> None:
    """A DegradeService whose producer replays one made batch from memory (no image work, no workers)."""
    import dataclasses
    import types
    from concurrent import futures

    import grpc
    import numpy as np

    from server.degradation.config import DegradationConfig
    from server.degradation.engine import BatchResult
    from server.service.degrader import DegradeService
    from server.service.serve import SERVER_OPTIONS

    cfg = DegradationConfig(video_batch_size=video_batch)
    rng = np.random.default_rng(0)
    n, hr, lr = video_batch, cfg.patch_size, cfg.lr_size
    base = BatchResult(0, 0, 0, rng.integers(0, 256, (n, lr, lr, 3), dtype=np.uint8),
                       rng.integers(0, 256, (n, hr, hr, 3), dtype=np.uint8),
                       rng.integers(0, 256, (n, hr, hr, 3), dtype=np.uint8),
                       [{"patch_id": f"e0/photo{i}.png/{i}_{i}", "params": "x" * 700} for i in range(n)])

    from multiprocessing import resource_tracker

    from server.pipeline import shared_result

    base_file = shared_result.write_arrays([("lr", base.lr), ("hr", base.hr), ("hr_usm", base.hr_usm)])
    links = iter(range(1 << 62))

    def linked() -> shared_result.BatchFile | None:
        """A new name for the one file (what a worker's batch file is to the main process): no copy."""
        name = f"{base_file.name}-{next(links)}"
        try:
            os.link(base_file.path, os.path.join(shared_result.SHM_DIR, name))
        except OSError:
            return None
        resource_tracker.register("/" + name, "shared_memory")
        return shared_result.BatchFile(name, base_file.layout, base_file.size)

    class Replay:
        workers, prefetch, in_flight, device = 1, 2, 0, "cpu"
        folder = types.SimpleNamespace(images=[], skipped=[])

        def __init__(self):
            self.cfg = cfg

        @staticmethod
        def plan(seed, epoch, cfg=None):
            return types.SimpleNamespace(num_batches=1 << 30, num_patches=n << 30)

        @staticmethod
        def produce(seed, epoch, indices, **kw):
            for k in indices:
                yield dataclasses.replace(base, seed=seed, epoch=epoch, batch_index=k, shared=linked())

        @staticmethod
        def failure_reason(epoch, index):
            return None

    service = DegradeService(Replay(), dataset_name="replay", max_streams=8)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    srv.add_generic_rpc_handlers((service.handler(),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    port_q.put(port)
    stop.wait()
    srv.stop(0)
    service.close()
    base_file.remove()


@contextmanager
def replay_server(video_batch: int) -> Iterator[tuple[Any, str]]:
    """The replaying service in a process of its own; yields (process, address)."""
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_replay_server, args=(video_batch, port_q, stop), daemon=True)
    proc.start()
    try:
        yield proc, f"127.0.0.1:{port_q.get(timeout=300)}"
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _client_main(address: str, mode: str, images: str, seed: int, warmup: list, jobs: list, streams: int,
                 client_kw: dict, ready, start, out) -> None:
    """One client process: a warm-up pull, then the measured pull (its own CPU time around it)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from client import DegradeClient

    torch.set_num_threads(1)
    try:
        if client_kw.pop("replay", False):  # the replaying server has no dataset: only what the wire carries
            include_hr, include_usm = {"full": (True, True), "lr-hr": (True, False), "lr": (False, False)}[mode]
            client_kw.update(include_hr=include_hr, include_hr_usm=include_usm)
            mode = "full"
        with DegradeClient(address, streams_per_server=streams, wire=mode,
                           hr_root=images if mode == "lr" else None, **client_kw) as client:
            for _ in client.jobs(seed, warmup):  # connects, checks the dataset copy (lr), starts the workers
                pass
            ready.put(True)
            start.wait()
            b0, c0, t0 = client.stats.bytes, os.times(), time.perf_counter()
            pairs = shared = 0
            for b in client.jobs(seed, jobs):
                pairs += len(b)
                shared += b.shared_memory
                touch_pages(b)
            c1, t1 = os.times(), time.perf_counter()
            out.put({"pairs": pairs, "seconds": t1 - t0, "client_cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
                     "wire_bytes": client.stats.bytes - b0, "shared_batches": shared})
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        ready.put(False)
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def pull(server_pid: int, address: str, mode: str, images: Path, seed: int, warmup: list, jobs: list,
         streams: int, client_kw: dict, timeout: float, idle_seconds: float) -> dict:
    """One measured pull: figures of the client process and of the server's main process."""
    ctx = mp.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_client_main, daemon=True,
                       args=(address, mode, str(images), seed, warmup, jobs, streams, client_kw, ready, start, out))
    proc.start()
    try:
        if not ready.get(timeout=timeout):
            raise RuntimeError(f"client ({mode}) failed: {out.get(timeout=10)['error']}")
        i0, ti = process_cpu_seconds(server_pid), time.perf_counter()
        time.sleep(idle_seconds)  # the server's CPU while connected and not pulling: its own clock work
        s0, t0 = process_cpu_seconds(server_pid), time.perf_counter()
        idle_rate = (sum(s0) - sum(i0)) / (t0 - ti) if idle_seconds > 0 else 0.0
        start.set()
        res = out.get(timeout=timeout)
        s1 = process_cpu_seconds(server_pid)
        if "error" in res:
            raise RuntimeError(f"client ({mode}) failed: {res['error']}")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    pairs = res["pairs"]
    user, system = s1[0] - s0[0], s1[1] - s0[1]
    server_ms = (user + system) * 1e3 / pairs
    idle_ms = idle_rate * res["seconds"] * 1e3 / pairs
    return {"wire": mode, **res, "server_main_cpu_s": user + system, "server_ms_per_pair": server_ms,
            "server_idle_cpu_ms_per_s": idle_rate * 1e3, "server_idle_ms_per_pair": idle_ms,
            "server_net_ms_per_pair": max(0.0, server_ms - idle_ms),
            "server_user_ms_per_pair": user * 1e3 / pairs, "server_sys_ms_per_pair": system * 1e3 / pairs,
            "client_ms_per_pair": res["client_cpu_s"] * 1e3 / pairs, "kb_per_pair": res["wire_bytes"] / pairs / 1e3,
            "pairs_per_s": pairs / res["seconds"],
            "send_ceiling_pairs_per_s": 1e3 / max(server_ms - idle_ms, 1e-3)}


def plan_jobs(images: Path, cfg, seed: int, pairs: int, first_epoch: int) -> list[tuple[int, int]]:
    """(epoch, index) of consecutive video batches from ``first_epoch`` until ``pairs`` patches."""
    from server.degradation.epoch_plan import make_epoch_plan
    from server.degradation.images import ImageFolder

    folder = ImageFolder(images, cfg.patch_size)
    jobs, n, epoch = [], 0, first_epoch
    while n < pairs:
        plan = make_epoch_plan(folder.images, cfg, seed, epoch)
        for k in range(plan.num_batches):
            if n >= pairs:
                break
            jobs.append((epoch, k))
            n += plan.batch_starts[k + 1] - plan.batch_starts[k]
        epoch += 1
    return jobs


def table(res: dict) -> str:
    """The figures as a Markdown table (the README's)."""
    lines = ["| pipeline | wire | delivery | kB per pair over the socket | server main process, ms CPU per pair (user + sys) | of which idle "
             "| send ceiling, pairs/s at one core | client process, ms CPU per pair | pairs/s delivered |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for f in res["runs"]:
        lines.append(f"| {f['pipeline']} | {f['wire']} | {f['delivery']} | {f['kb_per_pair']:.2f} | {f['server_ms_per_pair']:.2f} "
                     f"({f['server_user_ms_per_pair']:.2f} + {f['server_sys_ms_per_pair']:.2f}) | "
                     f"{f['server_idle_ms_per_pair']:.2f} | "
                     f"{f['send_ceiling_pairs_per_s']:.0f} | {f['client_ms_per_pair']:.2f} | "
                     f"{f['pairs_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.send_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="wire modes (default %(default)s)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help="server pipelines, and 'replay': the service alone (default %(default)s)")
    ap.add_argument("--delivery", default=",".join(DELIVERIES),
                    help="bytes (over the socket) and/or shared (same-host shared-memory slots) (default %(default)s)")
    ap.add_argument("--pairs", type=int, default=192, help="pairs per measured pull (default %(default)s)")
    ap.add_argument("--replay-pairs", type=int, default=3200,
                    help="pairs per pull from the replaying server (default %(default)s)")
    ap.add_argument("--video-batch", type=int, default=32,
                    help="video_batch_size of the served config (default %(default)s: several batches per pull)")
    ap.add_argument("--images", type=Path, default=None, help="HR images (default: the built-in sample photographs)")
    ap.add_argument("--streams", type=int, default=2, help="client streams (default %(default)s)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra degrade-server argument (repeatable), e.g. --server-arg=--no-shared-memory")
    ap.add_argument("--client-kw", default="{}", help="extra DegradeClient keyword arguments, a JSON object")
    ap.add_argument("--idle-seconds", type=float, default=10,
                    help="before each pull, measure the server's CPU while idle this long (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per pull (default %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    deliveries = [d.strip() for d in args.delivery.split(",") if d.strip()]
    if not modes or set(modes) - set(MODES) or not pipelines or set(pipelines) - set(PIPELINES) \
            or not deliveries or set(deliveries) - set(DELIVERIES):
        ap.error(f"--modes takes {', '.join(MODES)}; --pipelines {', '.join(PIPELINES)}; "
                 f"--delivery {', '.join(DELIVERIES)}")
    if not sys.platform.startswith("linux"):
        print("benchmarks.send_path skipped: reads /proc (Linux only)")
        return 0
    from server.degradation.config import DegradationConfig

    if args.images is None:
        from server.degradation.sample_data import ensure_sample_data

        args.images = ensure_sample_data(progress=False)
    images = args.images.resolve()
    cfg = DegradationConfig(video_batch_size=args.video_batch)
    seed = 0
    warmup = plan_jobs(images, cfg, seed, 1, first_epoch=500)[:1]
    jobs = plan_jobs(images, cfg, seed, args.pairs, first_epoch=0)
    replay_jobs = [(0, k) for k in range(-(-args.replay_pairs // args.video_batch))]
    client_kw = json.loads(args.client_kw)
    results = {"command": "python -m benchmarks.send_path " + " ".join(argv if argv is not None else sys.argv[1:]),
               "commit": _commit(), "cores": os.cpu_count(), "platform": platform.platform(), "images": str(images),
               "video_batch_size": args.video_batch, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "send_path.yaml"
        cfg_file.write_text(cfg.to_json())  # JSON is YAML
        for pipeline in pipelines:
            replay = pipeline == "replay"
            serving_ = replay_server(args.video_batch) if replay else server(images, cfg_file, pipeline,
                                                                              args.server_arg)
            with serving_ as (proc, address):
                for mode, delivery in [(m, d) for m in modes for d in deliveries]:
                    runs = (replay_jobs if replay else jobs)
                    kw = {**client_kw, "shared_memory": delivery == "shared"}
                    f = pull(proc.pid, address, mode, images, seed, warmup, runs, args.streams,
                             {**kw, "replay": True} if replay else kw, args.timeout, args.idle_seconds)
                    f["pipeline"], f["delivery"] = pipeline, delivery
                    results["runs"].append(f)
                    print(f"{pipeline:<6} {mode:<6} {delivery:<6} server main {f['server_ms_per_pair']:6.2f} ms/pair "
                          f"({f['server_user_ms_per_pair']:.2f} user) "
                          f"(ceiling {f['send_ceiling_pairs_per_s']:7.0f} pairs/s), client "
                          f"{f['client_ms_per_pair']:6.2f} ms/pair, {f['kb_per_pair']:7.2f} kB/pair, "
                          f"{f['pairs_per_s']:5.1f} pairs/s ({f['pairs']} pairs, {f['shared_batches']} batches "
                          "through shared memory)", flush=True)
    print()
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures -> {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
