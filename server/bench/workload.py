"""The standard workload of ``shared/spec/BENCH.md``, all figures from ONE run.

1. engine    - pairs/s made in-process by the chosen pipeline (all cores, and the GPU with
   ``--device cuda``); with the split pipeline also the device stage's and the pool's busy
   fractions (which side is the bottleneck) and the pool's core-ms per pair.  When the images come
   from a pixel store (the default), the engine is measured twice in the run, fed by decoding the
   folder and from the store: pairs/s, stage tables and peak memory (PSS sum) side by side;
2. delivered - pairs/s received over gRPC on loopback by 1 and by N client processes
   from a degrade-server subprocess (``server.bench.delivered``);
3. codec     - the codec round trips alone, same frames and codec parameters, all cores;
4. naive     - the reference way: PNG files + the ffmpeg CLI twice, same frames and parameters.

The same video batches (full 128-patch batches of real photographs) feed all
three, so ratios are comparable; absolute numbers on a shared machine are not.
Per-stage times come from the engine's own stage timers (core-seconds per batch).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from server.degradation.config import DegradationConfig
from server.degradation.engine import STAGES
from server.degradation.images import ImageFolder
from server.pipeline.batch import BatchProducer, default_workers
from server.pipeline.registry import make_producer


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def full_batches(producer: BatchProducer, seed: int, count: int, size: int) -> list[tuple[int, int]]:
    """(epoch, index) of ``count`` full-size video batches, walking epochs from 0."""
    found: list[tuple[int, int]] = []
    epoch = 0
    while len(found) < count:
        plan = producer.plan(seed, epoch)
        for k in range(plan.num_batches):
            if plan.batch_starts[k + 1] - plan.batch_starts[k] == size:
                found.append((epoch, k))
                if len(found) == count:
                    break
        epoch += 1
        if epoch > 1000:
            raise ValueError("the image folder has too few patches for a full video batch")
    return found


def _busy(producer: BatchProducer) -> dict[str, float] | None:
    """Busy seconds of the split pipeline's device stage and pool (None for the whole-batch path)."""
    snap = getattr(producer, "busy_snapshot", None)
    return snap() if snap is not None else None


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class _PssPeak:
    """The peak of the PSS sum of a process and its pool's workers, sampled every 0.2 s in a thread
    (PSS splits shared pages - a pixel store's map, shared libraries - between the processes mapping them)."""

    def __init__(self, producer: BatchProducer):
        self.producer, self.peak_kib = producer, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-peak", daemon=True)

    @staticmethod
    def pss_kib(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def sample(self) -> None:
        total = sum(self.pss_kib(p) for p in [os.getpid(), *self.producer.worker_pids()])
        self.peak_kib = max(self.peak_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self) -> "_PssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class _Feed:
    """One engine under test: a producer fed from one image source, and what its runs measured."""

    def __init__(self, label: str, folder: ImageFolder, cfg: DegradationConfig, *, device: str,
                 workers: int | None, pipeline: str):
        self.label = label
        self.producer = make_producer(folder, cfg, pipeline=pipeline, workers=workers, device=device,
                                      keep_precodec=True, time_stages=True)
        self.pss = _PssPeak(self.producer)
        self.rates: dict[bool, list[float]] = {True: [], False: []}
        self.stage_sum = {s: 0.0 for s in STAGES}
        self.stage_batches = 0
        self.codec_inputs: list = []
        self.busy: dict[str, list[float]] = {"device": [], "pool": []}
        self.pool_ms: list[float] = []

    def run(self, seed: int, group: list[tuple[int, int]], with_usm: bool, timed: bool, r: int) -> None:
        producer, nworkers = self.producer, self.producer.workers
        before = _busy(producer)
        t0 = time.perf_counter()
        n = 0
        for res in producer.produce_jobs(seed, group, want_usm=with_usm):
            n += len(res)
            if timed and with_usm:
                for s, v in res.timings.items():
                    self.stage_sum[s] = self.stage_sum.get(s, 0.0) + v
                self.stage_batches += 1
                if res.precodec is not None:
                    self.codec_inputs.append((res.precodec, res.video))
        dt = time.perf_counter() - t0
        if not timed:
            return
        self.rates[with_usm].append(n / dt)
        after = _busy(producer)
        if with_usm and before and after:
            wall = after["wall"] - before["wall"]
            self.busy["device"].append((after["device"] - before["device"]) / wall)
            self.busy["pool"].append((after["pool"] - before["pool"]) / (wall * max(1, nworkers)))
            self.pool_ms.append(1000 * (after["pool"] - before["pool"]) / max(1, n))
        print(f"  engine from the {self.label}, run {r} ({'with' if with_usm else 'without'} USM target): {n} "
              f"pairs in {dt:.2f} s = {n / dt:.1f} pairs/s", flush=True)

    def figures(self) -> dict[str, Any]:
        producer = self.producer
        per_process = [_vm_hwm_kib(os.getpid())] + [_vm_hwm_kib(p) for p in producer.worker_pids()]
        out: dict[str, Any] = {"engine": _summary(self.rates[True]), "engine_no_usm": _summary(self.rates[False]),
                               "stages_s_per_batch": {s: v / max(1, self.stage_batches)
                                                      for s, v in self.stage_sum.items()}}
        out["engine"]["peak_memory_gib"] = sum(per_process) / 2**20
        out["engine"]["peak_memory_gib_per_process"] = [k / 2**20 for k in per_process]
        out["engine"]["peak_pss_gib"] = self.pss.peak_kib / 2**20
        if self.busy["device"]:
            out["busy_fraction"] = {k: statistics.median(v) for k, v in self.busy.items()}
            out["pool_core_ms_per_pair"] = statistics.median(self.pool_ms)
        return out


def _engine_figures(sources: list[tuple[str, ImageFolder]], cfg: DegradationConfig, *, device: str,
                    workers: int | None, pipeline: str, runs: int, batches: int,
                    seed: int) -> tuple[dict[str, dict[str, Any]], list, list]:
    """The engine's figures fed from each source (decoded images, a pixel store): pairs/s with and without
    the USM target, the stage table, peak memory, the split pipeline's busy fractions and pool core-ms per
    pair.  The sources take turns run by run (same batches), so a noisy machine slows them alike.
    Returns ``({label: figures}, the run groups, the last source's codec inputs)``."""
    feeds = [_Feed(label, folder, cfg, device=device, workers=workers, pipeline=pipeline)
             for label, folder in sources]
    try:
        first = feeds[0].producer
        per_run = max(batches, max(1, first.workers))  # every worker gets work in each run
        chosen = full_batches(first, seed, per_run * (runs + 1), cfg.video_batch_size)
        groups = [chosen[i * per_run:(i + 1) * per_run] for i in range(runs + 1)]
        with contextlib.ExitStack() as samplers:
            for feed in feeds:
                samplers.enter_context(feed.pss)
            for with_usm in (True, False):
                for r, group in enumerate(groups):  # group 0 = warm-up
                    for feed in feeds:
                        feed.run(seed, group, with_usm, r > 0, r)
        out = {feed.label: {**feed.figures(), "workers": feed.producer.workers, "pipeline": feed.producer.pipeline}
               for feed in feeds}
    finally:
        for feed in feeds:
            feed.producer.close()
    return out, groups, feeds[-1].codec_inputs


def run_bench(folder: ImageFolder, cfg: DegradationConfig, *, device: str = "cpu", workers: int | None = None,
              pipeline: str = "auto", runs: int = 3, batches: int = 2, seed: int = 0, json_path: Path | None = None,
              skip_naive: bool = False, skip_delivered: bool = False, clients: int = 4,
              compare_folder: bool = True, shared_memory: bool = True) -> int:
    """The standard workload.  When ``folder`` reads a pixel store of an image folder (and
    ``compare_folder``), the engine is measured twice in the run: fed by decoding the folder, then from the
    store; the other figures use the store."""
    from .codec_limit import codec_limit, naive_limit
    from .naive_ffmpeg import ffmpeg_available

    runs = max(1, runs)
    codec_workers = default_workers() if workers is None else max(1, workers)  # the codec limit uses every core
    sources = [("store" if folder.store is not None else "folder", folder)]
    if compare_folder and folder.store is not None and folder.root.is_dir():
        sources.insert(0, ("folder", ImageFolder(folder.root, cfg.patch_size)))
    print(f"bench: {runs} runs x video batches of {cfg.video_batch_size} patches ({cfg.patch_size}->{cfg.lr_size}), "
          f"{pipeline} pipeline, device {device}, engine fed from: {' and '.join(k for k, _ in sources)}", flush=True)
    figures, groups, codec_inputs = _engine_figures(sources, cfg, device=device, workers=workers,
                                                    pipeline=pipeline, runs=runs, batches=batches, seed=seed)
    main_label = sources[-1][0]
    main = figures[main_label]
    nworkers = main["workers"]
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "gpu": _gpu_name(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "commit": _git_commit(),
        "workload": {"patch_size": cfg.patch_size, "lr_size": cfg.lr_size, "video_batch": cfg.video_batch_size,
                     "profile": cfg.profile, "batches_per_run": len(groups[0]), "runs": runs, "workers": nworkers,
                     "pipeline": main["pipeline"], "device": str(device), "fed_from": main_label},
    }
    for key in ("engine", "engine_no_usm", "stages_s_per_batch", "busy_fraction", "pool_core_ms_per_pair"):
        if key in main:
            results[key] = main[key]
    if len(figures) > 1:
        results["from_folder"] = figures["folder"]
    # delivered over gRPC: the same jobs, from a real server process (the in-process pool is closed by now)
    if not skip_delivered:
        from .delivered import deliver, server_process

        with server_process(folder.root, cfg, workers, device, pipeline=main["pipeline"]) as address:
            deliver(address, seed, groups[0], 1, shared_memory=shared_memory)  # warm-up: the worker pool starts
            for n_clients, key in ((1, "delivered_1"), (max(1, clients), "delivered_n")):
                got = [deliver(address, seed, group, n_clients, shared_memory=shared_memory) for group in groups[1:]]
                for r, g in enumerate(got, 1):
                    print(f"  delivered run {r} to {n_clients} client(s): {g['pairs']} pairs in {g['seconds']:.2f} s"
                          f" = {g['pairs_per_s']:.1f} pairs/s, {g['bytes_per_s'] / 1e6:.0f} MB/s, "
                          f"{g['shared_batches']} batches through shared memory", flush=True)
                results[key] = _summary([g["pairs_per_s"] for g in got])
                results[key]["bytes_per_s"] = statistics.median(g["bytes_per_s"] for g in got)
                results[key]["clients"] = n_clients
                results[key]["delivery"] = "shared memory" if all(g["shared_batches"] for g in got) else "bytes"

    # the codec stage alone and the naive baseline, on the very frames and parameters the engine used
    one_run = codec_inputs[: max(1, len(codec_inputs) // runs)]
    if not one_run:
        print("  (no video-ending batch among the chosen ones: codec figures skipped)")
    else:
        rates = [codec_limit(one_run, workers=codec_workers)["pairs_per_s"] for _ in range(runs)]
        results["codec_limit"] = _summary(rates)
        results["codec_limit"]["core_ms_per_pair"] = 1000 * codec_workers / results["codec_limit"]["median"]
        if skip_naive:
            results["naive"] = None
        elif not ffmpeg_available():
            print("  naive baseline skipped: the ffmpeg command-line tool is not installed (apt-get install ffmpeg)")
            results["naive"] = None
        else:
            rates = [naive_limit(one_run, workers=codec_workers)["pairs_per_s"] for _ in range(runs)]
            results["naive"] = _summary(rates)
        results["codec_mix"] = [v.codec for _, v in one_run]
    _print_table(results)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
        print(f"results -> {json_path}")
    return 0


def _print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print()
    w = res["workload"]
    print(f"machine: {m['cores']} cores, GPU {m['gpu'] or 'none'}; commit {res['commit']}; "
          f"profile {w['profile']}; {w.get('pipeline', 'batch')} pipeline on {w.get('device', 'cpu')}, "
          f"{w['workers']} workers")
    print(f"{'figure':<40}{'median':>10}{'min':>10}{'max':>10}   pairs/s")
    rows = [("1. engine (in-process, all cores)", res.get("engine")),
            ("1b. engine, no USM target", res.get("engine_no_usm")),
            ("2. delivered over gRPC, 1 client", res.get("delivered_1")),
            (f"2b. delivered, {(res.get('delivered_n') or {}).get('clients', 4)} clients", res.get("delivered_n")),
            ("3. codec limit (in-memory, all cores)", res.get("codec_limit")),
            ("4. naive (PNG + ffmpeg CLI)", res.get("naive"))]
    for name, s in rows:
        if s:
            print(f"{name:<40}{s['median']:>10.1f}{s['min']:>10.1f}{s['max']:>10.1f}")
        else:
            print(f"{name:<40}{'-':>10}")
    e, c, nv = res.get("engine"), res.get("codec_limit"), res.get("naive")
    for key in ("delivered_1", "delivered_n"):
        d = res.get(key)
        if e and d:
            print(f"delivered to {d['clients']} client(s) / engine = {d['median'] / e['median']:.2f} "
                  f"({d['bytes_per_s'] / 1e6:.0f} MB/s of uint8 LR + HR + sharpened HR, "
                  f"{d.get('delivery', 'bytes')})")
    if e and c:
        print(f"engine / codec limit = {e['median'] / c['median']:.2f}")
    if c and nv:
        print(f"codec in memory / naive = {c['median'] / nv['median']:.2f}")
    if e and nv:
        print(f"engine / naive = {e['median'] / nv['median']:.2f}")
    f = res.get("from_folder")
    if e and f:
        fe = f["engine"]
        print(f"engine from the pixel store / from the folder = {e['median'] / fe['median']:.2f} "
              f"({e['median']:.1f} vs {fe['median']:.1f} pairs/s; no USM target: "
              f"{res['engine_no_usm']['median'] / f['engine_no_usm']['median']:.2f})")
    for name, fig in (("from the folder", (f or {}).get("engine")), ("", e)):
        if not fig:
            continue
        label = f" {name}" if name else (" from the pixel store" if f else "")
        parts = " + ".join(f"{g:.2f}" for g in fig.get("peak_memory_gib_per_process", []))
        print(f"peak memory of the engine{label}: PSS sum {fig['peak_pss_gib']:.2f} GiB; sum of each process's "
              f"VmHWM (main + workers) {fig['peak_memory_gib']:.2f} GiB ({parts})")
    if e and f:
        print(f"peak PSS sum, store / folder = {e['peak_pss_gib'] / f['engine']['peak_pss_gib']:.3f}")
    for name, fig in (("from the folder", f), ("", res)):
        if fig and fig.get("pool_core_ms_per_pair") is not None:
            print(f"split pipeline{' ' + name if name else ''}: codec pool {fig['pool_core_ms_per_pair']:.1f} core-ms "
                  "per pair (HR loads + codec round trips)"
                  + (f"; the codec round trips alone {c['core_ms_per_pair']:.1f} core-ms per pair, ratio "
                     f"{fig['pool_core_ms_per_pair'] / c['core_ms_per_pair']:.2f}" if c else ""))
    print("\nper-stage time (seconds per video batch; device stages are device time with --device cuda):")
    stages = res.get("stages_s_per_batch", {})
    folder_stages = (f or {}).get("stages_s_per_batch")
    total = sum(stages.values()) or 1.0
    if folder_stages:
        folder_total = sum(folder_stages.values()) or 1.0
        print(f"  {'stage':<8}{'from the folder':>24}{'from the pixel store':>26}")
        for s, v in stages.items():
            fv = folder_stages.get(s, 0.0)
            print(f"  {s:<8}{fv:>10.3f} s  {100 * fv / folder_total:5.1f} %{v:>14.3f} s  {100 * v / total:5.1f} %")
        print(f"  {'total':<8}{folder_total:>10.3f} s{'':>9}{total:>12.3f} s")
        return
    for s, v in stages.items():
        print(f"  {s:<8}{v:>8.3f} s  {100 * v / total:5.1f} %")
