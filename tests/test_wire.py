"""Wire modes against a real server on port 0 and real photographs: full, lr-hr (USM made here),
lr (HR cut here from a checked local copy) give the same bytes and the same training tensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from client import DatasetMismatchError, DegradeClient
from client.protocol import degrade_pb2 as pb
from client.protocol import degrade_pb2_grpc as pbg
from client.wire import Sharpener
from server.degradation.config import DegradationConfig
from server.degradation.fingerprint import DigestCache, dataset_digests, fingerprint, hash_file
from server.degradation.images import ImageFolder

SEED = 9
TINY = {"embed_dim": 16, "depths": [1, 1], "num_heads_window": [1, 1], "num_heads_stripe": [1, 1]}


def _blake(path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()


@pytest.fixture()
def hr_copy(photo_dir, tmp_path):
    """The trainer's own copy of the server's image folder."""
    dest = tmp_path / "hr-copy"
    shutil.copytree(photo_dir, dest)
    return dest


def _flip_byte(path, offset=None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# --- the fingerprint ---------------------------------------------------------
def test_digests_hash_the_bytes_and_the_cache_notices_changes(hr_copy, tmp_path):
    for path in hr_copy.iterdir():
        os.utime(path)  # modified just now (the copy keeps the originals' times)
    cfg = DegradationConfig()
    images = ImageFolder(hr_copy, cfg.patch_size).images
    cache_file = tmp_path / "hashes.json"
    files = dataset_digests(hr_copy, images, cache_path=cache_file)
    assert [f.name for f in files] == sorted(p.name for p in hr_copy.iterdir())
    for f in files:
        path = hr_copy / f.name
        assert f.size == path.stat().st_size and f.blake2b == _blake(path)
        assert (f.width, f.height) == next((i.width, i.height) for i in images if i.name == f.name)
    # fresh files are not cached (a same-size write within one timestamp tick could go unnoticed) ...
    assert not cache_file.exists() or json.loads(cache_file.read_text())["files"] == {}
    # ... older ones are, per (path, size, mtime)
    rocket = hr_copy / "rocket.png"
    old = time.time_ns() - 3600 * 10**9
    os.utime(rocket, ns=(old, old))
    cache = DigestCache(cache_file)
    digest = hash_file(rocket, cache)[1]
    cache.save()
    entry = json.loads(cache_file.read_text())["files"][str(rocket.resolve())]
    assert entry == [rocket.stat().st_size, old, digest]
    # a change of content (same size) with a new mtime is hashed again
    _flip_byte(rocket)
    os.utime(rocket, ns=(old + 10**9, old + 10**9))
    assert hash_file(rocket, DigestCache(cache_file))[1] == _blake(rocket) != digest
    assert fingerprint(files) != fingerprint(dataset_digests(hr_copy, images, cache_path=None))


def test_get_info_publishes_the_fingerprint_and_chunks_carry_it(make_server, photo_dir, service_cfg_file):
    _, address = make_server()
    stub = pbg.DegraderStub(grpc.insecure_channel(address))
    lean = stub.GetInfo(pb.InfoRequest(seed=SEED, epoch=0))
    info = stub.GetInfo(pb.InfoRequest(seed=SEED, epoch=0, include_dataset_files=True,
                                       config_overrides_json='{"usm_weight": 0.7}'))
    names = sorted(p.name for p in photo_dir.iterdir())
    assert len(lean.dataset_files) == 0 and lean.dataset_fingerprint == info.dataset_fingerprint != ""
    assert [f.name for f in info.dataset_files] == names
    for f in info.dataset_files:
        assert f.size == (photo_dir / f.name).stat().st_size and f.blake2b == _blake(photo_dir / f.name)
    assert {f.name: (f.width, f.height) for f in info.dataset_files}["z_wide.jpg"] == (760, 400)
    # the resolved config: the server's file plus the request's overrides
    resolved = json.loads(info.config_json)
    assert resolved["usm_weight"] == 0.7 and resolved["video_batch_size"] == 2
    assert json.loads(lean.config_json) == json.loads(DegradationConfig.from_file(service_cfg_file).to_json())
    chunks = list(stub.StreamBatches(pb.BatchRequest(seed=SEED, epoch=0, index_list=pb.IndexList(indices=[0, 1]))))
    assert chunks and all(c.dataset_fingerprint == info.dataset_fingerprint for c in chunks)
    # LR + records only: no HR tensors on the wire
    assert all(not c.HasField("hr") and not c.HasField("hr_usm") and len(c.records_json) == c.lr.shape[0]
               for c in chunks)


# --- the client library ------------------------------------------------------
def test_client_wire_modes_deliver_the_servers_bytes(make_server, hr_copy):
    _, address = make_server()
    got, per_pair = {}, {}
    for mode in ("full", "lr-hr", "lr"):
        # the bytes over the socket (a same-host client would take the tensors from shared memory)
        with DegradeClient(address, wire=mode, hr_root=hr_copy if mode == "lr" else None,
                           shared_memory=False) as client:
            got[mode] = list(client.epoch(SEED, 1, ordered=True))
            per_pair[mode] = client.stats.bytes / client.stats.pairs
    for mode in ("lr-hr", "lr"):
        assert [b.index for b in got[mode]] == [b.index for b in got["full"]]
        for a, b in zip(got["full"], got[mode]):
            assert a.patch_ids == b.patch_ids and a.records == b.records
            assert np.array_equal(a.lr, b.lr) and np.array_equal(a.hr, b.hr)
            assert b.hr_usm.dtype == np.uint8 and np.array_equal(a.hr_usm, b.hr_usm)  # byte-identical USM
    # bytes received per pair: 2 x 389 kB + 24 kB + records; 389 + 24 kB + records; 24 kB + records
    hr, lr = 360 * 360 * 3, 90 * 90 * 3
    assert 2 * hr + lr < per_pair["full"] < 2 * hr + lr + 4000
    assert hr + lr < per_pair["lr-hr"] < hr + lr + 4000
    assert lr < per_pair["lr"] < lr + 4000


def test_sharpening_here_is_the_engines_usm_on_the_cpu(photo_patches):
    cfg = DegradationConfig()
    sharp = Sharpener(cfg, "cpu")
    from server.degradation.engine import to_uint8_nhwc
    from server.degradation.filters import usm_sharpen

    hr = torch.from_numpy(photo_patches).permute(0, 3, 1, 2).float().div_(255.0)
    expected = to_uint8_nhwc(usm_sharpen(hr, weight=cfg.usm_weight, threshold=cfg.usm_threshold,
                                         radius=cfg.usm_radius))
    assert np.array_equal(sharp.uint8(photo_patches), expected)
    assert not np.array_equal(expected, photo_patches)
    # the training target made on the device equals the server's bytes / 255, in any batch composition
    order = torch.randperm(len(photo_patches), generator=torch.Generator().manual_seed(3))[:5]
    target = sharp.targets(hr[order])
    assert torch.equal(target, torch.from_numpy(expected[order.numpy()]).permute(0, 3, 1, 2).float().div_(255.0))


@pytest.mark.gpu
def test_sharpening_on_cuda_is_within_one_level(photo_patches):
    cfg = DegradationConfig()
    cpu = Sharpener(cfg, "cpu").uint8(photo_patches)
    cuda = Sharpener(cfg, "cuda").uint8(photo_patches)
    assert np.abs(cpu.astype(int) - cuda.astype(int)).max() <= 1
    hr = torch.from_numpy(photo_patches).cuda().permute(0, 3, 1, 2).float().div_(255.0)
    target = Sharpener(cfg, "cuda").targets(hr).cpu()
    ref = torch.from_numpy(cpu).permute(0, 3, 1, 2).float().div_(255.0)
    assert (target - ref).abs().max().item() <= 1 / 255 + 1e-7


def test_a_changed_local_image_is_a_clear_error(make_server, hr_copy, capsys):
    _, address = make_server()
    _flip_byte(hr_copy / "rocket.png")
    with DegradeClient(address, wire="lr", hr_root=hr_copy) as client:
        with pytest.raises(DatasetMismatchError, match=r"rocket\.png: different content") as exc:
            next(iter(client.epoch(SEED, 0)))
        assert exc.value.files == ["rocket.png"] and client.stats.pairs == 0  # before the first batch
    (hr_copy / "coffee.png").unlink()
    from client.cli import main

    assert main(["--server", address, "--wire", "lr", "--hr-root", str(hr_copy), "--pairs", "2"]) == 1
    err = capsys.readouterr().err
    assert "coffee.png: missing" in err and "rocket.png: different content" in err and "Traceback" not in err


def test_a_batch_from_another_dataset_is_refused(photo_dir):
    from client.client import VideoBatch
    from client.wire import LocalHR
    from server.degradation.fingerprint import FileDigest

    files = [FileDigest("rocket.png", 1, "00", 640, 427)]
    local = LocalHR(photo_dir, files, 360, "a" * 64)
    rec = {"image": "rocket.png", "x": 0, "y": 0}
    vb = VideoBatch(0, 0, 3, np.zeros((1, 90, 90, 3), np.uint8), None, None, [rec], ["id"], "b:1", "b" * 64)
    with pytest.raises(DatasetMismatchError, match="b:1 serves a different dataset"):
        local.crop(vb)
    vb.dataset_fingerprint = "a" * 64
    rocket = np.asarray(Image.open(photo_dir / "rocket.png").convert("RGB"))
    assert np.array_equal(local.crop(vb)[0], rocket[:360, :360])
    vb.records = [{"image": "coffee.png", "x": 0, "y": 0}]
    with pytest.raises(DatasetMismatchError, match="coffee.png"):
        local.crop(vb)


def test_degrade_client_wire_modes(make_server, hr_copy, tmp_path, capsys):
    from client.cli import main

    _, address = make_server()
    figures = {}
    for mode in ("full", "lr-hr", "lr"):
        out = tmp_path / f"{mode}.json"
        extra = ["--hr-root", str(hr_copy)] if mode == "lr" else []
        assert main(["--server", address, "--wire", mode, *extra, "--pairs", "3", "--device", "cpu",
                     "--json", str(out), "--no-shared-memory"]) == 0  # the bytes over the socket
        figures[mode] = json.loads(out.read_text())
        printed = capsys.readouterr().out
        assert f"wire {mode}" in printed and "bytes" in printed and "per pair" in printed
    for mode, f in figures.items():
        assert f["wire"] == mode and f["pairs"] >= 3 and f["pairs_per_s"] > 0 and f["seconds"] > 0
        assert f["bytes_per_pair"] == pytest.approx(f["bytes_received"] / f["pairs"])
    assert figures["full"]["bytes_per_pair"] > 1.8 * figures["lr-hr"]["bytes_per_pair"]
    assert figures["lr-hr"]["bytes_per_pair"] > 15 * figures["lr"]["bytes_per_pair"]
    assert figures["lr-hr"]["sharpen_device"] == "cpu" and figures["full"]["sharpen_device"] is None
    assert all(f["shared_batches"] == 0 and f["shared_memory"] is False for f in figures.values())
    # the default on the server's own host: the tensors come from its shared memory, records over the socket
    out = tmp_path / "same-host.json"
    assert main(["--server", address, "--pairs", "3", "--json", str(out)]) == 0
    assert "from the server's shared memory" in capsys.readouterr().out
    same = json.loads(out.read_text())
    assert same["shared_memory"] and same["shared_batches"] == same["batches"] >= 1
    assert same["bytes_per_pair"] < 2048
    # bad input: a clear message, exit status 2
    assert main(["--server", address, "--wire", "lr", "--pairs", "2"]) == 2
    assert "--hr-root" in capsys.readouterr().err
    assert main(["--server", address, "--wire", "lr-hr", "--hr-root", str(hr_copy)]) == 2
    assert "only used with wire mode 'lr'" in capsys.readouterr().err


# --- the trainer ---------------------------------------------------------------
def _trainer(tmp_path, address, **kw):
    from model.train import TrainConfig, Trainer

    cfg = TrainConfig(out=tmp_path / f"run-{kw.get('wire')}-{kw.get('hr_root') is not None}", servers=(address,),
                      batch_size=3, pool_size=5, model_overrides=TINY, device="cpu", seed=SEED, **kw)
    return Trainer(cfg)


def test_three_wire_modes_give_the_same_training_tensors(make_server, hr_copy, tmp_path, caplog):
    _, address = make_server()
    caplog.set_level(logging.INFO, logger="grl.train")
    trainers = {
        "full": _trainer(tmp_path, address, wire="full"),
        "lr-hr": _trainer(tmp_path, address),                 # default without --hr-root
        "lr": _trainer(tmp_path, address, hr_root=hr_copy),   # default with --hr-root
    }
    try:
        logged = caplog.text
        assert "wire full:" in logged and "wire lr-hr:" in logged and "wire lr:" in logged
        assert trainers["lr"].source.wire == "lr" and trainers["lr-hr"].source.wire == "lr-hr"
        streams = {mode: iter(t.stream) for mode, t in trainers.items()}
        for _ in range(6):  # 18 pairs: past two epoch boundaries (7 patches per epoch)
            tbs = {mode: next(s) for mode, s in streams.items()}
            ids = {mode: [r["patch_id"] for r in tb.records] for mode, tb in tbs.items()}
            assert ids["full"] == ids["lr-hr"] == ids["lr"]
            assert tbs["full"].hr_usm is not None and tbs["lr-hr"].hr_usm is None and tbs["lr"].hr_usm is None
            tensors = {mode: trainers[mode].tensors(tb.lr, tb.hr, tb.hr_usm) for mode, tb in tbs.items()}
            for mode in ("lr-hr", "lr"):
                for a, b in zip(tensors["full"], tensors[mode]):  # LR, HR, sharpened HR
                    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
            assert not torch.equal(tensors["full"][1], tensors["full"][2])  # the target is sharpened
        # on the server's host the trainers took the tensors from its shared memory (their default): only
        # ids and records crossed the socket (test_client_wire_modes_deliver_the_servers_bytes has the
        # bytes of each mode over a socket)
        for t in trainers.values():
            assert t.source.shared_memory and t.source.stats.shared_batches == t.source.stats.batches > 0
            assert t.source.stats.bytes / t.source.stats.pairs < 2048
    finally:
        for t in trainers.values():
            t.close()


def test_grl_train_wire_errors_are_clear(make_server, hr_copy, tmp_path, capsys):
    from model.train import main

    _, address = make_server()
    base = ["--server", address, "--iterations", "1", "--model-config", json.dumps(TINY), "--device", "cpu"]
    assert main(["--out", str(tmp_path / "a"), *base, "--wire", "lr"]) == 2
    assert "--hr-root" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "b"), "--hr-root", str(hr_copy), "--iterations", "1"]) == 2  # no --server
    assert "--server" in capsys.readouterr().err
    _flip_byte(hr_copy / "astronaut.png", offset=-10)
    assert main(["--out", str(tmp_path / "c"), *base, "--hr-root", str(hr_copy)]) == 1
    err = capsys.readouterr().err
    assert "astronaut.png: different content" in err and "Traceback" not in err


def test_wire_benchmark_skips_cleanly_without_iproute2(monkeypatch, photo_dir, capsys):
    import benchmarks.wire as bench

    assert bench._rate_bits("10gbit") == 1e10 and bench._rate_bits("20mbit") == 2e7
    with pytest.raises(ValueError, match="1gbit"):
        bench._rate_bits("fast")
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.main(["--rates", "1gbit", "--images", str(photo_dir)]) == 0
    assert "skipped: `ip` not found: apt-get install -y iproute2" in capsys.readouterr().out
    row = {"wire": "lr", "rate": "1gbit", "raw_tcp_bytes_per_s": 1.19e8, "pairs_per_s": 12.5, "mb_per_s": 0.3,
           "bytes_per_pair": 25200.0}
    text = bench.table({"runs": [row], "engine_full": 14.0, "engine_no_usm": 22.0})
    assert text.splitlines()[-1] == ("| 1gbit (TCP 119 MB/s) | lr: LR + records, HR + USM on the client | 12.5 | 0.3 "
                                     "| 25.2 | 22.0 |")
