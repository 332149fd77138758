"""The bytes of a few batches, as hashes: proof that a refactor changed no output.

    python -m benchmarks.batch_hashes [--seed 7] [--epoch 2] [--batches 4] [--workers N] [--json FILE] [--store]

Makes ``--batches`` short video batches (8 patches, first one 4-8) of the
built-in sample photographs with both pipelines (batch and split; one worker,
or ``--workers auto`` for as many as the CPU budget gives: run it with
``DEGRADE_CPUS=1``, ``2`` or ``1.5`` to check that the bytes do not depend on
the budget) and two configs: the spec's (``vcisr``: mostly V2 endings through the video
codecs) and a V1-only one (JPEG endings).  For each of the four it prints one
sha256 over every batch's LR, HR and sharpened-HR bytes and its records
(sorted JSON).  Run it before and after a change and compare the lines; within
one run, batch and split must agree.  ``--store`` reads the images from their
pixel store (built in a temporary folder) instead of decoding them: the lines
must not change (``--images`` may also name a store file from ``degrade pack``).
CPU only: CUDA bytes differ from the CPU's by design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from server.degradation import DegradationConfig, ImageFolder, ensure_sample_data
from server.degradation.cpu_budget import cpu_budget
from server.pipeline import make_producer

CONFIGS = {
    "vcisr": dict(video_batch_size=8, first_batch_range=(4, 8)),
    "v1": dict(video_batch_size=8, first_batch_range=(4, 8), v2_prob=0.0),
}


def batch_hashes(images: Path, seed: int, epoch: int, batches: int, workers: int | None = 1,
                 store_dir: Path | None = None) -> dict[str, str]:
    """``{"<config>/<pipeline>": sha256 hex}`` for the first ``batches`` batches of ``epoch``
    (images read from their pixel store in ``store_dir`` when given)."""
    out = {}
    for name, overrides in CONFIGS.items():
        cfg = DegradationConfig(**overrides)
        folder = ImageFolder(images, cfg.patch_size, store_dir=store_dir)
        if store_dir is not None and folder.store is None:
            raise RuntimeError(f"no pixel store could be built in {store_dir} (see the warning above)")
        for pipeline in ("batch", "split"):
            h = hashlib.sha256()
            with make_producer(folder, cfg, pipeline=pipeline, workers=workers) as producer:
                for r in producer.produce(seed, epoch, range(batches)):
                    for arr in (r.lr, r.hr, r.hr_usm):
                        h.update(arr.tobytes())
                    h.update(json.dumps(r.records, sort_keys=True).encode())
            out[f"{name}/{pipeline}"] = h.hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch_hashes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=None, help="HR folder (default: the built-in sample photographs)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epoch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="video batches per config and pipeline (default 4)")
    ap.add_argument("--workers", default="1",
                    help="worker processes (default 1; auto: sized by the CPU budget, see $DEGRADE_CPUS)")
    ap.add_argument("--json", type=Path, default=None, help="also write the hashes here")
    ap.add_argument("--store", action="store_true",
                    help="read the images from their pixel store (built in a temporary folder), not by decoding")
    args = ap.parse_args(argv)
    workers = None if args.workers == "auto" else int(args.workers)
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    images = args.images if args.images is not None else ensure_sample_data(progress=True)
    print(cpu_budget().describe(), f"- workers: {args.workers}")
    if args.store:
        with tempfile.TemporaryDirectory(prefix="batch-hashes-store-") as tmp:
            hashes = batch_hashes(images, args.seed, args.epoch, args.batches, workers, store_dir=Path(tmp))
    else:
        hashes = batch_hashes(images, args.seed, args.epoch, args.batches, workers)
    for key, value in hashes.items():
        print(f"{key:14s} {value}")
    if args.json:
        args.json.write_text(json.dumps(hashes, indent=1) + "\n")
    agree = all(hashes[f"{c}/batch"] == hashes[f"{c}/split"] for c in CONFIGS)
    print("batch and split agree" if agree else "batch and split DIFFER")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
