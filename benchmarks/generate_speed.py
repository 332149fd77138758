"""``degrade generate`` against the engine it drives: files on disk as fast as pairs in memory?

    python -m benchmarks.generate_speed [--photos 1024] [--runs 2] [--pipeline auto] [--png-level 0]

Makes ``--photos`` photographs of 360x360 (crops of scikit-image's real
photographs at random positions, flipped at random: one patch each, so an
epoch is exactly that many pairs), then, alternating, ``--runs`` times each:

* engine:   every batch of epoch 0 made by the producer and dropped (LR + HR + sharpened HR);
* generate: ``degrade generate`` of the same epoch to PNG files + records.jsonl.

Both clocks start after the image scan and include the worker pool's start,
as ``degrade generate`` reports it.  Prints pairs/s, the ratio and the file
sizes per pair; the median ratio is the figure (target >= 0.9 on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_photos(root: Path, count: int, size: int = 360, seed: int = 0) -> None:
    """``count`` PNG crops of ``size``x``size`` from scikit-image's colour photographs."""
    import skimage.data
    from PIL import Image

    from benchmarks.stages import PHOTOS

    rng = np.random.default_rng(seed)
    imgs = [a[..., :3] for a in (getattr(skimage.data, n)() for n in PHOTOS)
            if a.ndim == 3 and min(a.shape[:2]) >= size]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        a = imgs[i % len(imgs)]
        y, x = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
        crop = a[y:y + size, x:x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(root / f"{i:05d}.png", compress_level=1)


def engine_rate(images: Path, pipeline: str, workers: int | None, device: str) -> float:
    from server.degradation.config import DegradationConfig
    from server.degradation.images import ImageFolder
    from server.pipeline.registry import make_producer

    cfg = DegradationConfig()
    folder = ImageFolder(images, cfg.patch_size)
    with make_producer(folder, cfg, pipeline=pipeline, workers=workers, device=device) as producer:
        plan = producer.plan(0, 0)
        t0 = time.perf_counter()
        n = sum(len(r) for r in producer.produce(0, 0, range(plan.num_batches)))
        return n / (time.perf_counter() - t0)


def generate_rate(images: Path, out: Path, pipeline: str, workers: int | None, device: str,
                  level: int) -> tuple[float, str]:
    from server.cli import main

    args = ["generate", "--images", str(images), "--out", str(out), "--pipeline", pipeline, "--device", device,
            "--png-level", str(level)]
    if workers is not None:
        args += ["--workers", str(workers)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(args)
    text = buf.getvalue().strip().splitlines()[-1]
    if rc != 0:
        raise RuntimeError(f"degrade generate failed: {text}")
    return float(text.split(" pairs/s")[0].rsplit(" ", 1)[-1]), text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--pipeline", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--png-level", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "photos", Path(tmp) / "out"
        print(f"making {args.photos} photographs of 360x360 ...", flush=True)
        make_photos(images, args.photos)
        eng, gen = [], []
        for r in range(args.runs):
            eng.append(engine_rate(images, args.pipeline, args.workers, args.device))
            shutil.rmtree(out, ignore_errors=True)
            rate, line = generate_rate(images, out, args.pipeline, args.workers, args.device, args.png_level)
            gen.append(rate)
            print(f"run {r + 1}: engine {eng[-1]:.1f} pairs/s, generate {gen[-1]:.1f} pairs/s "
                  f"(ratio {gen[-1] / eng[-1]:.2f})\n  {line}", flush=True)
    ratios = [g / e for g, e in zip(gen, eng)]
    print(f"median: engine {statistics.median(eng):.1f} pairs/s, generate {statistics.median(gen):.1f} pairs/s, "
          f"generate / engine = {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
