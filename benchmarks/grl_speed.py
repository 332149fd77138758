"""Micro-benchmark: one GRL-small training step (forward + L1 loss + backward), ours
(``model.grl``) against the reference (``spandrel``'s GRL), same weights.

    python -m benchmarks.grl_speed --device cuda            # batch 12, LR 90x90, fp32 and bf16
    python -m benchmarks.grl_speed --device cpu --batch 2 --steps 3
    python -m benchmarks.grl_speed --device cuda --compile  # adds a torch.compile'd row of ours

Prints steps/s (from the fastest step; the median in brackets), images/s and
memory per (model, precision); bf16 means ``torch.autocast(dtype=torch.bfloat16)`` around
forward and loss (fp32 weights). The reference is built with ``img_size`` = our
padded training size so it also uses its precomputed tables/masks. Steps of the
models are interleaved (A B A B ...) so load from other processes on a shared
machine hits both alike, and the fastest step counts (the least disturbed one);
compare the ratios, not absolute numbers. Memory:
the tensors autograd saves for backward (activations, any device) and, on CUDA,
``torch.cuda.max_memory_allocated`` over a step (both models' weights included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(which: str, size: int, seed: int) -> torch.nn.Module:
    from model.grl import GRLConfig, build_grl_small

    torch.manual_seed(seed)
    ours = build_grl_small(img_size=size)
    if which.startswith("ours"):
        return ours
    from spandrel.architectures.GRL import GRL as ReferenceGRL

    ref = ReferenceGRL(**GRLConfig(img_size=size).spandrel_kwargs())
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref


def saved_for_backward_mb(net: torch.nn.Module, x: torch.Tensor, amp: bool) -> float:
    """MiB of tensors autograd keeps for the backward pass (unique storages): the
    activation memory of a training step, the same measure on every device."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
    del out
    return sum(seen.values()) / 2**20


def time_models(models: list[str], precision: str, args: argparse.Namespace) -> list[dict]:
    """Steps of all models interleaved (A B A B ...), so that load from other processes
    on a shared machine hits every model alike; the fastest step is the least disturbed."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.rand(args.batch, 3, 4 * args.size, 4 * args.size, generator=g).to(device)
    amp = precision == "bf16"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    nets = {}
    for which in models:
        net = _build(which, args.size, args.seed).to(device, memory_format=fmt).train()
        nets[which] = torch.compile(net) if which == "ours+compile" else net

    def step(net: torch.nn.Module) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.l1_loss(net(x).float(), y)
        loss.backward()
        net.zero_grad(set_to_none=True)  # free the grads: the other model's step starts clean

    for net in nets.values():
        for _ in range(args.warmup):
            step(net)
    _sync(device)
    times: dict[str, list[float]] = {m: [] for m in models}
    peaks: dict[str, float] = {m: float("nan") for m in models}
    for _ in range(args.steps):
        for which, net in nets.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step(net)
            _sync(device)
            times[which].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[which] = torch.cuda.max_memory_allocated(device) / 2**20
    rows = []
    for which in models:
        best, med = min(times[which]), statistics.median(times[which])
        rows.append({
            "model": which, "precision": precision, "steps_per_s": 1.0 / best,
            "median_steps_per_s": 1.0 / med, "images_per_s": args.batch / best, "peak_mem_mb": peaks[which],
            "saved_mb": saved_for_backward_mb(nets[which], x, amp),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--size", type=int, default=90, help="LR patch size (square)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--models", default="ours,spandrel")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and input, both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU")

    models = [m for m in args.models.split(",") if m]
    if args.compile:
        models.append("ours+compile")
    if "spandrel" in models:
        try:
            import spandrel  # noqa: F401
        except ImportError:
            print("spandrel is not installed (pip install spandrel): timing ours only")
            models.remove("spandrel")
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"GRL-small train step (fwd + L1 + bwd), batch {args.batch}, {args.size}x{args.size} -> "
          f"{4 * args.size}x{4 * args.size}, {args.steps} steps after {args.warmup} warm-up, {name}")  # fmt: skip
    rows = []
    for precision in [q for q in args.precisions.split(",") if q]:
        for row in time_models(models, precision, args):
            rows.append(row)
            line = (
                f"  {row['model']:<13} {row['precision']:<5} {row['steps_per_s']:8.3f} it/s "
                f"(median {row['median_steps_per_s']:7.3f})  {row['images_per_s']:8.2f} img/s  "
                f"saved for backward {row['saved_mb']:7.1f} MiB"
            )
            if dev.type == "cuda":
                line += f"  peak allocated {row['peak_mem_mb']:7.1f} MiB"
            print(line)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["model"], r["precision"]): r["steps_per_s"] for r in rows}
    for precision in args.precisions.split(","):
        if ("ours", precision) in by and ("spandrel", precision) in by:
            print(f"  speed-up ours/spandrel {precision}: {by['ours', precision] / by['spandrel', precision]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
