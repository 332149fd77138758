"""The pixel store's two promises, measured: a second start decodes nothing, and generate gets faster.

    python -m benchmarks.store_speed [--photos 1024] [--images DIR] [--pairs 384] [--runs 2]

1. scan: a folder of ``--photos`` 360x360 PNG photographs (benchmarks/generate_speed.py's), opened
   three ways, each in a fresh hash cache and store folder where it says so: without a store (today's
   scan, every file decoded), the first start with a store (decode + hash + write) and the second start
   (the store found through the per-file digest cache: nothing decoded);
2. generate: ``degrade generate --limit --pairs`` of ``--images`` (default: the built-in sample
   photographs) with ``--no-store`` and from the folder's pixel store, alternating, ``--runs`` times each;
   the clock is generate's own (after the scan). The median ratio store / folder is the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import tempfile
import time
from pathlib import Path


def scan_times(photos: int) -> dict[str, float]:
    from benchmarks.generate_speed import make_photos
    from server.degradation.images import ImageFolder

    out = {}
    with tempfile.TemporaryDirectory(prefix="store-scan-") as tmp:
        root = Path(tmp) / "photos"
        make_photos(root, photos)
        old = os.environ.get("DEGRADE_HASH_CACHE")
        try:
            for label, store in (("no store", False), ("first start", True), ("second start", True)):
                if label != "second start":  # a cold hash cache, as on a machine that never saw the folder
                    os.environ["DEGRADE_HASH_CACHE"] = str(Path(tmp) / f"hashes-{label.replace(' ', '-')}.json")
                t0 = time.perf_counter()
                folder = ImageFolder(root, 360, store_dir=Path(tmp) / "stores" if store else None)
                out[label] = time.perf_counter() - t0
                print(f"  scan of {photos} photographs, {label}: {out[label]:.2f} s "
                      f"({len(folder.images)} images{', store ' + Path(folder.store_path).name[:12] + '...' if folder.store_path else ''})",
                      flush=True)
        finally:
            if old is None:
                os.environ.pop("DEGRADE_HASH_CACHE", None)
            else:
                os.environ["DEGRADE_HASH_CACHE"] = old
    return out


def generate_rate(images: Path, out: Path, pairs: int, store_dir: Path | None) -> float:
    from server.cli import main as degrade

    args = ["generate", "--images", str(images), "--out", str(out), "--limit", str(pairs)]
    args += ["--no-store"] if store_dir is None else ["--store-dir", str(store_dir)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = degrade(args)
    if rc != 0:
        raise RuntimeError(f"degrade generate failed ({rc}): {buf.getvalue()}")
    m = re.search(r"([\d.]+) pairs/s", buf.getvalue())
    if not m:
        raise RuntimeError(f"no pairs/s in: {buf.getvalue()}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.store_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=1024, help="photographs of the scan figure (default 1024; 0: skip)")
    ap.add_argument("--images", type=Path, default=None, help="folder of the generate figure (default: sample data)")
    ap.add_argument("--pairs", type=int, default=384, help="pairs per generate run (default 384)")
    ap.add_argument("--runs", type=int, default=2, help="generate runs per source (default 2)")
    args = ap.parse_args(argv)
    if args.photos > 0:
        scan = scan_times(args.photos)
        print(f"scan: second start / first start = {scan['second start'] / scan['first start']:.3f}; "
              f"first start / no store = {scan['first start'] / scan['no store']:.2f}")
    if args.runs > 0:
        from server.degradation.sample_data import ensure_sample_data

        images = args.images if args.images is not None else ensure_sample_data(progress=True)
        rates: dict[str, list[float]] = {"folder": [], "store": []}
        with tempfile.TemporaryDirectory(prefix="store-generate-") as tmp:
            stores = Path(tmp) / "stores"
            generate_rate(images, Path(tmp) / "warm", 8, stores)  # builds the store, warms the page cache
            for r in range(args.runs):
                for label in ("folder", "store"):
                    rate = generate_rate(images, Path(tmp) / f"out-{label}-{r}", args.pairs,
                                         None if label == "folder" else stores)
                    rates[label].append(rate)
                    print(f"  generate from the {label}, run {r + 1}: {rate:.1f} pairs/s", flush=True)
        ratio = statistics.median(s / f for s, f in zip(rates["store"], rates["folder"]))
        print(f"generate from the pixel store / from the folder = {ratio:.2f} "
              f"({statistics.median(rates['store']):.1f} vs {statistics.median(rates['folder']):.1f} pairs/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
