"""The split pipeline's device stage alone: patches/s at 360x360, no HR decoding, no codec.

    python -m benchmarks.device_stage [--device cuda] [--batches 8] [--group 2]

Real photograph crops (``benchmarks.stages.photo_patches``) go through
:meth:`server.degradation.engine.Engine.device_stage` - USM, first and second order, the
ending up to the codec boundary - ``--group`` batches issued back to back and
then copied to host memory, as the device stage of ``server.pipeline.split``
does.  Reports patches/s with and without the sharpened target (median of
``--runs`` timed runs after a warm-up), then one run with stage timers on
(CUDA events on a GPU) for the per-stage device time per batch.
Target on an H200: >= 20,000 patches/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from server.degradation.config import DegradationConfig
from server.degradation.engine import STAGES, Engine


def _run(engine: Engine, hr8: np.ndarray, batches: int, group: int, want_usm: bool, start: int) -> float:
    """Seconds for ``batches`` batches through the device stage and back to host memory."""
    n = len(hr8)
    usm_host = np.empty_like(hr8)
    lr_host = np.empty((n, engine.cfg.lr_size, engine.cfg.lr_size, 3), np.uint8)
    t0 = time.perf_counter()
    for g in range(0, batches, group):
        outs = [engine.device_stage(hr8, 0, 0, start + k, want_usm=want_usm)
                for k in range(g, min(g + group, batches))]
        for out in outs:
            if out.usm is not None:
                torch.from_numpy(usm_host).copy_(out.usm)
            torch.from_numpy(lr_host).copy_(out.lr)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.stages import photo_patches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, default=8, help="video batches per timed run (default 8)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--group", type=int, default=2, help="batches issued before their copies (default 2)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = DegradationConfig()
    hr8 = (photo_patches(args.batch_size, cfg.patch_size, seed=3) * 255).round().to(torch.uint8)
    hr8 = hr8.permute(0, 2, 3, 1).contiguous().numpy()
    engine = Engine(cfg, device=args.device)
    print(f"device stage on {args.device} ({torch.cuda.get_device_name() if engine.device.type == 'cuda' else 'CPU'}),"
          f" {args.batches} batches of {args.batch_size} patches of {cfg.patch_size}x{cfg.patch_size}, "
          f"group {args.group}, jpeg {engine.jpeg_impl}", flush=True)
    for want_usm in (True, False):
        _run(engine, hr8, min(2, args.batches), args.group, want_usm, 10_000)  # warm-up: kernels, caches
        rates = []
        for r in range(args.runs):
            dt = _run(engine, hr8, args.batches, args.group, want_usm, 1000 * (r + 1))
            rates.append(args.batches * args.batch_size / dt)
        print(f"  {'with' if want_usm else 'without'} the sharpened target: median {statistics.median(rates):,.0f} "
              f"patches/s (min {min(rates):,.0f}, max {max(rates):,.0f})", flush=True)
    engine.time_stages = True
    engine.take_timings()
    _run(engine, hr8, args.batches, args.group, True, 50_000)
    timings = engine.take_timings()
    print("  per-stage device time per batch (ms): " + ", ".join(
        f"{s} {1000 * timings[s] / args.batches:.1f}" for s in STAGES if s in timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
