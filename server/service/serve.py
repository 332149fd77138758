"""``degrade-server``: the gRPC degradation service (also ``python -m server serve``).

    degrade-server [--images DIR] [--host H] [--port P] [--workers N] [--cpus N]
                   [--device auto|cpu|cuda] [--pipeline auto|split|batch] [--token T | --token-file F]
                   [--tls-cert C --tls-key K] [--config FILE] [--metrics-port M]
                   [--max-streams S] [--max-waiting-streams W] [--idle-stream-seconds I]
                   [--store-dir DIR | --no-store] [--store-max-gb G]

:func:`create_server` builds a started-or-not server from a frozen
:class:`ServerConfig` and returns it with its bound port (tests bind port 0);
:func:`main` adds the command line, logging and signal handling.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING at once, new streams
get UNAVAILABLE, running streams finish the batch they are sending and end
with UNAVAILABLE (their clients re-ask another server for the rest), and
after ``drain_seconds`` + at most ``grace_seconds`` the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.protocol import degrade_pb2 as pb
from server.degradation.config import PROFILES, ConfigError, DegradationConfig
from server.degradation.cpu_budget import ENV as CPUS_ENV
from server.degradation.cpu_budget import CpuBudget, cpu_budget, parse_cpus
from server.degradation.fingerprint import fingerprint
from server.degradation.images import ImageFolder
from server.degradation.pixel_store import add_store_arguments, default_store_dir
from server.pipeline.registry import add_pipeline_argument, make_producer

from .degrader import SERVICE_NAME, DegradeService, package_version
from .requests import MAX_CHUNK_BYTES

log = logging.getLogger("degrade.server")

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``degrade-server`` is started with (logged at start-up, token redacted)."""

    images: Path | None = None          # None: the built-in sample photographs
    host: str = "[::]"
    port: int = DEFAULT_PORT            # 0: any free port (tests)
    workers: int | None = None          # None: one per core of the CPU budget
    cpus: float | None = None           # explicit CPU limit (--cpus / $DEGRADE_CPUS); the budget is the smallest
                                        # of it, the affinity set and the cgroup quota
    device: str = "auto"                # auto: cuda when torch sees a GPU, else cpu
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    config_file: Path | None = None
    profile: str = "vcisr"
    metrics_port: int | None = None     # None: no Prometheus endpoint
    max_streams: int = 8                # concurrent StreamBatches; more wait their turn (fairly)
    max_waiting_streams: int | None = None  # streams that may wait for a slot (None: max_streams); more: RESOURCE_EXHAUSTED
    idle_stream_seconds: float = 60.0   # a stream whose client accepts no chunk this long is cancelled (0: never)
    drain_seconds: float = 2.0          # NOT_SERVING before closing, so balancers stop sending
    grace_seconds: float = 30.0         # then in-flight RPCs get this long to finish
    max_video_batch: int = 256          # largest video batch a request may ask for
    codec_backend: str = "auto"         # auto | software | hybrid | nvenc, or per codec: "auto,libx264=nvenc"
    pipeline: str = "auto"              # auto (split on a GPU, batch on the CPU) | split | batch
    store_dir: Path | None = None       # pixel stores; None: $DEGRADE_STORE_DIR, else ~/.cache/vcisr-degrade/stores
    no_store: bool = False              # decode at every use, write no pixel store
    store_max_gb: float | None = None   # None: $DEGRADE_STORE_MAX_GB, else pixel_store.DEFAULT_MAX_GB
    shared_memory: bool = True          # same-host clients that prove it get slots in /dev/shm, not bytes
    slot_seconds: float = 60.0          # a slot not given back this long after it was sent is removed

    def redacted(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d["token"] = "<set>" if self.token else None
        return d

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def cpu_budget(self) -> CpuBudget:
        """The cores this server sizes itself to (server/degradation/cpu_budget.py)."""
        return cpu_budget(self.cpus)


# ---------------------------------------------------------------------------
#: Channel options of the server, each for a reason.
SERVER_OPTIONS = [
    # requests are small; anything bigger than this is refused by gRPC before it reaches us
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # chunks are kept below MAX_CHUNK_BYTES; this is the hard ceiling
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 256 * 1024),
    # keepalive enforcement: clients ping every 20 s (client/connection.py) to tell a slow server from a
    # dead one; accept pings down to every 10 s, also on connections without calls and during streams
    # that send nothing for minutes (an overloaded pool); faster pings are strikes (default: 2, then GOAWAY)
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # our own pings: a client that vanished (power cut, network gone, no FIN) is noticed within about
    # 90 s and its streams end, so their slots come back (an alive client that reads nothing is the
    # idle-stream watchdog's business)
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a stream that is waiting for the pool
    # two servers must not share one port by accident (SO_REUSEPORT would split traffic)
    ("grpc.so_reuseport", 0),
]


class DegradeServer:
    """A gRPC server, its worker pool, health service and metrics endpoint, started and stopped as one."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.Server, port: int, service: DegradeService,
                 health_servicer: health.HealthServicer):
        self.config = config
        self.grpc = grpc_server
        self.port = port
        self.service = service
        self.health = health_servicer
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._stopped = threading.Event()

    @property
    def metrics(self):
        return self.service.metrics

    def start(self) -> "DegradeServer":
        self.grpc.start()
        if self.config.metrics_port is not None:
            host = "::" if self.config.host in ("[::]", "::") else self.config.host
            self._metrics_http, _ = self.service.metrics.serve_http(self.config.metrics_port, host=host)
            self.metrics_port = self._metrics_http.server_port
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d (metrics: %s)", self.service.dataset_name, self.port,
                 self.metrics_port or "off")
        return self

    def shutdown(self, drain_seconds: float | None = None, grace_seconds: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, drain, let streams end, close the pool. Idempotent."""
        if self._stopped.is_set():
            return
        drain = self.config.drain_seconds if drain_seconds is None else drain_seconds
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        log.info("shutting down: NOT_SERVING now, closing in %.1f s (grace %.1f s)", drain, grace)
        self.health.enter_graceful_shutdown()
        self.service.begin_shutdown()
        if drain > 0:
            self._stopped.wait(drain)
        self.grpc.stop(grace).wait()
        self.service.close()
        self.service.producer.close(terminate=True)  # batches still running have no receiver any more
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self._stopped.set()
        log.info("stopped")

    def stop_now(self) -> None:
        """Immediate stop (tests)."""
        self.shutdown(drain_seconds=0, grace_seconds=0)

    def wait(self) -> None:
        while not self._stopped.wait(0.5):  # short waits keep the main thread responsive to signals
            pass


def create_server(config: ServerConfig) -> tuple[DegradeServer, int]:
    """Build the server (not started): images scanned, pool ready, port bound. Returns (server, port)."""
    cfg = DegradationConfig.load(config.config_file, config.profile)
    budget = config.cpu_budget()
    log.info("%s", budget.describe())
    helper_threads = min(8, budget.cores)  # scan and hashing threads
    if config.images is not None:
        root = config.images
    else:
        from server.degradation.sample_data import ensure_sample_data

        root = ensure_sample_data(progress=False)
    store_dir = None if config.no_store else (config.store_dir or default_store_dir())
    t0 = time.perf_counter()
    folder = ImageFolder(root, cfg.patch_size, store_dir=store_dir, store_max_gb=config.store_max_gb,
                         scan_threads=helper_threads, progress=sys.stderr.isatty())
    log.info("images: %s - %d usable, %d skipped, scanned in %.1f s (%s)", root, len(folder.images),
             len(folder.skipped), time.perf_counter() - t0,
             f"pixel store {folder.store_path}" if folder.store_path else "no pixel store")
    t0 = time.perf_counter()
    dataset_files = folder.dataset_files(threads=helper_threads)
    log.info("dataset fingerprint %s (blake2b of %d files, %.1f s)", fingerprint(dataset_files)[:16],
             len(dataset_files), time.perf_counter() - t0)
    device = config.resolved_device()
    backend, backend_names = None, ["software"]
    if device != "cpu" or config.codec_backend not in ("auto", "software"):
        from server.codecs.selection import build_backend

        backend, plan = build_backend(override=config.codec_backend, device=device)
        log.info("codec backends:\n%s", plan.explain())
        # names, then what the probe warns about (e.g. "nvenc unavailable: ...; NVDEC via direct module load")
        backend_names = sorted(plan.backends_used) + list(plan.hardware_warnings)
    producer = make_producer(folder, cfg, pipeline=config.pipeline, workers=config.workers, device=device,
                             backend=backend, cpus=budget.cores)
    service = DegradeService(producer, dataset_name=folder.dataset_name, max_streams=config.max_streams,
                             max_video_batch=config.max_video_batch, codec_backends=backend_names,
                             max_waiting_streams=config.max_waiting_streams,
                             idle_stream_seconds=config.idle_stream_seconds, dataset_files=dataset_files,
                             cpu_budget=budget, shared_memory=config.shared_memory, slot_seconds=config.slot_seconds)

    interceptors = []
    if config.token:
        from .auth import TokenAuthInterceptor

        interceptors.append(TokenAuthInterceptor(
            config.token, on_deny=lambda: service.metrics.rejected.labels("UNAUTHENTICATED").inc()))
    # threads: every allowed stream and every waiting one, plus room for GetInfo, health and the streams
    # we turn away (past this gRPC itself answers RESOURCE_EXHAUSTED)
    threads = config.max_streams + service.max_waiting_streams + 16
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         interceptors=interceptors, options=SERVER_OPTIONS, maximum_concurrent_rpcs=threads)
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # until start()
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Degrader"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        creds = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        producer.close()
        raise OSError(f"cannot listen on {address} (port in use or address not available)")
    return DegradeServer(replace(config, port=port), server, port, service, health_servicer), port


# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="degrade-server",
        description="Serve VCISR-degraded LR/HR training pairs over gRPC (degrade.v1.Degrader, plus "
                    "grpc.health.v1 and reflection). Batches are made by a worker pool using every core "
                    "(and the GPU with --device cuda) and streamed with backpressure.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: DEGRADE_TOKEN or DEGRADE_TOKEN_FILE set the token when no flag does; "
               "DEGRADE_SAMPLE_DIR is where the built-in sample photographs live; DEGRADE_HASH_CACHE is the file "
               "caching the dataset fingerprint's per-image hashes (default ~/.cache/vcisr-degrade/"
               "file-hashes.json; 'off' to disable); DEGRADE_STORE_DIR and DEGRADE_STORE_MAX_GB set --store-dir "
               "('off': --no-store) and --store-max-gb; DEGRADE_CPUS is the CPU limit when --cpus is not given.\n\n"
               "Examples:\n  degrade-server                         # sample data, port 50051, all cores\n"
               "  degrade-server --images /data --token-file /run/secrets/degrade_token --metrics-port 9100",
    )
    p.add_argument("--images", type=Path, default=None,
                   help="folder of HR images (short side >= the patch size), or a pixel store file written by "
                        "`degrade pack`; default: built-in sample photographs")
    add_store_arguments(p)
    p.add_argument("--host", default="[::]", help="address to listen on (default: all, IPv4 and IPv6)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (default %(default)s; 0 = any free)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per core of the CPU budget, see --cpus)")
    p.add_argument("--cpus", default=None, metavar="N",
                   help=f"CPU limit (fractions allowed, e.g. 4 or 1.5; default ${CPUS_ENV}, else none): the server "
                        "sizes its workers and threads to the smallest of this, its affinity set and its cgroup "
                        "CPU quota (a container's --cpus or a Kubernetes CPU limit), rounded up")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1, ...")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="require 'authorization: Bearer TOKEN' on every RPC but health")
    tok.add_argument("--token-file", type=Path, default=None, help="read the token from a file (e.g. a secret)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    p.add_argument("--config", type=Path, default=None, help="TOML or YAML degradation config")
    p.add_argument("--profile", choices=PROFILES, default="vcisr", help="degradation profile (default vcisr)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--codec-backend", default="auto",
                   help="video codecs: auto (NVENC where the GPU has it, software otherwise), software, hybrid "
                        "(software encode + NVDEC decode), nvenc, or per codec e.g. 'auto,libx264=hybrid'")
    add_pipeline_argument(p)
    p.add_argument("--max-streams", type=int, default=8,
                   help="concurrent streams served (default %(default)s); more wait for a slot, which goes to the "
                        "least-served client first")
    p.add_argument("--max-waiting-streams", type=int, default=None,
                   help="streams that may wait for a slot (default: --max-streams); past them new streams get "
                        "RESOURCE_EXHAUSTED at once (clients retry with backoff)")
    p.add_argument("--idle-stream-seconds", type=float, default=60.0,
                   help="cancel a stream (ABORTED) whose client has accepted no chunk for this long, so a client "
                        "that stopped reading gives its slot back (default %(default)s; 0: never). Waiting for a "
                        "slot or for the pool does not count")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="send every client its tensors as bytes. By default a client on this host that proves it "
                        "reads this server's /dev/shm (same host, same /dev/shm, same user) gets each batch as a "
                        "shared-memory slot instead: ~1 kB per pair over the socket, no pixel copied by the server")
    p.add_argument("--slot-seconds", type=float, default=60.0,
                   help="a shared-memory slot its client has not given back this long after it was sent is "
                        "removed (a client that died or stopped never holds /dev/shm; default %(default)s)")
    p.add_argument("--drain-seconds", type=float, default=2.0,
                   help="on SIGTERM, seconds of NOT_SERVING before closing (default %(default)s)")
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="then seconds in-flight calls get to finish (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace, environ: dict | None = None) -> ServerConfig:
    env = os.environ if environ is None else environ
    token = args.token
    token_file = args.token_file or (Path(env["DEGRADE_TOKEN_FILE"]) if env.get("DEGRADE_TOKEN_FILE") else None)
    if token is None and token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"the token file {token_file} is empty")
    if token is None:
        token = env.get("DEGRADE_TOKEN") or None
    if args.max_streams < 1:
        raise ConfigError("--max-streams must be at least 1")
    if args.max_waiting_streams is not None and args.max_waiting_streams < 0:
        raise ConfigError("--max-waiting-streams must be 0 or more")
    if args.idle_stream_seconds < 0:
        raise ConfigError("--idle-stream-seconds must be 0 (never) or more")
    if args.slot_seconds <= 0:
        raise ConfigError("--slot-seconds must be positive")
    if args.store_max_gb is not None and args.store_max_gb < 0:
        raise ConfigError("--store-max-gb must be 0 or more")
    return ServerConfig(
        images=args.images, host=args.host, port=args.port, workers=args.workers, device=args.device, token=token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, config_file=args.config, profile=args.profile,
        metrics_port=args.metrics_port, max_streams=args.max_streams,
        max_waiting_streams=args.max_waiting_streams, idle_stream_seconds=args.idle_stream_seconds,
        drain_seconds=args.drain_seconds, grace_seconds=args.grace_seconds, codec_backend=args.codec_backend,
        pipeline=args.pipeline, cpus=parse_cpus(args.cpus if args.cpus is not None else env.get(CPUS_ENV),
                                                "--cpus" if args.cpus is not None else f"${CPUS_ENV}"),
        store_dir=args.store_dir, no_store=args.no_store, store_max_gb=args.store_max_gb,
        shared_memory=not args.no_shared_memory, slot_seconds=args.slot_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = config_from_args(args)
        log.info("degrade-server %s, config: %s", package_version(), config.redacted())
        server, port = create_server(config)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"degrade-server: error: {exc}", file=sys.stderr)
        return 2
    log.info("degradation config: %s", server.service.cfg.to_json())
    producer = server.service.producer
    log.info("%s pipeline: %d worker process(es), engine on %s (%s)", producer.pipeline, producer.workers,
             producer.device, server.service.cpu_budget.describe())

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"degrade-server listening on port {port}", flush=True)
    server.wait()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
