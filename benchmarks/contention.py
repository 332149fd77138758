"""A busy neighbour beside the server: delivered pairs/s alone and next to a busy process.

``python -m benchmarks.contention`` runs, for each pipeline (batch, split) and each server
sizing (``--workers 1``, the default, ``--cpus 1``), one ``degrade-server`` subprocess in a
session of its own (as a container or a systemd unit runs it) and one client process
pulling full-wire pairs from it without pause.  The client's pairs are counted in two
windows of ``--seconds`` each:

1. **alone**: nothing else runs;
2. **busy**: ``--busy`` plain busy-loop processes run in another session (``setsid``), the
   way a trainer runs beside the server on the same box.

The ratio busy/alone is the figure (1.0: the neighbour costs nothing; the share the
scheduler gives the server's session is about ``cores / (cores + busy)`` of what it had,
so on 2 cores with one busy process ~0.5 is "slowed in proportion").  With ``--clients N``
it instead runs the fairness case: N client processes (2 streams each) on one server,
alone and then beside the busy process, reporting pairs per client, min/max and the
longest gap any client went without a pair.

Rates come from batch arrival times (pairs after a window's first arrival / time to its
last arrival), so a 128-patch video batch does not quantise a short window; a window in
which fewer than two batches arrive reports 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server.degradation.config import DegradationConfig

from server.bench.delivered import server_process

#: a busy loop that ends by itself when its parent (this benchmark) dies, even by SIGKILL
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"

#: server sizings: a name and the flags that make it
SIZINGS = {"workers1": ("--workers", "1"), "default": (), "cpus1": ("--cpus", "1")}


def _client_main(address: str, seed: int, streams: int, ready, stop, out) -> None:
    """Pull epochs without pause until ``stop`` is set; put (arrival time, pairs) per video batch on ``out``."""
    from client import DegradeClient

    with DegradeClient(address, streams_per_server=streams) as client:
        client.info(seed, 0)
        ready.put(os.getpid())
        try:
            for batch in client.epochs(seed, 0):
                out.put((os.getpid(), time.time(), len(batch)))
                if stop.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the benchmark goes on
            out.put((os.getpid(), time.time(), f"{type(exc).__name__}: {exc}"))


def window_rate(arrivals: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Pairs/s from the batches that arrived in [t0, t1): pairs after the first arrival / time to the last."""
    inside = [(t, n) for t, n in arrivals if t0 <= t < t1]
    if len(inside) < 2:
        return 0.0
    return sum(n for _, n in inside[1:]) / max(1e-9, inside[-1][0] - inside[0][0])


def longest_gap(arrivals: list[tuple[float, int]], t0: float, t1: float) -> float:
    """The longest time in [t0, t1) without an arrival."""
    times = [t0] + sorted(t for t, _ in arrivals if t0 <= t < t1) + [t1]
    return max(b - a for a, b in zip(times, times[1:]))


class _Clients:
    """``n`` client processes pulling from ``address``; their arrivals collected as they come."""

    def __init__(self, address: str, n: int, seed: int, streams: int):
        ctx = mp.get_context("spawn")
        self.ready, self.stop, self.out = ctx.Queue(), ctx.Event(), ctx.Queue()
        self.procs = [ctx.Process(target=_client_main, args=(address, seed + i, streams, self.ready, self.stop,
                                                             self.out), daemon=True) for i in range(n)]
        for p in self.procs:
            p.start()
        self.pids = [self.ready.get(timeout=300) for _ in self.procs]
        self.arrivals: dict[int, list[tuple[float, int]]] = {pid: [] for pid in self.pids}
        self.errors: list[str] = []

    def collect(self, until: float) -> None:
        """Take arrivals until the wall clock reaches ``until``."""
        import queue

        while (left := until - time.time()) > 0:
            try:
                pid, t, n = self.out.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if isinstance(n, str):
                self.errors.append(n)
            else:
                self.arrivals.setdefault(pid, []).append((t, n))

    def first_batch(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not all(self.arrivals.values()):
            self.collect(min(deadline, time.time() + 0.5))

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=True) for _ in range(n)]


def _end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)


def measure(images: Path | None, cfg: DegradationConfig, pipeline: str, flags: tuple[str, ...], *, seconds: float,
            busy: int, clients: int = 1, streams: int = 2, warmup: float = 10.0, seed: int = 0) -> dict[str, Any]:
    """Delivered pairs/s (per client) alone and beside ``busy`` busy processes, from one server."""
    from server.degradation.sample_data import ensure_sample_data

    root = images if images is not None else ensure_sample_data(progress=False)
    with server_process(root, cfg, None, pipeline=pipeline, extra=flags, new_session=True) as address:
        pool = _Clients(address, clients, seed, streams)
        try:
            pool.first_batch(timeout=600)  # every worker pool started, every client receiving
            pool.collect(time.time() + warmup)
            t_alone = time.time()
            pool.collect(t_alone + seconds)
            hogs = _busy(busy)
            try:
                pool.collect(time.time() + min(3.0, warmup))  # the scheduler settles on the new shares
                t_busy = time.time()
                pool.collect(t_busy + seconds)
            finally:
                _end(hogs)
        finally:
            pool.close()
    res: dict[str, Any] = {"pipeline": pipeline, "flags": " ".join(flags) or "(default)", "errors": pool.errors}
    for name, t0 in (("alone", t_alone), ("busy", t_busy)):
        rates = [window_rate(a, t0, t0 + seconds) for a in pool.arrivals.values()]
        pairs = [sum(n for t, n in a if t0 <= t < t0 + seconds) for a in pool.arrivals.values()]
        res[name] = {"pairs_per_s": sum(rates), "per_client_pairs": pairs,
                     "longest_gap_s": max(longest_gap(a, t0, t0 + seconds) for a in pool.arrivals.values())}
    res["ratio"] = res["busy"]["pairs_per_s"] / max(1e-9, res["alone"]["pairs_per_s"])
    return res


def _table(rows: list[dict[str, Any]], clients: int) -> str:
    lines = ["| pipeline | server flags | alone (pairs/s) | busy neighbour (pairs/s) | busy / alone |"
             + (" per client, busy | min/max | longest gap (s) |" if clients > 1 else ""),
             "|---|---|---:|---:|---:|" + ("---|---:|---:|" if clients > 1 else "")]
    for r in rows:
        line = (f"| {r['pipeline']} | {r['flags']} | {r['alone']['pairs_per_s']:.1f} | "
                f"{r['busy']['pairs_per_s']:.1f} | {r['ratio']:.2f} |")
        if clients > 1:
            p = r["busy"]["per_client_pairs"]
            line += f" {p} | {min(p) / max(1, max(p)):.2f} | {r['busy']['longest_gap_s']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.contention",
        description="Delivered pairs/s of a degrade-server in its own session, alone and beside a busy process "
                    "in another session (a trainer on the same box). Prints a Markdown table of the ratios.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=Path, default=None, help="HR image folder (default: the built-in sample photographs)")
    p.add_argument("--pipelines", default="batch,split", help="comma-separated pipelines to measure")
    sizings = ", ".join(f"{k} ({' '.join(v) or 'no flag'})" for k, v in SIZINGS.items())
    p.add_argument("--sizings", default=",".join(SIZINGS), help=f"comma-separated server sizings: {sizings}")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each window (alone, busy)")
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes in the neighbour's session")
    p.add_argument("--clients", type=int, default=1,
                   help="client processes (2 streams each); more than 1 also reports fairness")
    p.add_argument("--streams", type=int, default=2, help="streams per client")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds pulled before the first window")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    cfg = DegradationConfig()
    unknown = [s for s in args.sizings.split(",") if s not in SIZINGS]
    if unknown:
        p.error(f"unknown sizing(s) {unknown}; choose from {list(SIZINGS)}")
    rows = []
    for pipeline in args.pipelines.split(","):
        for sizing in args.sizings.split(","):
            print(f"{pipeline} pipeline, {sizing}: {args.seconds:.0f} s alone, then {args.seconds:.0f} s beside "
                  f"{args.busy} busy process(es) ...", flush=True)
            r = measure(args.images, cfg, pipeline, SIZINGS[sizing], seconds=args.seconds, busy=args.busy,
                        clients=args.clients, streams=args.streams, warmup=args.warmup)
            print(f"  alone {r['alone']['pairs_per_s']:.1f} pairs/s, busy {r['busy']['pairs_per_s']:.1f} pairs/s, "
                  f"ratio {r['ratio']:.2f}; longest gap beside the busy process {r['busy']['longest_gap_s']:.0f} s"
                  + (f"; errors: {r['errors']}" if r["errors"] else ""), flush=True)
            rows.append(r)
    print()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; {args.clients} client(s) x {args.streams} streams; "
          f"{args.busy} busy process(es); windows of {args.seconds:.0f} s")
    print(_table(rows, args.clients))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
