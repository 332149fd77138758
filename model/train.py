"""``grl-train``: train GRL-small on degraded pairs (also ``python -m model.train``).

    grl-train --stage l1 --out runs/l1                          # in-process engine, sample data
    grl-train --stage l1 --server gpu-box:50051 --out runs/l1   # from degrade-server(s): LR + HR, USM here
    grl-train --server gpu-box:50051 --hr-root /data/hr --out runs/l1   # LR + records only, HR cut here
    grl-train --stage gan --init runs/l1/checkpoints/latest.pt --vgg-weights vgg19-dcbb9e9d.pth --out runs/gan
    grl-train --out runs/l1 --resume                            # continue exactly where it stopped

Stages (VCISR / Real-ESRGAN recipe):
- ``l1``: L1 on the sharpened HR; Adam(0.9, 0.99), lr 2e-4, batch 12, lr halved every 50k iterations.
- ``gan``: from an L1 checkpoint; L1 + VGG-19 perceptual (conv1_2 .1, conv2_2 .1, conv3_4 1, conv4_4 1,
  conv5_4 1; weight 1) on the sharpened HR + 0.1 x GAN with a U-Net discriminator (spectral norm) that sees
  the plain HR; batch 6, lr 1e-4, halved every 20k.

Over the network the trainer asks for as little as its flags allow (``--wire``): ``lr`` (LR + records;
HR cut from ``--hr-root``, the local copy of the servers' dataset, checked against their fingerprint) when
``--hr-root`` is given, else ``lr-hr`` (LR + HR); the sharpened HR is made on the trainer's device with the
servers' own USM (byte-identical on the CPU, within 1/255 on CUDA). ``--wire full`` takes it from the server.

A checkpoint holds everything needed to continue bit for bit: generator, discriminator, both optimizers
and schedulers, the AMP scaler, the iteration, every RNG state, and the data position (the identities of
the pairs in the shuffle pool - servers remake them on resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from server.degradation.config import DegradationConfig

from .data import TrainingStream
from .quality import psnr, ssim

log = logging.getLogger("grl.train")

STAGE_DEFAULTS = {
    "l1": {"batch_size": 12, "lr": 2e-4, "halve_every": 50_000, "iterations": 700_000},
    "gan": {"batch_size": 6, "lr": 1e-4, "halve_every": 20_000, "iterations": 280_000},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is started with (saved in each checkpoint, logged at start-up)."""

    stage: str = "l1"
    out: Path = Path("runs/grl")
    servers: tuple[str, ...] = ()         # empty: an in-process engine
    wire: str | None = None               # full | lr-hr | lr; None: lr with hr_root, else lr-hr (client.wire)
    hr_root: Path | None = None           # the trainer's copy of the servers' dataset (wire lr)
    shared_memory: bool = True            # tensors from a same-host server's shared memory when it offers them
    token: str | None = None
    tls_ca: Path | None = None
    unreachable_timeout: float = 600.0    # servers: give up after this long with none reachable (slow is fine)
    images: Path | None = None            # in-process engine's images (default: the sample data)
    degradation_config: Path | None = None  # in-process engine's config file
    engine_workers: int | None = None
    engine_device: str = "auto"           # in-process engine: auto = the training device
    engine_pipeline: str = "auto"         # in-process engine: auto = split on a GPU, batch on the CPU
    seed: int = 0
    iterations: int | None = None         # None: the stage's default
    batch_size: int | None = None
    lr: float | None = None
    halve_every: int | None = None
    betas: tuple[float, float] = (0.9, 0.99)
    pool_size: int = 180                  # Real-ESRGAN's pair pool for batch 12
    lr_crop: int | None = None            # train on random LR crops of this size (None: whole 90x90 patches)
    device: str = "auto"
    amp: str = "auto"                     # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    init: Path | None = None              # generator weights to start from (the L1 checkpoint for gan)
    vgg_weights: Path | None = None       # torchvision's vgg19-dcbb9e9d.pth (gan stage)
    random_vgg: bool = False              # tests only: a randomly initialised VGG-19
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    model_overrides: dict = field(default_factory=dict)  # GRLConfig fields (tests use a tiny GRL)
    checkpoint_every: int = 5000
    log_every: int = 100                  # losses are read from the device (one sync) every N iterations
    preview_every: int = 1000
    val_every: int = 5000
    val_pairs: int = 8
    resume: bool = False
    compile: str = "off"                  # off | default | reduce-overhead (CUDA graphs) | max-autotune | eager (tests)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be one of {sorted(STAGE_DEFAULTS)}, got {self.stage!r}")
        if self.compile not in ("off", "default", "reduce-overhead", "max-autotune", "eager"):
            raise ValueError(f"compile must be off, default, reduce-overhead, max-autotune or eager, got {self.compile!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not self.servers and (self.wire is not None or self.hr_root is not None):
            raise ValueError("--wire and --hr-root choose what comes over the network from --server; the in-process "
                             "engine reads --images")
        if self.servers:
            from client.wire import check_wire

            check_wire(self.wire_mode(), self.hr_root)

    def wire_mode(self) -> str:
        """What the servers send: the leanest mode the flags allow unless ``wire`` says."""
        return self.wire or ("lr" if self.hr_root is not None else "lr-hr")

    def get(self, name: str) -> Any:
        value = getattr(self, name)
        return STAGE_DEFAULTS[self.stage][name] if value is None else value

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                           if k != "token"} | {"token": "<set>" if self.token else None}, default=str)


# ---------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch sees no CUDA GPU")
    return dev


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def augment(gen: torch.Generator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same random h-flip, v-flip and transpose per sample on every tensor (LR and HR alike)."""
    n = tensors[0].shape[0]
    flips = torch.rand(n, 3, generator=gen) < 0.5
    out = []
    for t in tensors:
        m = flips.to(t.device)
        t = torch.where(m[:, 0, None, None, None], t.flip(-1), t)
        t = torch.where(m[:, 1, None, None, None], t.flip(-2), t)
        t = torch.where(m[:, 2, None, None, None], t.transpose(-1, -2), t)
        out.append(t)
    return out


def random_crop(gen: torch.Generator, size: int, scale: int, lr: torch.Tensor, *hrs: torch.Tensor):
    """One random LR crop of ``size`` (and the matching HR crops) for the whole batch."""
    h, w = lr.shape[-2:]
    if size >= min(h, w):
        return [lr, *hrs]
    y = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    out = [lr[..., y:y + size, x:x + size]]
    out += [t[..., y * scale:(y + size) * scale, x * scale:(x + size) * scale] for t in hrs]
    return out


def to_float(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (host) -> float NCHW in [0, 1] on ``device`` (converted there: 4x less to copy)."""
    t = torch.from_numpy(arr)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------
class Trainer:
    """One training run: models, optimizers, data stream, checkpoints, previews, validation."""

    def __init__(self, cfg: TrainConfig, source: Any = None):
        """``source``: where video batches come from (default: servers or an in-process engine, per ``cfg``)."""
        from .grl import build_grl_small

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.amp = amp_dtype(cfg, self.device)
        self.out = Path(cfg.out)
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # model init and drop-path draws; saved and restored with checkpoints
        self.generator = build_grl_small(**cfg.model_overrides).to(self.device)
        self.scale = int(getattr(self.generator, "upscale", 4))
        # the compiled callable shares the generator's parameters; checkpoints use the plain module
        if cfg.compile == "off":
            self.forward_train = self.generator
        elif cfg.compile == "eager":  # torch.compile's plumbing without code generation (tests)
            self.forward_train = torch.compile(self.generator, backend="eager")
        else:
            self.forward_train = torch.compile(self.generator, mode=cfg.compile)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.get("lr"), betas=cfg.betas)
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, step_size=cfg.get("halve_every"), gamma=0.5)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.discriminator = self.opt_d = self.sched_d = None
        self.perceptual = self.gan_loss = None
        if cfg.stage == "gan":
            from .discriminator import UNetDiscriminatorSN
            from .losses import GANLoss, PerceptualLoss

            self.discriminator = UNetDiscriminatorSN().to(self.device)
            self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.get("lr"), betas=cfg.betas)
            self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, step_size=cfg.get("halve_every"), gamma=0.5)
            self.perceptual = PerceptualLoss(weights_path=cfg.vgg_weights, random_weights=cfg.random_vgg,
                                             perceptual_weight=cfg.perceptual_weight,
                                             generator=cfg.seed if cfg.random_vgg else None).to(self.device)
            self.gan_loss = GANLoss(loss_weight=cfg.gan_weight)
        self.flip_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.iteration = 0
        #: the in-process engine's config (training source without servers, and the validation set)
        self.engine_cfg = DegradationConfig.load(cfg.degradation_config)
        self.source = source if source is not None else self._source()
        self._sharpener = None  # made on first use: the sharpened HR on this device (client.wire.Sharpener)
        prepare = getattr(self.source, "prepare", None)
        if prepare is not None:  # the servers' config now, and in wire lr the local dataset copy checked
            try:
                prepare()
            except BaseException:
                self.close()
                raise
        self.stream = TrainingStream(self.source, seed=cfg.seed, batch_size=cfg.get("batch_size"),
                                     pool_size=cfg.pool_size)
        self.log_path = self.out / "log.jsonl"

    def _source(self):
        cfg = self.cfg
        if cfg.servers:
            from client import DegradeClient
            from client.wire import DESCRIPTIONS

            mode = cfg.wire_mode()
            where = "" if mode == "full" else f" (on {self.device})"
            log.info("data from %s, wire %s: %s%s", ", ".join(cfg.servers), mode, DESCRIPTIONS[mode], where)
            # sharpen_device=None: the client leaves the sharpened HR to the training step, on this device
            return DegradeClient(list(cfg.servers), token=cfg.token, tls=cfg.tls_ca, wire=mode, hr_root=cfg.hr_root,
                                 sharpen_device=None, unreachable_timeout=cfg.unreachable_timeout,
                                 shared_memory=cfg.shared_memory)
        from client.local import LocalSource

        engine_device = str(self.device) if cfg.engine_device == "auto" else cfg.engine_device
        source = LocalSource(cfg.images, cfg=self.engine_cfg, workers=cfg.engine_workers, device=engine_device,
                             pipeline=cfg.engine_pipeline, include_hr_usm=False)
        log.info("data from an in-process engine (%s pipeline on %s, %d worker process(es)): LR + HR, sharpened on %s",
                 source.producer.pipeline, engine_device, source.producer.workers, self.device)
        return source

    def sharpener(self):
        """The servers' USM on this device (their config; the in-process engine's without servers)."""
        if self._sharpener is None:
            from client.wire import Sharpener

            get = getattr(self.source, "degradation_config", None)
            self._sharpener = Sharpener(get() if get is not None else self.engine_cfg, self.device)
        return self._sharpener

    def tensors(self, lr8: np.ndarray, hr8: np.ndarray, usm8: np.ndarray | None):
        """The float training tensors of a batch on the device: LR, HR and the sharpened HR - the server's,
        or made here from HR when the wire mode left it out (the same values on the CPU)."""
        lr, hr = to_float(lr8, self.device), to_float(hr8, self.device)
        usm = to_float(usm8, self.device) if usm8 is not None else self.sharpener().targets(hr)
        return lr, hr, usm

    # ------------------------------------------------------------------
    def load_initial_weights(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "generator" in state:
            state = state["generator"]
        missing, unexpected = self.generator.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if not k.endswith(("relative_position_index", "attn_mask",
                                                                "relative_coords_table"))]
        if real_missing or unexpected:
            raise ValueError(f"{path} does not fit GRL-small: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        log.info("generator initialised from %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "grl-train/1", "config": json.loads(self.cfg.to_json()), "iteration": self.iteration,
            "generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict(),
            "sched_g": self.sched_g.state_dict(), "scaler": self.scaler.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "sched_d": self.sched_d.state_dict() if self.sched_d is not None else None,
            "rng": {"torch": torch.get_rng_state(), "flip": self.flip_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "data": self.stream.state_dict(),
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("format") != "grl-train/1":
            raise ValueError("not a grl-train checkpoint")
        if ckpt["config"]["stage"] != self.cfg.stage:
            raise ValueError(f"the checkpoint is stage {ckpt['config']['stage']!r}, this run {self.cfg.stage!r}")
        self.generator.load_state_dict(ckpt["generator"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.sched_g.load_state_dict(ckpt["sched_g"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(ckpt["discriminator"])
            self.opt_d.load_state_dict(ckpt["opt_d"])
            self.sched_d.load_state_dict(ckpt["sched_d"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.flip_gen.set_state(ckpt["rng"]["flip"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.stream.load_state_dict(ckpt["data"])
        self.iteration = int(ckpt["iteration"])

    def save_checkpoint(self) -> Path:
        folder = self.out / "checkpoints"
        path = folder / f"iter_{self.iteration:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a kill mid-save never leaves a torn checkpoint
        latest = folder / "latest.pt"
        tmp_latest = folder / "latest.tmp"
        if tmp_latest.exists():
            tmp_latest.unlink()
        os.link(path, tmp_latest)
        os.replace(tmp_latest, latest)
        return path

    # ------------------------------------------------------------------
    def step(self, lr8: np.ndarray, hr8: np.ndarray, usm8: np.ndarray | None) -> dict[str, torch.Tensor]:
        """One training iteration.  Returns the losses as detached 0-d tensors on the
        device: reading them (``float``) would wait for the GPU, so :meth:`run`
        reads them all at once every ``log_every`` iterations."""
        cfg = self.cfg
        lr, hr, usm = self.tensors(lr8, hr8, usm8)  # sharpened before any crop, like the server
        if cfg.lr_crop:
            lr, hr, usm = random_crop(self.flip_gen, cfg.lr_crop, self.scale, lr, hr, usm)
        lr, hr, usm = augment(self.flip_gen, lr, hr, usm)
        autocast = torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)
        losses: dict[str, torch.Tensor] = {}
        self.generator.train()
        if self.discriminator is not None:
            for p in self.discriminator.parameters():
                p.requires_grad_(False)
        with autocast:
            sr = self.forward_train(lr)
            l1 = F.l1_loss(sr.float(), usm)
            total = cfg.l1_weight * l1
            losses["l1"] = l1.detach()
            if self.discriminator is not None:
                percep = self.perceptual(sr.float(), usm)  # weighted inside (perceptual_weight)
                g_gan = self.gan_loss(self.discriminator(sr), True)  # weighted inside (gan_weight)
                total = total + percep + g_gan
                losses["perceptual"], losses["g_gan"] = percep.detach(), g_gan.detach()
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt_g)
        losses["g_total"] = total.detach()
        if self.discriminator is not None:
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
            with autocast:
                d_real = self.gan_loss(self.discriminator(hr), True, is_disc=True)
                d_fake = self.gan_loss(self.discriminator(sr.detach().float()), False, is_disc=True)
                d_total = d_real + d_fake
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler.scale(d_total).backward()
            self.scaler.step(self.opt_d)
            self.sched_d.step()
            losses["d_real"], losses["d_fake"] = d_real.detach(), d_fake.detach()
        self.scaler.update()
        self.sched_g.step()
        return losses

    # ------------------------------------------------------------------
    def validation_set(self) -> tuple[np.ndarray, np.ndarray]:
        """A fixed set: ``val_pairs`` pairs of the training photographs (default: the sample set),
        degraded with seed 2**31-1 - never a training seed's batch."""
        from client.local import LocalSource

        n = self.cfg.val_pairs
        src = LocalSource(self.cfg.images, cfg=self.engine_cfg.replace(video_batch_size=n, first_batch_range=(n, n)),
                          workers=0, include_hr_usm=False)
        try:
            vb = next(iter(src.epoch(2**31 - 1, 0, indices=[0])))
        finally:
            src.close()
        return vb.lr, vb.hr

    @torch.no_grad()
    def validate(self, val: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        self.generator.eval()
        lr, hr = to_float(val[0], self.device), to_float(val[1], self.device)
        sr = self.generator(lr).float().clamp(0, 1)
        self.generator.train()
        self._last_val = (lr, sr, hr)
        return {"psnr": float(psnr(sr, hr, crop=self.scale).mean()), "ssim": float(ssim(sr, hr, crop=self.scale).mean())}

    def write_preview(self) -> Path:
        from PIL import Image

        lr, sr, hr = self._last_val
        rows = []
        for i in range(min(4, lr.shape[0])):
            up = F.interpolate(lr[i:i + 1], scale_factor=self.scale, mode="nearest")
            row = torch.cat([up[0], sr[i], hr[i]], dim=-1)  # LR | SR | HR
            rows.append(row)
        grid = torch.cat(rows, dim=-2).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = self.out / "previews" / f"iter_{self.iteration:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path

    # ------------------------------------------------------------------
    @staticmethod
    def _read_losses(pending: list[dict[str, Any]]) -> list[str]:
        """Replace the device tensors in ``pending`` log entries by floats, in place, with one
        transfer (one wait for the device) for all of them; returns the keys replaced."""
        slots = [(e, k) for e in pending for k, v in e.items() if isinstance(v, torch.Tensor)]
        if slots:
            values = torch.stack([e[k].float() for e, k in slots]).tolist()
            for (e, k), v in zip(slots, values):
                e[k] = v
        return list(dict.fromkeys(k for _, k in slots))

    def run(self) -> dict[str, float]:
        """Train to ``iterations``.  ``log.jsonl`` gets one entry per iteration, written every
        ``log_every`` iterations and at each validation, preview and checkpoint: until then the
        losses stay on the device, so the host never waits for the GPU step by step.  ``step_s``
        is the host's time for the step (on CUDA the GPU may still be working on it); the waits
        at the flushes count in the data-wait fraction's denominator."""
        from tqdm import tqdm

        cfg = self.cfg
        total_iters = cfg.get("iterations")
        val = self.validation_set()
        if self.iteration == 0:  # the starting point of the validation curve
            with open(self.log_path, "a") as logf:
                logf.write(json.dumps({"iteration": 0, **{f"val_{k}": v for k, v in self.validate(val).items()}})
                           + "\n")
        data_wait = step_time = 0.0
        last: dict[str, float] = {}
        pending: list[dict[str, Any]] = []  # log entries whose losses are still device tensors
        postfix: dict[str, str] = {"loss": "-"}  # loss: the mean since the last flush
        batches = iter(self.stream)

        def flush(logf) -> None:
            nonlocal last
            keys = self._read_losses(pending)
            for e in pending:
                logf.write(json.dumps(e) + "\n")
            logf.flush()
            last = {k: pending[-1][k] for k in keys}
            postfix["loss"] = f"{sum(e['g_total'] for e in pending) / len(pending):.4f}"  # the interval's mean
            pending.clear()

        with tqdm(total=total_iters, initial=self.iteration, unit="it", dynamic_ncols=True, disable=None) as bar, \
                open(self.log_path, "a") as logf:
            try:
                while self.iteration < total_iters:
                    t0 = time.perf_counter()
                    tb = next(batches)
                    t1 = time.perf_counter()
                    losses = self.step(tb.lr, tb.hr, tb.hr_usm)
                    t2 = time.perf_counter()
                    data_wait += t1 - t0
                    step_time += t2 - t0
                    self.iteration += 1
                    it = self.iteration
                    entry = {"iteration": it, **losses, "data_wait_s": t1 - t0, "step_s": t2 - t0,
                             "lr": self.opt_g.param_groups[0]["lr"]}
                    pending.append(entry)
                    checkpoint = it % cfg.checkpoint_every == 0 or it == total_iters
                    if it % cfg.val_every == 0 or it == total_iters:
                        entry.update({f"val_{k}": v for k, v in self.validate(val).items()})
                        if it % cfg.preview_every == 0 or it == total_iters:
                            entry["preview"] = str(self.write_preview())
                    elif it % cfg.preview_every == 0:
                        self.validate(val)
                        entry["preview"] = str(self.write_preview())
                    if it % cfg.log_every == 0 or checkpoint or "preview" in entry or "val_psnr" in entry:
                        t3 = time.perf_counter()
                        flush(logf)
                        step_time += time.perf_counter() - t3
                    bar.update(1)
                    postfix["data"] = f"{100 * data_wait / max(step_time, 1e-9):.1f}%"
                    if "val_psnr" in entry:
                        postfix["psnr"] = f"{entry['val_psnr']:.2f}"
                    bar.set_postfix(postfix)
                    if checkpoint:
                        self.save_checkpoint()
            finally:
                if pending:  # stopped between flushes (interrupted): keep the log of what was trained
                    try:
                        flush(logf)
                    except Exception as exc:  # noqa: BLE001 - the device may be what failed
                        log.warning("could not write the last %d log entries: %s", len(pending), exc)
        summary = {"iterations": self.iteration, "data_wait_fraction": data_wait / max(step_time, 1e-9), **last}
        log.info("done: %s", summary)
        return summary

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close:
            close()


# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grl-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGE_DEFAULTS), default="l1", help="l1 (default) or gan")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/, previews/, log.jsonl")
    p.add_argument("--server", action="append", default=[],
                   help="degrade-server address (repeat for several; default: an in-process engine)")
    p.add_argument("--wire", choices=("full", "lr-hr", "lr"), default=None,
                   help="what the servers send: lr-hr = LR + HR, sharpened on this device; lr = LR + records, HR cut "
                        "from --hr-root and sharpened here; full = LR + HR + sharpened HR. Default: the leanest the "
                        "flags allow (lr with --hr-root, else lr-hr)")
    p.add_argument("--hr-root", type=Path, default=None,
                   help="this machine's copy of the servers' image folder (same names and bytes, checked against "
                        "their dataset fingerprint before the first batch): HR patches are cut here")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="take every tensor over the socket. By default a server on this host that offers it hands "
                        "each batch over as a shared-memory slot (/dev/shm) once this process proves it can read it: "
                        "~1 kB per pair over the socket, the same arrays")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="bearer token of the servers (default: $DEGRADE_TOKEN)")
    tok.add_argument("--token-file", type=Path, default=None, help="read the token from a file")
    p.add_argument("--tls-ca", type=Path, default=None, help="servers use TLS: trust this CA certificate")
    p.add_argument("--unreachable-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop the run only after this many seconds in which no server could be reached at all "
                        "(default %(default)g: covers a server restart); slow servers are waited for")
    p.add_argument("--images", type=Path, default=None, help="in-process engine: HR image folder (default: sample)")
    p.add_argument("--degradation-config", type=Path, default=None, help="in-process engine: TOML/YAML config")
    p.add_argument("--engine-workers", type=int, default=None, help="in-process engine: worker processes")
    p.add_argument("--engine-device", default="auto",
                   help="in-process engine: torch device (default: the training device)")
    p.add_argument("--engine-pipeline", choices=("auto", "split", "batch"), default="auto",
                   help="in-process engine: auto (default; split on a GPU, batch on the CPU), split, batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="total iterations (l1 700k, gan 280k)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 12 (l1), 6 (gan)")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 (l1), 1e-4 (gan)")
    p.add_argument("--halve-every", type=int, default=None, help="halve the lr every N its (50k l1, 20k gan)")
    p.add_argument("--pool-size", type=int, default=180, help="shuffle pool of pairs (default %(default)s)")
    p.add_argument("--lr-crop", type=int, default=None, help="train on random LR crops of this size")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (default auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--init", type=Path, default=None, help="generator weights to start from (gan: the L1 run)")
    p.add_argument("--vgg-weights", type=Path, default=None,
                   help="VGG-19 weights (torchvision's vgg19-dcbb9e9d.pth) for the gan stage; "
                        "default: $DEGRADE_VGG19_WEIGHTS")
    p.add_argument("--random-vgg", action="store_true", help=argparse.SUPPRESS)  # tests only
    p.add_argument("--model-config", default="{}", help="JSON of GRL config overrides (tests: a tiny GRL)")
    p.add_argument("--checkpoint-every", type=int, default=5000)
    p.add_argument("--log-every", type=int, default=100,
                   help="read the losses from the device and write log.jsonl every N iterations (default 100)")
    p.add_argument("--preview-every", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=5000)
    p.add_argument("--val-pairs", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.pt")
    p.add_argument("--compile", nargs="?", const="default", default="off",
                   choices=("off", "default", "reduce-overhead", "max-autotune", "eager"),
                   help="torch.compile the generator (worth it on CUDA, where eager steps are launch-bound); "
                        "--compile reduce-overhead adds CUDA graphs")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from client.connection import resolve_token

    token = resolve_token(args.token, args.token_file)
    vgg = args.vgg_weights or (Path(os.environ["DEGRADE_VGG19_WEIGHTS"]) if os.environ.get("DEGRADE_VGG19_WEIGHTS")
                               else None)
    return TrainConfig(
        stage=args.stage, out=args.out, servers=tuple(args.server), wire=args.wire, hr_root=args.hr_root,
        shared_memory=not args.no_shared_memory, token=token, tls_ca=args.tls_ca, unreachable_timeout=args.unreachable_timeout,
        images=args.images, degradation_config=args.degradation_config, engine_workers=args.engine_workers,
        engine_device=args.engine_device, engine_pipeline=args.engine_pipeline,
        seed=args.seed, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        halve_every=args.halve_every, pool_size=args.pool_size, lr_crop=args.lr_crop, device=args.device,
        amp=args.amp, init=args.init, vgg_weights=vgg, random_vgg=args.random_vgg,
        model_overrides=json.loads(args.model_config), checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        preview_every=args.preview_every, val_every=args.val_every, val_pairs=args.val_pairs, resume=args.resume,
        compile=args.compile,
    )


def main(argv: list[str] | None = None) -> int:
    from client import DegradeError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = config_from_args(args)
        log.info("grl-train config: %s", cfg.to_json())
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"grl-train: error: {exc}", file=sys.stderr)
        return 2
    except DegradeError as exc:  # no server, wrong token, a local dataset copy that differs from the servers'
        print(f"grl-train: error: {exc}", file=sys.stderr)
        return 1
    try:
        latest = Path(cfg.out) / "checkpoints" / "latest.pt"
        if cfg.resume:
            if not latest.exists():
                print(f"grl-train: error: --resume but no checkpoint at {latest}", file=sys.stderr)
                return 2
            trainer.load_state(torch.load(latest, map_location="cpu", weights_only=False))
            log.info("resumed from %s at iteration %d", latest, trainer.iteration)
        elif cfg.init is not None:
            trainer.load_initial_weights(cfg.init)
        elif cfg.stage == "gan":
            log.warning("gan stage without --init: the generator starts from random weights")
        trainer.run()
    except KeyboardInterrupt:
        print(f"grl-train: interrupted at iteration {trainer.iteration}; --resume continues from the last "
              "checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a clear one-line error for data/feed problems
        if isinstance(exc, (DegradeError, ValueError, FileNotFoundError)):
            print(f"grl-train: error: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
