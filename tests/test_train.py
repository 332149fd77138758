"""grl-train on CPU: the loss falls, kill-and-resume is exact, the GAN stage runs, errors are clear."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from model.train import TrainConfig, Trainer, main

TINY = {"embed_dim": 16, "depths": [1, 1], "num_heads_window": [1, 1], "num_heads_stripe": [1, 1]}


class CachedSource:
    """Real degraded pairs (a LocalSource on real photographs), each video batch made once and
    replayed for later epochs with its records relabelled - the engine's cost paid once per test."""

    def __init__(self, local):
        self.local = local
        self.cache: dict[int, object] = {}

    def num_batches(self, seed, epoch):
        return self.local.num_batches(seed, 0)

    def epoch(self, seed, epoch, *, indices=None, shard=(0, 1), ordered=True):
        indices = list(range(self.num_batches(seed, epoch)) if indices is None else indices)
        missing = [k for k in indices if k not in self.cache]
        for vb in self.local.epoch(seed, 0, indices=missing):
            self.cache[vb.index] = vb
        for k in indices:
            vb = copy.copy(self.cache[k])
            vb.epoch = epoch
            vb.records = [dict(r, epoch=epoch) for r in vb.records]
            yield vb

    def close(self):
        self.local.close()


@pytest.fixture(scope="module")
def cached_source(photo_dir, service_cfg_file):
    from client.local import LocalSource
    from server.degradation.config import DegradationConfig

    src = CachedSource(LocalSource(photo_dir, cfg=DegradationConfig.from_file(service_cfg_file), workers=0))
    yield src
    src.close()


def _cfg(tmp_path, photo_dir, service_cfg_file, **kw) -> TrainConfig:
    base = dict(out=tmp_path / "run", images=photo_dir, degradation_config=service_cfg_file, engine_workers=0,
                iterations=6, batch_size=2, pool_size=4, lr_crop=16, model_overrides=TINY, checkpoint_every=3,
                val_every=3, preview_every=3, val_pairs=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_l1_training_loss_falls(tmp_path, photo_dir, service_cfg_file, cached_source):
    cfg = _cfg(tmp_path, photo_dir, service_cfg_file, iterations=40, lr=2e-3, batch_size=4, val_every=40,
               preview_every=40, checkpoint_every=40)
    trainer = Trainer(cfg, source=cached_source)
    summary = trainer.run()
    log = _log(cfg.out / "log.jsonl")
    losses = [e["l1"] for e in log if "l1" in e]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    assert log[0]["iteration"] == 0 and log[-1]["val_psnr"] > log[0]["val_psnr"] + 1.0  # the fixed set improves
    assert (cfg.out / "previews" / "iter_0000040.png").exists() and summary["iterations"] == 40


def test_stop_and_resume_gives_the_identical_next_steps(tmp_path, photo_dir, service_cfg_file, cached_source):
    full = _cfg(tmp_path / "a", photo_dir, service_cfg_file, iterations=6)
    Trainer(full, source=cached_source).run()
    # the same run stopped after the checkpoint at iteration 3, then resumed in a new process-like Trainer
    part = _cfg(tmp_path / "b", photo_dir, service_cfg_file, iterations=3)
    Trainer(part, source=cached_source).run()
    resumed = Trainer(_cfg(tmp_path / "b", photo_dir, service_cfg_file, iterations=6), source=cached_source)
    resumed.load_state(torch.load(part.out / "checkpoints" / "latest.pt", weights_only=False))
    assert resumed.iteration == 3
    resumed.run()
    a = {e["iteration"]: e for e in _log(full.out / "log.jsonl") if "l1" in e}
    b = {e["iteration"]: e for e in _log(part.out / "log.jsonl") if "l1" in e}
    for it in (4, 5, 6):
        assert a[it]["l1"] == b[it]["l1"], (it, a[it]["l1"], b[it]["l1"])
    ca = torch.load(full.out / "checkpoints" / "latest.pt", weights_only=False)
    cb = torch.load(part.out / "checkpoints" / "latest.pt", weights_only=False)
    for k, v in ca["generator"].items():
        assert torch.equal(v, cb["generator"][k]), k
    assert ca["data"] == cb["data"]


def test_checkpoint_holds_everything(tmp_path, photo_dir, service_cfg_file, cached_source):
    cfg = _cfg(tmp_path, photo_dir, service_cfg_file, iterations=3)
    Trainer(cfg, source=cached_source).run()
    ckpt = torch.load(cfg.out / "checkpoints" / "latest.pt", weights_only=False)
    assert {"generator", "opt_g", "sched_g", "scaler", "discriminator", "opt_d", "sched_d", "rng", "data",
            "iteration", "config"} <= set(ckpt)
    assert ckpt["iteration"] == 3 and ckpt["opt_g"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert ckpt["data"]["buffer"]["residents"]  # pair identities, no pixels
    assert (cfg.out / "checkpoints" / "iter_0000003.pt").exists()


def test_gan_stage_runs_from_an_l1_checkpoint_with_random_vgg(tmp_path, photo_dir, service_cfg_file, cached_source):
    l1 = _cfg(tmp_path / "l1", photo_dir, service_cfg_file, iterations=2)
    Trainer(l1, source=cached_source).run()
    gan = _cfg(tmp_path / "gan", photo_dir, service_cfg_file, stage="gan", iterations=3, random_vgg=True,
               init=l1.out / "checkpoints" / "latest.pt")
    trainer = Trainer(gan, source=cached_source)
    trainer.load_initial_weights(gan.init)
    trainer.run()
    steps = [e for e in _log(gan.out / "log.jsonl") if "l1" in e]
    assert len(steps) == 3
    for e in steps:
        for key in ("l1", "perceptual", "g_gan", "d_real", "d_fake"):
            assert np.isfinite(e[key]) and e[key] >= 0
        assert e["g_total"] == pytest.approx(e["l1"] + e["perceptual"] + e["g_gan"], rel=1e-5)
    ckpt = torch.load(gan.out / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["discriminator"] is not None and ckpt["opt_d"] is not None


def test_missing_vgg_weights_is_a_clear_error(tmp_path, capsys):
    rc = main(["--stage", "gan", "--out", str(tmp_path / "g"), "--vgg-weights", str(tmp_path / "nope.pth"),
               "--device", "cpu", "--model-config", json.dumps(TINY)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pth" in err and "vgg19-dcbb9e9d.pth" in err


def test_resume_without_checkpoint_and_bad_model_config(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r"), "--resume", "--device", "cpu",
                 "--model-config", json.dumps(TINY)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "r"), "--model-config", "{nope"]) == 2


def test_trains_from_a_degrade_server(tmp_path, make_server, photo_dir, service_cfg_file):
    _, address = make_server(token="t")
    (tmp_path / "tok").write_text("t")
    rc = main(["--out", str(tmp_path / "s"), "--server", address, "--token-file", str(tmp_path / "tok"),
               "--iterations", "2", "--batch-size", "2", "--pool-size", "2", "--lr-crop", "16",
               "--model-config", json.dumps(TINY), "--images", str(photo_dir), "--degradation-config",
               str(service_cfg_file), "--val-pairs", "2", "--device", "cpu", "--engine-workers", "0"])
    assert rc == 0
    steps = [e for e in _log(tmp_path / "s" / "log.jsonl") if "l1" in e]
    assert [e["iteration"] for e in steps] == [1, 2]
    shutil.rmtree(tmp_path / "s")


def test_compiled_generator_trains_and_checkpoints_plain_keys(tmp_path, photo_dir, service_cfg_file, cached_source):
    cfg = _cfg(tmp_path, photo_dir, service_cfg_file, iterations=2, compile="eager")
    Trainer(cfg, source=cached_source).run()
    ckpt = torch.load(cfg.out / "checkpoints" / "latest.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["generator"])  # loads into a plain GRL
    steps = [e for e in _log(cfg.out / "log.jsonl") if "l1" in e]
    assert len(steps) == 2 and all(np.isfinite(e["l1"]) for e in steps)


def _without_timings(log):
    return [{k: v for k, v in e.items() if k not in ("data_wait_s", "step_s", "preview")} for e in log]


def test_losses_read_every_few_steps_are_the_per_step_losses(tmp_path, photo_dir, service_cfg_file, cached_source):
    """Losses stay on the device between log flushes; the log is the one of a run that reads them every step."""
    logs = {}
    for every in (1, 4):
        cfg = _cfg(tmp_path / f"every{every}", photo_dir, service_cfg_file, stage="gan", random_vgg=True,
                   iterations=6, log_every=every, checkpoint_every=100, val_every=100, preview_every=100)
        Trainer(cfg, source=cached_source).run()  # log_every 4: flushed at 4 and at the end (6)
        logs[every] = _without_timings(_log(cfg.out / "log.jsonl"))
    assert [e["iteration"] for e in logs[4]] == [0, 1, 2, 3, 4, 5, 6]
    assert logs[4] == logs[1]
    assert all(isinstance(e[k], float) for e in logs[4][1:] for k in ("l1", "perceptual", "g_gan", "g_total",
                                                                       "d_real", "d_fake"))


def test_step_returns_device_tensors_and_an_interrupt_keeps_the_log(tmp_path, photo_dir, service_cfg_file,
                                                                   cached_source):
    cfg = _cfg(tmp_path, photo_dir, service_cfg_file, iterations=6, log_every=100)
    trainer = Trainer(cfg, source=cached_source)
    step, calls = trainer.step, []

    def step_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        losses = step(*args)
        assert {"l1", "g_total"} <= set(losses)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in losses.values())
        return losses

    trainer.step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    steps = [e for e in _log(cfg.out / "log.jsonl") if "l1" in e]
    assert [e["iteration"] for e in steps] == [1, 2]  # not yet due at 100: written on the way out
    with pytest.raises(ValueError, match="log_every"):
        _cfg(tmp_path, photo_dir, service_cfg_file, log_every=0)
