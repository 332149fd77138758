"""The GPU box on paper: the per-pair CPU cost of what stays on the CPU in split mode, measured here.

    python -m benchmarks.gpu_on_paper [--images DIR] [--batches 3] [--cores 16]

With ``--pipeline split`` on a GPU host the image stages run on the device; the host's cores do the rest:

* load  - HR crops of a 128-patch video batch (``crop_patches``): from the pixel store's map, and for
  comparison decoded from the folder;
* codec - the video block's software round trip (``SoftwareBackend.roundtrip``) of the engine's own
  frames and codec parameters;
* send  - the service cutting a batch into ``PairChunk`` messages and serializing them, per wire mode
  (``full``: LR + HR + sharpened HR; ``lr-hr``; ``lr``: LR + records).

Each cost is one core's time (single-threaded, this process's CPU time, best of ``--repeats``) divided by
the pairs.  The
table adds them per wire mode and divides a host's cores (``--cores``, one kept for the device
stage's feeder) by the sum: the pairs/s those cores could sustain if the GPU kept up.  Transport
(gRPC's own threads, the kernel) is not included.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _best(fn, repeats: int) -> float:
    """The least CPU time of ``repeats`` calls of ``fn`` after one warm-up call (this process's CPU time:
    single-threaded work, so core time, whatever else the machine runs)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def measure(images: Path, batches: int, repeats: int) -> dict[str, float]:
    """Core-ms per pair of each CPU step (see the module docstring)."""
    import torch

    from server.bench.workload import full_batches
    from server.codecs import VideoRoundTrip
    from server.codecs.software import SoftwareBackend
    from server.degradation.config import DegradationConfig
    from server.degradation.engine import Engine, crop_patches
    from server.degradation.images import ImageFolder
    from server.pipeline.batch import BatchProducer
    from server.service.chunks import batch_chunks
    from server.service.requests import MAX_CHUNK_BYTES

    torch.set_num_threads(1)
    cfg = DegradationConfig(v2_prob=1.0)  # every batch through the video codecs
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-on-paper-") as tmp:
        plain = ImageFolder(images, cfg.patch_size)
        stored = ImageFolder(images, cfg.patch_size, store_dir=Path(tmp))
        if stored.store is None:
            raise RuntimeError("no pixel store could be built (see the warning above)")
        producer = BatchProducer(stored, cfg, workers=0, keep_precodec=True)
        jobs = full_batches(producer, 0, batches, cfg.video_batch_size)
        refs = [producer.plan(0, e).batch(k) for e, k in jobs]
        n = sum(len(r) for r in refs)
        for label, folder in (("load from the pixel store", stored), ("load from the folder (decode)", plain)):
            out[label] = 1000 * _best(lambda f=folder: [crop_patches(f, r, cfg.patch_size) for r in refs],
                                      repeats) / n
        engine = Engine(cfg, codec=VideoRoundTrip(), keep_precodec=True)
        results = [engine.make_batch(stored, producer.plan(0, e), k) for e, k in jobs]
        backend = SoftwareBackend()
        inputs = [(r.precodec, r.video) for r in results if r.precodec is not None]
        out["codec round trip"] = 1000 * _best(lambda: [backend.roundtrip(f, v) for f, v in inputs],
                                               repeats) / sum(len(f) for f, _ in inputs)
        for mode, hr, usm in (("full", True, True), ("lr-hr", True, False), ("lr", False, False)):

            def send(hr=hr, usm=usm):  # the PairChunks' wire bytes, as the service hands them to gRPC
                for r in results:
                    for _ in batch_chunks(r, include_hr=hr, include_hr_usm=usm, max_chunk_bytes=MAX_CHUNK_BYTES,
                                          dataset_fingerprint="f" * 64):
                        pass

            out[f"send, wire {mode}"] = 1000 * _best(send, repeats) / sum(len(r) for r in results)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_on_paper", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=None, help="HR folder (default: the built-in sample photographs)")
    ap.add_argument("--batches", type=int, default=3, help="128-patch video batches measured (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timed repeats (default 3)")
    ap.add_argument("--cores", type=int, default=16, help="host cores of the pairs/s column (default 16)")
    args = ap.parse_args(argv)
    from server.degradation.sample_data import ensure_sample_data

    images = args.images if args.images is not None else ensure_sample_data(progress=True)
    cost = measure(images, max(1, args.batches), max(1, args.repeats))
    for k, v in cost.items():
        print(f"  {k:<32}{v:8.2f} core-ms per pair")
    pool = max(1, args.cores - 1)
    print(f"\nper wire mode, load from the store + codec + send; {pool} cores of a {args.cores}-core host "
          "(one feeds the device stage):")
    for mode in ("full", "lr-hr", "lr"):
        total = cost["load from the pixel store"] + cost["codec round trip"] + cost[f"send, wire {mode}"]
        print(f"  wire {mode:<6} {total:6.2f} core-ms per pair -> {1000 * pool / total:7.0f} pairs/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
