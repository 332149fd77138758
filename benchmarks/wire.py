"""Pairs per second over a real, shaped link, for each wire mode: ``python -m benchmarks.wire``.

Two network namespaces joined by a veth pair (10.77.0.1/30 - 10.77.0.2/30,
private addresses inside namespaces made here: no other interface, no route
out, so no packet leaves them), both ends shaped with ``tc`` tbf to each rate
(default 1 Gbit/s and 10 Gbit/s).  A ``degrade-server`` runs in one namespace,
``degrade-client --wire MODE --json`` in the other, for each mode:

* ``full``  - LR + HR + sharpened HR over the link (today's wire);
* ``lr-hr`` - LR + HR, the client sharpens (here on the CPU: ``--device``);
* ``lr``    - LR + records, the client cuts HR from its copy of the images (here the
  same folder, checked against the server's fingerprint) and sharpens.

Next to them, the engine's own pairs/s in-process on the same machine (same
images, same batches, all cores), with and without the sharpened HR.  Each run
is bounded (``--pairs``, ``--seconds``, ``--timeout``).  The namespaces are always removed,
on error and on Ctrl-C too.  Needs root and ``ip``/``tc`` (iproute2:
``apt-get install -y iproute2``); elsewhere it says why and exits 0.  CI does
not run it.

The namespaces share this host's /dev/shm, so the client would prove it can
read the server's shared memory and take the tensors from there (same-host
delivery, README "Same host"): every client here runs with
``--no-shared-memory``, so the bytes cross the shaped link.

On a small machine the server and the client share the cores, so a client
that sharpens or decodes on the CPU takes them from the server's workers; on
a real trainer that work is on its own GPU/CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVER_IP, CLIENT_IP, PREFIX = "10.77.0.1", "10.77.0.2", 30
PORT = 50051
MODES = ("full", "lr-hr", "lr")


class Skip(Exception):
    """The benchmark cannot run here (not root, no iproute2, namespaces not allowed)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _rate_bits(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 100mbit, 1gbit, 10gbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


class Link:
    """Two fresh network namespaces joined by a shaped veth pair; ``close`` removes everything."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns_server, self.ns_client = f"dgw-srv-{tag}", f"dgw-cli-{tag}"
        self.dev_server, self.dev_client = f"dgws{tag}", f"dgwc{tag}"  # <= 15 characters
        self._made: list[str] = []

    @staticmethod
    def preflight() -> None:
        if os.geteuid() != 0:
            raise Skip("needs root (network namespaces, veth, tc)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise Skip(f"`{tool}` not found: apt-get install -y iproute2")

    def open(self) -> "Link":
        self.preflight()
        for ns in (self.ns_server, self.ns_client):
            proc = _run("ip", "netns", "add", ns, check=False)
            if proc.returncode != 0:
                raise Skip(f"cannot create network namespaces here: {proc.stderr.strip()}")
            self._made.append(ns)
        _run("ip", "link", "add", self.dev_server, "type", "veth", "peer", "name", self.dev_client)
        _run("ip", "link", "set", self.dev_server, "netns", self.ns_server)
        _run("ip", "link", "set", self.dev_client, "netns", self.ns_client)
        for ns, dev, ip in ((self.ns_server, self.dev_server, SERVER_IP), (self.ns_client, self.dev_client, CLIENT_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/{PREFIX}", "dev", dev)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        return self

    def shape(self, rate: str) -> None:
        """tbf on both ends: ``rate``, a burst of 4 ms at that rate (at least 128 kB, above GSO sizes)."""
        burst = max(int(_rate_bits(rate) / 8 * 0.004), 128 * 1024)
        for ns, dev in ((self.ns_server, self.dev_server), (self.ns_client, self.dev_client)):
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                 "burst", str(burst), "latency", "50ms")

    def exec_cmd(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def close(self) -> None:
        for ns in self._made:  # our namespaces hold only processes this benchmark started
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", ns, check=False)  # the veth end inside goes with it, and its peer
        self._made = []
        if _run("ip", "link", "show", self.dev_server, check=False).returncode == 0:
            _run("ip", "link", "del", self.dev_server, check=False)


@contextmanager
def link() -> Iterator[Link]:
    net = Link()
    try:
        yield net.open()
    finally:
        net.close()


@contextmanager
def server_in(net: Link, images: Path, workers: int | None, cfg_file: Path | None) -> Iterator[subprocess.Popen]:
    cmd = [sys.executable, "-m", "server", "serve", "--images", str(images), "--host", SERVER_IP, "--port", str(PORT),
           "--device", "cpu", "--drain-seconds", "0", "--grace-seconds", "2"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if cfg_file is not None:
        cmd += ["--config", str(cfg_file)]
    proc = subprocess.Popen(net.exec_cmd(net.ns_server, *cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "listening on port" in line:
                break
            if not line and proc.poll() is not None:
                raise RuntimeError("the degrade-server in the namespace did not start")
        else:
            raise RuntimeError("the degrade-server in the namespace did not start within 300 s")
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def pull(net: Link, mode: str, pairs: int, images: Path, timeout: float, streams: int,
         seconds: float | None = None) -> dict:
    """One bounded degrade-client run in the client namespace (``pairs``, or the first whole batch after
    ``seconds``); its --json figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, "-m", "client.cli", "--server", f"{SERVER_IP}:{PORT}", "--wire", mode,
               "--pairs", str(pairs), "--device", "cpu", "--streams", str(streams), "--json", str(out),
               "--no-shared-memory"]  # the link is what is measured (a namespace shares /dev/shm)
        if mode == "lr":
            cmd += ["--hr-root", str(images)]
        if seconds is not None:
            cmd += ["--seconds", str(seconds)]
        proc = subprocess.run(net.exec_cmd(net.ns_client, *cmd), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"degrade-client --wire {mode} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        return json.loads(out.read_text())


_TCP_SOURCE = """
import socket, sys, time
s = socket.create_server(("{ip}", {port})); c, _ = s.accept()
buf = b"\\0" * (1 << 20); end = time.monotonic() + {seconds}
while time.monotonic() < end:
    c.sendall(buf)
c.close()
"""
_TCP_SINK = """
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection(("{ip}", {port})); break
    except OSError:
        time.sleep(0.05)
n, t0 = 0, time.perf_counter()
while (b := c.recv(1 << 20)):
    n += len(b)
print(n / (time.perf_counter() - t0))
"""


def raw_tcp(net: Link, seconds: float = 2.0) -> float:
    """Bytes/s of one plain TCP stream server -> client over the shaped link (a check of the shaper)."""
    port = PORT + 1
    src = subprocess.Popen(net.exec_cmd(net.ns_server, sys.executable, "-c",
                                        _TCP_SOURCE.format(ip=SERVER_IP, port=port, seconds=seconds)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = subprocess.run(net.exec_cmd(net.ns_client, sys.executable, "-c",
                                          _TCP_SINK.format(ip=SERVER_IP, port=port)),
                             capture_output=True, text=True, timeout=seconds + 30)
        return float(out.stdout.strip() or 0)
    finally:
        src.kill()
        src.wait()


def engine_rates(images: Path, cfg_file: Path | None, workers: int | None, pairs: int, seed: int = 0) -> dict:
    """The engine's own pairs/s in-process (all cores) on the batches a client pulling ``pairs`` gets."""
    from server.degradation.config import DegradationConfig
    from server.degradation.images import ImageFolder
    from server.pipeline.batch import BatchProducer

    cfg = DegradationConfig.load(cfg_file)
    folder = ImageFolder(images, cfg.patch_size)
    out = {}
    with BatchProducer(folder, cfg, workers=workers) as producer:
        jobs, n, epoch = [], 0, 0
        while n < pairs:
            plan = producer.plan(seed, epoch)
            for k in range(plan.num_batches):
                if n < pairs:
                    jobs.append((epoch, k))
                    n += plan.batch_starts[k + 1] - plan.batch_starts[k]
            epoch += 1
        list(producer.produce_jobs(seed, jobs[:1]))  # warm-up: the worker processes start
        for key, usm in (("engine_full", True), ("engine_no_usm", False)):
            t0 = time.perf_counter()
            made = sum(len(r) for r in producer.produce_jobs(seed, jobs, want_usm=usm))
            out[key] = made / (time.perf_counter() - t0)
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wire", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1gbit,10gbit", help="link rates, tc syntax (default %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES), help="wire modes (default %(default)s)")
    ap.add_argument("--pairs", type=int, default=384, help="pairs per run (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=60,
                    help="or stop a run at the first whole video batch after this long (default %(default)s)")
    ap.add_argument("--images", type=Path, default=None, help="HR images (default: the built-in sample photographs)")
    ap.add_argument("--config", type=Path, default=None, help="degradation config (default: the spec's)")
    ap.add_argument("--workers", type=int, default=None, help="server worker processes (default: one per core)")
    ap.add_argument("--streams", type=int, default=2, help="client streams (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per client run (default %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or not rates:
        ap.error(f"--modes takes {', '.join(MODES)}; --rates at least one rate")
    for r in rates:
        _rate_bits(r)
    if args.images is None:
        from server.degradation.sample_data import ensure_sample_data

        args.images = ensure_sample_data(progress=False)
    images = args.images.resolve()

    def on_term(signum, _frame):  # SIGTERM like Ctrl-C: the finally blocks remove the namespaces
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    results = {"command": "python -m benchmarks.wire " + " ".join(argv if argv is not None else sys.argv[1:]),
               "commit": _commit(), "cores": os.cpu_count(), "platform": platform.platform(), "pairs": args.pairs,
               "images": str(images), "runs": []}
    try:
        Link.preflight()
        print(f"engine in-process ({args.pairs} pairs per figure) ...", flush=True)
        results.update(engine_rates(images, args.config, args.workers, args.pairs))
        print(f"  engine: {results['engine_full']:.1f} pairs/s with the sharpened HR, "
              f"{results['engine_no_usm']:.1f} without", flush=True)
        with link() as net, server_in(net, images, args.workers, args.config):
            net.shape(rates[0])
            pull(net, "full", 64, images, args.timeout, args.streams)  # warm-up: the server's workers start
            for rate in rates:
                net.shape(rate)
                tcp = raw_tcp(net)
                print(f"link {rate}: one plain TCP stream moves {tcp / 1e6:.0f} MB/s", flush=True)
                for mode in modes:
                    f = pull(net, mode, args.pairs, images, args.timeout, args.streams, args.seconds)
                    f.update(rate=rate, raw_tcp_bytes_per_s=tcp)
                    results["runs"].append(f)
                    print(f"  {mode:<6} {f['pairs_per_s']:8.1f} pairs/s {f['mb_per_s']:8.1f} MB/s "
                          f"{f['bytes_per_pair'] / 1e3:8.1f} kB/pair ({f['pairs']} pairs, {f['seconds']:.1f} s)",
                          flush=True)
    except Skip as exc:
        print(f"benchmarks.wire skipped: {exc}")
        return 0
    except KeyboardInterrupt:
        print("interrupted: namespaces removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures -> {args.json}")
    return 0


def table(res: dict) -> str:
    """The results as a Markdown table (the README's)."""
    names = {"full": "full: LR + HR + sharpened HR", "lr-hr": "lr-hr: LR + HR, USM on the client",
             "lr": "lr: LR + records, HR + USM on the client"}
    lines = ["| link | wire | pairs/s delivered | MB/s | kB per pair | engine in-process, pairs/s |",
             "|---|---|---:|---:|---:|---:|"]
    for f in res["runs"]:
        eng = res["engine_full"] if f["wire"] == "full" else res["engine_no_usm"]
        lines.append(f"| {f['rate']} (TCP {f['raw_tcp_bytes_per_s'] / 1e6:.0f} MB/s) | {names[f['wire']]} | "
                     f"{f['pairs_per_s']:.1f} | {f['mb_per_s']:.1f} | {f['bytes_per_pair'] / 1e3:.1f} | {eng:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
