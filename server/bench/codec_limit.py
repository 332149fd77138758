"""Codec-only throughput: the "codec limit" and "naive baseline" rows of BENCH.md.

``codec_limit`` runs only the in-memory software round trips of the given
video batches on ``workers`` processes; it is the ceiling the full engine can
approach on a CPU machine.  ``naive_limit`` runs the reference-style
PNG + ``ffmpeg`` CLI round trip (``server.bench.naive_ffmpeg``) on the same
batches with the same parallelism.

Why processes, not threads (measured on 2 cores, 128 frames of 90x90 per
batch): PyAV releases the GIL inside ``avcodec_send_frame`` / ``receive``,
but swscale conversions and the per-frame Python glue hold it, so 2 threads
gave only x1.3 (MPEG-2/MPEG-4) to x1.6-1.8 (x264/x265) over one, while 2
processes gave x1.7-2.0; on the spec's codec mix (48 batches) threads gave
x1.55-1.63 and processes x1.7-2.0 (about 3000 vs 3400-3900 pairs/s).

Timing excludes pool start-up: workers are spawned, receive the batches once
(``initializer``), and warm every codec up before the clock starts; each
timed task ships only a batch index in and a frame count out, so the figure
is codec work, not pickling.  ``spawn`` keeps workers free of whatever the
parent imported (torch, OpenMP thread pools).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Callable

import numpy as np

from server.degradation.video import VideoParams

Batch = tuple[np.ndarray, VideoParams]

_BATCHES: list[Batch] = []


def _init_worker(batches: list[Batch]) -> None:
    global _BATCHES
    _BATCHES = batches


def _software_task(i: int) -> int:
    from server.codecs.software import SoftwareBackend

    frames, params = _BATCHES[i]
    out = SoftwareBackend().roundtrip(frames, params)
    return int(out.shape[0])


def _naive_task(i: int) -> int:
    from .naive_ffmpeg import naive_roundtrip

    frames, params = _BATCHES[i]
    out = naive_roundtrip(frames, params)
    return int(out.shape[0])


def _warm_task(_: int) -> int:
    """Load every codec once (library init, x264/x265 tables) off the clock."""
    from server.codecs.software import SoftwareBackend

    frames = np.zeros((2, 16, 16, 3), np.uint8)
    backend = SoftwareBackend()
    for params in (
        VideoParams("mpeg2video", 25, bitrate_kbps=4000),
        VideoParams("mpeg4", 25, bitrate_kbps=4000),
        VideoParams("libx264", 25, crf=26, preset="medium"),
        VideoParams("libx265", 25, crf=31, preset="medium"),
    ):
        backend.roundtrip(frames, params)
    time.sleep(0.05)  # keep this worker busy so the others take a warm-up too
    return 0


def _run(task: Callable[[int], int], video_batches: list[Batch], workers: int) -> dict[str, Any]:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not video_batches:
        raise ValueError("need at least one video batch")
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(video_batches,)) as pool:
        pool.map(_warm_task, range(2 * workers), chunksize=1)
        start = time.perf_counter()
        pairs = sum(pool.imap_unordered(task, range(len(video_batches)), chunksize=1))
        seconds = time.perf_counter() - start
    expected = sum(int(frames.shape[0]) for frames, _ in video_batches)
    if pairs != expected:
        raise RuntimeError(f"round trips returned {pairs} frames, expected {expected}")
    return {
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds if seconds > 0 else float("inf"),
        "workers": workers,
        "batches": len(video_batches),
        "parallelism": "processes",
    }


def codec_limit(video_batches: list[Batch], workers: int) -> dict[str, Any]:
    """Pairs/s of the in-memory software round trips of ``video_batches``.

    Returns ``{"pairs", "seconds", "pairs_per_s", "workers", "batches",
    "parallelism"}``; ``pairs`` is the total number of frames round-tripped.
    """
    return _run(_software_task, video_batches, workers)


def naive_limit(video_batches: list[Batch], workers: int) -> dict[str, Any]:
    """Pairs/s of the PNG + ffmpeg CLI round trips, same batches and parallelism.

    Needs the ``ffmpeg`` tool (``server.bench.naive_ffmpeg.ffmpeg_available``).
    """
    return _run(_naive_task, video_batches, workers)
