"""Hardware codec speed: software round trip vs hybrid (software encode +
NVDEC decode) vs NVENC + NVDEC, per codec, on the engine's shape of work
(128-frame video batches of 90x90 LR frames, the spec's mid-range codec
parameters), plus the quality of each path.

    python -m benchmarks.nvcodec_speed [--batches 4] [--batch-size 128] [--json out.json]

For every codec and every backend the machine can run it prints

* wall frames/s of one worker (one process, the codecs single-threaded as in
  the engine),
* CPU ms per frame of that worker (``time.process_time``): the engine runs
  one worker per core, so while the GPU is not saturated the machine's
  throughput is about ``cores / CPU time per frame`` - the hybrid only pays
  if the CPU it saves (FFmpeg decode + swscale) outweighs its overhead,
* PSNR of the output against the input and against the software output.

The ``throughput`` it prints (and writes with ``--json``) is
``{codec: {backend: frames per CPU-second}}`` (``--metric wall`` for wall
frames/s), the input ``server.codecs.selection.select_backends`` takes; the
plan that results is printed at the end.

Without an NVIDIA GPU or without PyNvVideoCodec it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.degradation.video import VideoParams

#: One mid-range draw per codec of the spec's table (fps 24, aspect kept).
PARAMS: dict[str, VideoParams] = {
    "mpeg2video": VideoParams("mpeg2video", fps=25, bitrate_kbps=5000),
    "mpeg4": VideoParams("mpeg4", fps=24, bitrate_kbps=5000),
    "libx264": VideoParams("libx264", fps=24, crf=26, preset="medium"),
    "libx265": VideoParams("libx265", fps=24, crf=31, preset="medium"),
}


def make_batches(n_batches: int, batch_size: int, size: int) -> list[np.ndarray]:
    """LR-like clips: a ``size`` x ``size`` window panning over x4-downscaled
    sample photographs (neighbouring patches of one image, like a video batch)."""
    import torch
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    batches = []
    for b in range(n_batches):
        img = photos[b % len(photos)]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        h, w = img.shape[:2]
        small = torch.nn.functional.interpolate(t, size=(h // 2, w // 2), mode="bicubic", antialias=True,
                                                align_corners=False)
        small = small.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        sh, sw = small.shape[:2]
        if sh < size or sw < size:
            raise ValueError(f"frame size {size} too large for the sample photographs")
        span_y, span_x = sh - size, sw - size
        frames = []
        for k in range(batch_size):
            y = (k * 3) % (2 * span_y + 1)
            x = (k * 5) % (2 * span_x + 1)
            y = y if y <= span_y else 2 * span_y - y  # ping-pong pan
            x = x if x <= span_x else 2 * span_x - x
            frames.append(small[y : y + size, x : x + size])
        batches.append(np.ascontiguousarray(np.stack(frames)))
    return batches


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _time(backend: Any, batches: list[np.ndarray], params: VideoParams) -> tuple[float, float, list[np.ndarray]]:
    """(wall s, CPU s, outputs) for all batches, after one warm-up batch."""
    import torch

    backend.roundtrip(batches[0][:8], params)
    outs = []
    device = getattr(backend, "device", None)
    sync = device is not None and torch.device(device).type == "cuda"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for frames in batches:
        outs.append(backend.roundtrip(frames, params))
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - wall0, time.process_time() - cpu0, outs


def run(batches: list[np.ndarray], codecs: list[str], metric: str) -> dict[str, Any]:
    from server.codecs.nvcodec import NvCodecBackend, probe_hardware
    from server.codecs.selection import select_backends
    from server.codecs.software import SoftwareBackend

    caps = probe_hardware()
    backends: dict[str, Any] = {"software": SoftwareBackend()}
    if caps.decode:
        backends["hybrid"] = NvCodecBackend(caps, encode="software")
        backends["hybrid-torch"] = NvCodecBackend(caps, encode="software", rgb="torch")
    if caps.encode:
        backends["nvenc"] = NvCodecBackend(caps, encode="nvenc")
    frames_total = sum(len(b) for b in batches)
    rows, throughput = [], {}
    for codec in codecs:
        params = PARAMS[codec]
        ref_out = None
        throughput[codec] = {}
        for name, backend in backends.items():
            if not backend.supports(codec):
                continue
            try:
                wall, cpu, outs = _time(backend, batches, params)
            except Exception as e:  # report, keep measuring the others
                rows.append({"codec": codec, "backend": name, "error": f"{type(e).__name__}: {e}"})
                continue
            if name == "software":
                ref_out = outs
            row = {
                "codec": codec,
                "backend": name,
                "frames": frames_total,
                "wall_fps": frames_total / wall,
                "cpu_ms_per_frame": 1000 * cpu / frames_total,
                "psnr_vs_input": float(np.mean([_psnr(o, f) for o, f in zip(outs, batches)])),
                "psnr_vs_software": (float(np.mean([_psnr(o, r) for o, r in zip(outs, ref_out)]))
                                     if ref_out is not None else None),
                "identical_to_software": (all(np.array_equal(o, r) for o, r in zip(outs, ref_out))
                                          if ref_out is not None else None),
            }
            rows.append(row)
            key = name.split("-")[0]
            if name == key:  # "hybrid-torch" is informative; the plan uses the default conversion
                throughput[codec][key] = row["wall_fps"] if metric == "wall" else frames_total / max(cpu, 1e-9)
    plan = select_backends(caps, throughput=throughput)
    return {"hardware": caps.summary(), "rows": rows, "throughput": throughput, "metric": metric,
            "plan": plan.explain()}


def _print(res: dict[str, Any]) -> None:
    print(res["hardware"])
    head = f"{'codec':<11} {'backend':<13} {'wall f/s':>9} {'CPU ms/f':>9} {'PSNR in':>8} {'PSNR sw':>8}  same as sw"
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['codec']:<11} {r['backend']:<13} failed: {r['error']}")
            continue
        sw = "-" if r["psnr_vs_software"] is None else f"{r['psnr_vs_software']:.2f}"
        same = "-" if r["identical_to_software"] is None else str(r["identical_to_software"])
        print(f"{r['codec']:<11} {r['backend']:<13} {r['wall_fps']:>9.0f} {r['cpu_ms_per_frame']:>9.3f} "
              f"{r['psnr_vs_input']:>8.2f} {sw:>8}  {same}")
    print(f"\nthroughput for select_backends ({res['metric']}): {json.dumps(res['throughput'])}")
    print(res["plan"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=4, help="video batches per codec and backend (default 4)")
    ap.add_argument("--batch-size", type=int, default=128, help="frames per video batch (default 128)")
    ap.add_argument("--size", type=int, default=90, help="frame size (default 90)")
    ap.add_argument("--codecs", default=",".join(PARAMS), help="comma-separated subset of " + ",".join(PARAMS))
    ap.add_argument("--metric", choices=("cpu", "wall"), default="cpu",
                    help="throughput fed to the selection: frames per CPU-second (default) or wall frames/s")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    from server.codecs.nvcodec import probe_hardware

    caps = probe_hardware()
    if not caps.available:
        print(f"nvcodec_speed: no NVIDIA GPU / PyNvVideoCodec not available ({caps.reason}); nothing to measure.")
        return 0
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = [c for c in codecs if c not in PARAMS]
    if unknown:
        ap.error(f"unknown codecs {unknown}")
    batches = make_batches(args.batches, args.batch_size, args.size)
    res = run(batches, codecs, args.metric)
    _print(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
