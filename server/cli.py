"""``degrade`` - the command line of the degradation engine.

    degrade sample-data DIR          write the built-in sample photographs
    degrade generate --out OUT       degrade a folder into LR/HR/USM PNGs + records.jsonl
    degrade preview --out sheet.png  a contact sheet of HR/LR pairs with their codecs
    degrade bench                    the standard workload of BENCH.md (engine, delivered, codec limit, naive)
    degrade demo --out OUT           sample data -> a few hundred pairs -> preview sheet
    degrade pack --images DIR --out FILE   the decoded images of DIR in one pixel store file
    degrade serve ...                the gRPC server (same as ``degrade-server``)
    degrade health ...               probe a server's health (same as ``degrade-health``)

Every command that needs images uses the built-in sample photographs when
``--images`` is not given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from .degradation.config import PROFILES, ConfigError, DegradationConfig
from .degradation.cpu_budget import ENV as CPUS_ENV
from .degradation.cpu_budget import cpu_budget, parse_cpus
from .degradation.pixel_store import add_store_arguments
from .pipeline.registry import add_pipeline_argument

log = logging.getLogger("degrade")


# ---------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, out_required: bool = False) -> None:
    p.add_argument("--images", type=Path, default=None,
                   help="folder of HR images (>= 360 px on the short side), or a pixel store file written by "
                        "`degrade pack`; default: built-in sample photographs")
    add_store_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0); with epoch and batch it fixes every draw")
    p.add_argument("--epoch", type=int, default=0, help="first epoch to produce (default 0)")
    p.add_argument("--profile", choices=PROFILES, default="vcisr",
                   help="vcisr = the paper (default); vcisr-code = the authors' code quirks (spec section 7)")
    p.add_argument("--config", type=Path, default=None, help="TOML or YAML file of config overrides")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per core, or every core but one for the split pipeline; "
                        "0 = in-process)")
    p.add_argument("--cpus", default=None, metavar="N",
                   help=f"CPU limit (e.g. 4 or 1.5; default ${CPUS_ENV}): workers and threads are sized to the "
                        "smallest of this, the affinity set and the cgroup CPU quota")
    add_pipeline_argument(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="degrade",
        description="Fast in-memory VCISR degradation: real-world LR/HR training pairs with blur, resize, "
                    "noise, JPEG and video-codec (MPEG-2/MPEG-4/H.264/H.265) artifacts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  degrade demo --out out\n  degrade generate --images photos/ --out pairs/ --limit 1000\n"
               "  degrade preview --out sheet.png --n 24\n  degrade bench --runs 3",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", add_help=False, help="run the gRPC server; same flags as degrade-server (see --help)")
    sub.add_parser("health", add_help=False, help="exit 0 when a server is SERVING; same as degrade-health")

    p = sub.add_parser("sample-data", help="write the built-in sample photographs (from scikit-image) to DIR")
    p.add_argument("dir", type=Path, help="output folder")

    p = sub.add_parser("pack", help="write the decoded images of a folder to one pixel store file, usable as "
                                    "--images (and a client's --hr-root) wherever the folder is")
    p.add_argument("--images", type=Path, required=True, help="folder of HR images")
    p.add_argument("--out", type=Path, required=True, help="the store file to write (3 bytes per pixel)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("generate", help="degrade images into OUT/lr, OUT/hr, OUT/hr_usm PNGs and OUT/records.jsonl")
    _common(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None,
                   help="stop after N pairs (continuing into later epochs if needed); default: one whole epoch")
    p.add_argument("--no-usm", action="store_true", help="skip the sharpened HR target")
    p.add_argument("--png-level", type=int, default=0, choices=range(10), metavar="0-9",
                   help="PNG compression: 0 (default) stores the pixels (~389 kB per 360x360 HR, fastest to write "
                        "and to read back), 1 deflates photographs by about a third at ~9x the writing cost")

    p = sub.add_parser("preview", help="contact sheet of HR / LR pairs labelled with codec, quality and ending")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("preview.png"), help="PNG to write (default preview.png)")
    p.add_argument("--n", type=int, default=24, help="number of pairs (default 24)")
    p.add_argument("--per-batch", type=int, default=4, help="pairs taken from each video batch (default 4)")

    p = sub.add_parser("bench", help="standard workload of shared/spec/BENCH.md: engine, delivered over gRPC, "
                                     "codec limit, naive")
    _common(p)
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--batches", type=int, default=2, help="video batches per timed run (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--skip-naive", action="store_true", help="skip the PNG + ffmpeg CLI baseline")
    p.add_argument("--skip-delivered", action="store_true", help="skip the gRPC delivery figures")
    p.add_argument("--clients", type=int, default=4, help="client processes of the many-clients figure (default 4)")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="the delivered figures with the tensors over the socket (default: through the server's "
                        "shared memory, as a trainer on its host gets them)")

    p = sub.add_parser("demo", help="sample data -> a few hundred pairs (progress bar) -> preview sheet -> "
                                    "the same served over gRPC")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out)")
    p.add_argument("--limit", type=int, default=300, help="pairs to generate (default 300)")
    return parser


# ---------------------------------------------------------------------------
def load_config(args: argparse.Namespace) -> DegradationConfig:
    return DegradationConfig.load(args.config, args.profile)


def open_images(args: argparse.Namespace, cfg: DegradationConfig):
    from .degradation.images import ImageFolder
    from .degradation.pixel_store import store_options
    from .degradation.sample_data import ensure_sample_data

    root = args.images if args.images is not None else ensure_sample_data(progress=True)
    folder = ImageFolder(root, cfg.patch_size, progress=sys.stderr.isatty(), **store_options(args))
    log.info("images: %s - %d usable, %d skipped (%s)", root, len(folder.images), len(folder.skipped),
             f"pixel store {folder.store_path}" if folder.store_path else "no pixel store")
    return folder


def cmd_pack(args: argparse.Namespace) -> int:
    from .degradation.images import pack_folder

    t0 = time.perf_counter()
    store, skipped = pack_folder(args.images, args.out, progress=sys.stderr.isatty())
    for s in skipped:
        print(f"degrade: skipped {s.name}: {s.reason}", file=sys.stderr)
    print(f"{len(store.images)} images -> {store.path} ({store.nbytes / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s"
          f"{f', {len(skipped)} skipped' if skipped else ''}); use it as --images {store.path}")
    return 0


def iter_batches(producer, seed: int, first_epoch: int, limit: int | None, want_usm: bool) -> Iterator:
    """(plan, batch, pairs to keep) from ``first_epoch`` on until ``limit`` pairs (one epoch when None)."""
    jobs: list[tuple[int, int]] = []
    count = 0
    epoch = first_epoch
    while True:
        plan = producer.plan(seed, epoch)
        if plan.num_batches == 0:
            break
        for k in range(plan.num_batches):
            if limit is not None and count >= limit:
                break
            jobs.append((epoch, k))
            count += plan.batch_starts[k + 1] - plan.batch_starts[k]
        if limit is None or count >= limit:
            break
        epoch += 1
    produced = 0
    for result in producer.produce_jobs(seed, jobs, want_usm=want_usm):
        take = len(result) if limit is None else min(len(result), limit - produced)
        yield producer.plan(seed, result.epoch), result, take
        produced += take


def producer_for(args: argparse.Namespace, cfg: DegradationConfig, folder, **kw):
    """The batch producer the command line asks for (``--pipeline``, ``--workers``, ``--device``)."""
    from .pipeline.registry import make_producer

    producer = make_producer(folder, cfg, pipeline=args.pipeline, workers=args.workers, device=args.device, **kw)
    log.info("%s pipeline: %d worker process(es), engine on %s", producer.pipeline, producer.workers, args.device)
    return producer


def cmd_generate(args: argparse.Namespace, cfg: DegradationConfig) -> int:
    from tqdm import tqdm

    from .pipeline.png import write_png

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be a positive number of pairs")
    folder = open_images(args, cfg)
    out: Path = args.out
    dirs = {k: out / k for k in (("lr", "hr") if args.no_usm else ("lr", "hr", "hr_usm"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    total = args.limit
    level = args.png_level
    sizes = {k: 0 for k in dirs}

    def write_batch(result, names: list[str]) -> dict[str, int]:
        """One writer task per batch: PNG encoding releases the GIL, so two run beside the main thread."""
        got = {k: 0 for k in dirs}
        for i, name in enumerate(names):
            got["lr"] += write_png(dirs["lr"] / name, result.lr[i], level)
            got["hr"] += write_png(dirs["hr"] / name, result.hr[i], level)
            if "hr_usm" in dirs:
                got["hr_usm"] += write_png(dirs["hr_usm"] / name, result.hr_usm[i], level)
        return got

    with producer_for(args, cfg, folder) as producer:
        if total is None:
            total = producer.plan(args.seed, args.epoch).num_patches
        bar = tqdm(total=total, desc="pairs", unit="pair", dynamic_ncols=True)
        t0 = time.perf_counter()
        written = 0
        failures = 0
        with (out / "records.jsonl").open("w") as rec_file, ThreadPoolExecutor(max_workers=2) as writer:
            pending: list = []
            for plan, result, take in iter_batches(producer, args.seed, args.epoch, args.limit, not args.no_usm):
                failures += result.codec_failures
                start = plan.batch_starts[result.batch_index]
                names = [f"{plan.epoch:03d}_{start + i:06d}.png" for i in range(take)]
                for i, name in enumerate(names):
                    rec_file.write(json.dumps({**result.records[i], "file": name}) + "\n")
                pending.append(writer.submit(write_batch, result, names))
                while len(pending) > 2:  # at most two batches waiting for the disk: memory stays bounded
                    for k, v in pending.pop(0).result().items():
                        sizes[k] += v
                written += take
                bar.update(take)
                bar.set_postfix(epoch=plan.epoch, batch=result.batch_index)
            for f in pending:
                for k, v in f.result().items():
                    sizes[k] += v
        bar.close()
        dt = time.perf_counter() - t0
        lost = producer.failures
    per_pair = sum(sizes.values()) / max(1, written)
    print(f"{written} pairs in {dt:.1f} s: {written / dt:.1f} pairs/s -> {out} "
          f"({per_pair / 1e3:.0f} kB per pair at PNG level {level}: "
          + ", ".join(f"{k} {v / max(1, written) / 1e3:.0f} kB" for k, v in sizes.items()) + ")"
          + (f" ({failures} codec failure(s) recorded)" if failures else ""))
    if lost:
        for (epoch, k), reason in lost:
            print(f"degrade: video batch {k} of epoch {epoch} was skipped: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_preview(args: argparse.Namespace, cfg: DegradationConfig) -> int:
    from tqdm import tqdm

    from .pipeline.preview import contact_sheet

    if args.n < 1 or args.per_batch < 1:
        raise ConfigError("--n and --per-batch must be positive")
    folder = open_images(args, cfg)
    hr, lr, recs = [], [], []
    bar = tqdm(total=args.n, desc="preview pairs", unit="pair")
    with producer_for(args, cfg, folder) as producer:
        epoch = args.epoch
        while len(lr) < args.n:
            plan = producer.plan(args.seed, epoch)
            if plan.num_batches == 0:
                raise ConfigError("the image folder yields no patches")
            want = min(plan.num_batches, -(-(args.n - len(lr)) // args.per_batch))
            for result in producer.produce(args.seed, epoch, range(want), want_usm=False):
                n = len(result)
                for j in range(min(args.per_batch, n, args.n - len(lr))):
                    i = (j * n) // args.per_batch
                    hr.append(result.hr[i])
                    lr.append(result.lr[i])
                    recs.append(result.records[i])
                    bar.update(1)
            epoch += 1
    bar.close()
    path = contact_sheet(hr, lr, recs, args.out, columns=4,
                         title=f"VCISR degradation ({cfg.profile}) - HR | LR x4, seed {args.seed}")
    print(f"preview of {len(lr)} pairs -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace, cfg: DegradationConfig) -> int:
    out: Path = args.out
    gen_args = argparse.Namespace(**{**vars(args), "out": out / "pairs", "no_usm": False, "png_level": 0})
    cmd_generate(gen_args, cfg)
    prev_args = argparse.Namespace(**{**vars(args), "out": out / "preview.png", "n": 16, "per_batch": 4})
    cmd_preview(prev_args, cfg)
    served = demo_service(args, cfg, out / "served.png", pairs=min(64, args.limit))
    print(f"demo done: pairs in {out / 'pairs'}, contact sheet {out / 'preview.png'}, "
          f"pairs pulled over gRPC {served}")
    return 0


def demo_service(args: argparse.Namespace, cfg: DegradationConfig, sheet: Path, pairs: int = 64) -> Path:
    """The service round trip: a degrade-server on a free loopback port, a client pulling ``pairs``."""
    from client import DegradeClient

    from .pipeline.preview import contact_sheet
    from .service.serve import ServerConfig, create_server

    server, port = create_server(ServerConfig(images=args.images, host="127.0.0.1", port=0, workers=args.workers,
                                              device=args.device, profile=cfg.profile, config_file=args.config,
                                              pipeline=args.pipeline, store_dir=args.store_dir,
                                              no_store=args.no_store, store_max_gb=args.store_max_gb))
    server.start()
    try:
        with DegradeClient(f"127.0.0.1:{port}") as client:
            t0 = time.perf_counter()
            got, shown, batches = 0, [], 0
            for batch in client.epochs(args.seed, args.epoch):
                got += len(batch)
                batches += 1
                step = max(1, len(batch) // 4)  # four pairs of each video batch: several codecs on the sheet
                shown += [(batch.hr[i], batch.lr[i], batch.records[i]) for i in range(0, len(batch), step)][:4]
                if got >= pairs and batches >= 4:
                    break
            dt = time.perf_counter() - t0
        print(f"degrade-server on 127.0.0.1:{port}: a client pulled {got} pairs in {batches} video batches in "
              f"{dt:.1f} s ({got / dt:.1f} pairs/s, LR + HR + sharpened HR)")
        hr, lr, recs = zip(*shown[:16])
        return contact_sheet(hr, lr, recs, sheet, title="pulled over gRPC from degrade-server")
    finally:
        server.stop_now()


def cmd_bench(args: argparse.Namespace, cfg: DegradationConfig) -> int:
    from .bench.workload import run_bench

    folder = open_images(args, cfg)
    return run_bench(folder, cfg, device=args.device, workers=args.workers, pipeline=args.pipeline, runs=args.runs,
                     batches=args.batches, seed=args.seed, json_path=args.json, skip_naive=args.skip_naive,
                     skip_delivered=args.skip_delivered, clients=args.clients,
                     shared_memory=not args.no_shared_memory)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        from .service.serve import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "health":
        from .service.health_probe import main as health_main

        return health_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "sample-data":
            from .degradation.sample_data import write_sample_data

            files = write_sample_data(args.dir, progress=True)
            print(f"{len(files)} sample photographs in {args.dir}")
            return 0
        if args.command == "pack":
            return cmd_pack(args)
        if getattr(args, "cpus", None) is not None:
            # exported, so every part of the command and every process it starts (bench's server) sizes to it
            limit = parse_cpus(args.cpus)
            os.environ[CPUS_ENV] = "0" if limit is None else f"{limit:g}"
        log.info("%s", cpu_budget(getattr(args, "cpus", None)).describe())
        cfg = load_config(args)
        log.info("config: %s", cfg.to_json())
        return {"generate": cmd_generate, "preview": cmd_preview, "bench": cmd_bench, "demo": cmd_demo}[
            args.command](args, cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:  # a bad pixel store is a ValueError too
        print(f"degrade: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("degrade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
