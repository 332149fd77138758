"""``degrade-client``: pull pairs from degrade-servers, report pairs/s and bytes/s, write a preview sheet.

    degrade-client --server localhost:50051 --pairs 1000 --out sheet.png
    degrade-client --server a:50051 --server b:50051 --token-file token.txt --pairs 5000
    degrade-client --server gpu-box:50051 --wire lr-hr --json lr-hr.json      # LR + HR, sharpened here
    degrade-client --server gpu-box:50051 --wire lr --hr-root /data/hr       # LR + records, HR cut here

Wire modes (what crosses the network per 360 -> 90 pair):
  full    LR + HR + sharpened HR from the server (~800 kB)
  lr-hr   LR + HR (~415 kB); the sharpened HR is made here with the server's USM (--device)
  lr      LR + records (~26 kB); HR is cut here from --hr-root, your copy of the server's image
          folder (checked against the server's dataset fingerprint first), and sharpened here

Same host: a server on this machine that offers it hands over each batch's tensors as a
shared-memory slot (/dev/shm) once this process proves it can read them; only ids and
records (~1 kB per pair) cross the socket, and the arrays are the same. --no-shared-memory
turns that off (the server's own flag is also --no-shared-memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .client import DEFAULT_UNREACHABLE_TIMEOUT, DegradeClient
from .connection import resolve_token
from .errors import DegradeError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="degrade-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", default=None,
                   help="server address host:port or dns:///name:port; repeat for several "
                        "(default: $DEGRADE_SERVER or localhost:50051)")
    p.add_argument("--pairs", type=int, default=1000, help="pairs to pull (default %(default)s), across epochs")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop at the first whole video batch after this many seconds, even before --pairs")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--epoch", type=int, default=0, help="first epoch (default 0)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="bearer token (default: $DEGRADE_TOKEN)")
    tok.add_argument("--token-file", type=Path, default=None, help="read the token from a file")
    p.add_argument("--tls-ca", type=Path, default=None, help="use TLS, trusting this PEM CA certificate")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CA certificates")
    p.add_argument("--streams", type=int, default=2, help="concurrent streams per server (default %(default)s)")
    p.add_argument("--unreachable-timeout", type=float, default=DEFAULT_UNREACHABLE_TIMEOUT, metavar="SECONDS",
                   help="give up (exit 1, naming the batches not received) only after this many seconds in which no "
                        "server could be reached at all (default %(default)g: covers a server restart); a server "
                        "that is slow but SERVING is waited for")
    p.add_argument("--wire", choices=("full", "lr-hr", "lr"), default=None,
                   help="what the server sends (see above; default: lr with --hr-root, else full)")
    p.add_argument("--hr-root", type=Path, default=None,
                   help="--wire lr: this machine's copy of the server's image folder (same names and bytes)")
    p.add_argument("--device", default="auto",
                   help="where the sharpened HR is made in --wire lr-hr/lr: auto (cuda if available), cpu, cuda")
    p.add_argument("--no-hr-usm", action="store_true", help="no sharpened HR target (neither fetched nor made)")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="take every tensor over the socket, even from a server on this host (see above)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the figures (wire, pairs, pairs/s, bytes received, bytes per pair, ...) as JSON")
    p.add_argument("--out", type=Path, default=None, help="write a preview sheet (PNG) of the first pairs")
    p.add_argument("--preview-pairs", type=int, default=16, help="pairs on the sheet (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    servers = args.server or [os.environ.get("DEGRADE_SERVER", "localhost:50051")]
    token = resolve_token(args.token, args.token_file)
    tls = args.tls_ca if args.tls_ca else (True if args.tls else None)
    if args.pairs < 1:
        print("degrade-client: error: --pairs must be at least 1", file=sys.stderr)
        return 2
    if args.unreachable_timeout <= 0:
        print("degrade-client: error: --unreachable-timeout must be positive", file=sys.stderr)
        return 2
    wire = args.wire or ("lr" if args.hr_root is not None else "full")
    try:
        from .wire import check_wire, resolve_device

        check_wire(wire, args.hr_root)
        device = str(resolve_device(args.device))
    except ValueError as exc:
        print(f"degrade-client: error: {exc}", file=sys.stderr)
        return 2
    if wire != "full" and device == "cpu":
        # the local work (USM, HR crops) runs in the stream threads, in parallel; one torch thread each is
        # much faster than each call starting a team of threads on the same cores (5-15x here, under load)
        import torch

        torch.set_num_threads(1)
    client = DegradeClient(servers, token=token, tls=tls, streams_per_server=args.streams,
                           include_hr_usm=not args.no_hr_usm, wire=wire, hr_root=args.hr_root, sharpen_device=device,
                           unreachable_timeout=args.unreachable_timeout, shared_memory=not args.no_shared_memory)
    preview: list = []
    try:
        info = client.info(args.seed, args.epoch)
        print(f"{info.dataset_name}: {info.patches_per_epoch} patches in {info.batches_per_epoch} video batches "
              f"per epoch, x{info.scale} ({info.hr_patch_size} -> {info.lr_patch_size}), device {info.device}, "
              f"backends {', '.join(info.codec_backends)}")
        if wire != "full":
            client.prepare()  # the server's config; in --wire lr the check of --hr-root, before the clock starts
        from tqdm import tqdm

        t0 = time.perf_counter()
        got = batches = nbytes = shared = 0  # what this loop took (the client may hold a few more in its queue)
        with tqdm(total=args.pairs, unit="pair", disable=None) as bar:
            for batch in client.epochs(args.seed, args.epoch):
                got += len(batch)
                batches += 1
                nbytes += batch.wire_bytes
                shared += batch.shared_memory
                bar.update(min(len(batch), args.pairs - bar.n))
                for i in range(len(batch)):
                    if len(preview) < args.preview_pairs:
                        preview.append((batch.hr[i], batch.lr[i], batch.records[i]))
                if got >= args.pairs or (args.seconds is not None and time.perf_counter() - t0 >= args.seconds):
                    break
        dt = time.perf_counter() - t0
    except DegradeError as exc:
        print(f"degrade-client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    s = client.stats
    from .wire import DESCRIPTIONS

    print(f"wire {wire}: {DESCRIPTIONS[wire]}" + (f" (sharpening on {device})" if client.local_usm else ""))
    print(f"received {got} pairs in {batches} video batches in {dt:.2f} s: {got / dt:.1f} pairs/s, "
          f"{nbytes / dt / 1e6:.1f} MB/s, {nbytes} bytes ({nbytes / max(got, 1) / 1e3:.1f} kB per pair); "
          f"retries {s.retries}; per server: " + ", ".join(f"{a} {n}" for a, n in sorted(s.per_server.items())))
    print(f"delivery: {shared} of {batches} video batches from the server's shared memory (same host), "
          f"{batches - shared} as bytes" + ("" if client.shared_memory else " (--no-shared-memory)"))
    if args.json is not None:
        figures = {"wire": wire, "servers": servers, "sharpen_device": device if client.local_usm else None,
                   "pairs": got, "batches": batches, "seconds": dt, "pairs_per_s": got / dt,
                   "bytes_received": nbytes, "bytes_per_pair": nbytes / max(got, 1), "mb_per_s": nbytes / dt / 1e6,
                   "retries": s.retries, "per_server": s.per_server, "failed_batches": len(client.failures),
                   "shared_memory": client.shared_memory, "shared_batches": shared}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures: {args.json}")
    if client.failures:
        print(f"{len(client.failures)} batch(es) could not be made by the server: {client.failures[:3]}")
    if args.out is not None and preview:
        from server.pipeline.preview import contact_sheet

        hr, lr, recs = zip(*preview)
        path = contact_sheet(hr, lr, recs, args.out, title=f"degrade-client: {servers[0]}, seed {args.seed}")
        print(f"preview sheet: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
