"""The pixel store: the same pixels and batches as the folder, built once, and safe against damage,
a full disk, racing builders, changed folders and files that are not stores."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import threading
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.degradation import images as images_mod
from server.degradation import pixel_store
from server.degradation.fingerprint import DatasetMismatch, FileDigest, fingerprint, verify_copy
from server.degradation.images import ImageFolder, pack_folder
from server.degradation.pixel_store import PixelStore, StoreCache, StoreError
from server.pipeline import make_producer


@pytest.fixture()
def messy_photos(tmp_path, photo_dir):
    """photo_dir's photographs plus an EXIF-rotated JPEG, a 16-bit gray PNG, a palette PNG, a too-small
    image and a corrupt file, in a sub-folder too."""
    root = tmp_path / "photos"
    shutil.copytree(photo_dir, root)
    astro = np.asarray(Image.open(root / "astronaut.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(astro[:, :420]).save(root / "rotated.jpg", quality=92, exif=exif)
    gray16 = np.asarray(Image.fromarray(astro).convert("L"), dtype=np.uint16) * 257
    (root / "sub").mkdir()
    Image.fromarray(gray16).save(root / "sub" / "gray16.png")
    Image.fromarray(astro).convert("P").save(root / "sub" / "palette.png")
    Image.fromarray(astro[:100, :100]).save(root / "tiny.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decoded an image although its pixel store exists")

    monkeypatch.setattr(images_mod, "decode_rgb8", refuse)


def test_store_gives_the_folders_pixels_and_a_second_start_decodes_nothing(messy_photos, tmp_path, monkeypatch):
    plain = ImageFolder(messy_photos, 360)
    built = ImageFolder(messy_photos, 360, store_dir=tmp_path / "stores")
    assert built.store_path is not None and Path(built.store_path).parent == tmp_path / "stores"
    pixels = {info.name: plain.load(info.name) for info in plain.images}
    plain_files = plain.dataset_files()
    assert plain.load("rotated.jpg").shape == (420, 512, 3)  # EXIF rotation applied, in the store too
    _no_decoding(monkeypatch)
    again = ImageFolder(messy_photos, 360, store_dir=tmp_path / "stores")
    assert again.store_path == built.store_path
    for folder in (built, again):
        assert folder.images == plain.images
        assert folder.skipped == plain.skipped  # the same warnings, from the store's index
        for name, a in pixels.items():
            b = folder.load(name)
            assert b.dtype == np.uint8 and np.array_equal(a, b), name
    assert {s.name for s in plain.skipped} == {"tiny.png", "broken.png"}
    # the fingerprint a client checks is the folder's
    assert fingerprint(again.dataset_files()) == fingerprint(plain_files)
    assert again.dataset_files() == plain_files
    assert sorted(p.name for p in (tmp_path / "stores").iterdir() if not p.name.endswith(".lock")) == \
        [Path(built.store_path).name]  # no temporary file left


def test_pack_writes_a_store_usable_as_the_folder(messy_photos, tmp_path, monkeypatch):
    plain = ImageFolder(messy_photos, 360)
    pixels = {info.name: plain.load(info.name) for info in plain.images}
    plain_files = plain.dataset_files()
    store, skipped = pack_folder(messy_photos, tmp_path / "set.vcstore")
    assert [s.name for s in skipped] == ["broken.png"]  # undecodable; the small one is kept (any patch size)
    assert "tiny.png" in store.images
    _no_decoding(monkeypatch)
    packed = ImageFolder(tmp_path / "set.vcstore", 360)
    assert packed.images == plain.images and packed.dataset_name == "photos"
    assert packed.dataset_files() == plain_files
    for name, a in pixels.items():
        assert np.array_equal(packed.load(name), a)
    small = ImageFolder(tmp_path / "set.vcstore", 64)  # another patch size: the small image is usable there
    assert "tiny.png" in {i.name for i in small.images}
    # a trainer's --hr-root may be the store: checked against the server's fingerprint entries
    verify_copy(tmp_path / "set.vcstore", plain_files)
    wrong = [FileDigest(f.name, f.size, "0" * 64, f.width, f.height) for f in plain_files[:1]]
    with pytest.raises(DatasetMismatch, match="different content"):
        verify_copy(tmp_path / "set.vcstore", wrong)


def _batches(folder, cfg, pipeline: str) -> bytes:
    """One digest over the bytes and records of every batch of epochs 0 and 1."""
    h = hashlib.sha256()
    with make_producer(folder, cfg, pipeline=pipeline, workers=1) as producer:
        jobs = [(e, k) for e in (0, 1) for k in range(producer.plan(3, e).num_batches)]
        for r in producer.produce_jobs(3, jobs):
            for arr in (r.lr, r.hr, r.hr_usm):
                h.update(arr.tobytes())
            h.update(json.dumps(r.records, sort_keys=True).encode())
    return h.digest()


@pytest.mark.parametrize("pipeline", ["batch", "split"])
def test_batches_from_the_store_are_byte_identical(photo_dir, small_cfg, tmp_path, pipeline):
    """Worker processes open the store by path and crop from its map: the same bytes as decoding."""
    from_folder = ImageFolder(photo_dir, small_cfg.patch_size)
    from_store = ImageFolder(photo_dir, small_cfg.patch_size, store_dir=tmp_path / "stores")
    assert from_store.store_path is not None
    assert _batches(from_store, small_cfg, pipeline) == _batches(from_folder, small_cfg, pipeline)


def _corruptions():
    def truncate(p: Path):
        data = p.read_bytes()
        p.write_bytes(data[:len(data) - 1000])

    def magic(p: Path):
        with open(p, "r+b") as f:
            f.write(b"NOTSTORE")

    def version(p: Path):
        with open(p, "r+b") as f:
            f.seek(8)
            f.write(struct.pack("<I", 99))

    def index(p: Path):
        data = bytearray(p.read_bytes())
        data[-5] ^= 0xFF  # inside the JSON index at the end
        p.write_bytes(bytes(data))

    return {"truncated": (truncate, "truncated"), "magic": (magic, "not a pixel store"),
            "version": (version, "format version 99"), "index": (index, "index checksum")}


@pytest.mark.parametrize("damage", list(_corruptions()))
def test_a_damaged_store_is_refused_or_rebuilt_never_read(photo_dir, tmp_path, damage, caplog):
    hurt, message = _corruptions()[damage]
    packed = tmp_path / "set.vcstore"
    pack_folder(photo_dir, packed)
    hurt(packed)
    with pytest.raises(StoreError, match=message):  # an explicit store: refused with the reason
        ImageFolder(packed, 360)
    plain = ImageFolder(photo_dir, 360)
    first = ImageFolder(photo_dir, 360, store_dir=tmp_path / "stores")
    first.store.close()
    hurt(Path(first.store_path))
    with caplog.at_level(logging.WARNING):
        rebuilt = ImageFolder(photo_dir, 360, store_dir=tmp_path / "stores")  # a cached one: built again
    assert message in caplog.text and "built again" in caplog.text
    assert rebuilt.store_path == first.store_path
    for info in plain.images:
        assert np.array_equal(rebuilt.load(info.name), plain.load(info.name))


def test_a_file_that_is_not_a_store_has_a_clear_error(tmp_path, capsys):
    from server.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels")
    with pytest.raises(StoreError, match="not a pixel store"):
        ImageFolder(notes, 360)
    assert main(["preview", "--images", str(notes), "--out", str(tmp_path / "p.png"), "--n", "1"]) == 2
    assert "is not a pixel store" in capsys.readouterr().err
    with pytest.raises(DatasetMismatch, match="not a pixel store"):
        verify_copy(notes, [])


def test_full_disk_warns_once_and_the_scan_goes_on(photo_dir, tmp_path, monkeypatch, caplog):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    with caplog.at_level(logging.WARNING):
        folder = ImageFolder(photo_dir, 360, store_dir=tmp_path / "stores")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not enough free disk" in warnings[0].getMessage()
    assert folder.store is None and not list((tmp_path / "stores").glob("*.vcstore"))
    assert folder.images == ImageFolder(photo_dir, 360).images
    assert folder.load(folder.images[0].name).shape[2] == 3
    with pytest.raises(StoreError, match="not enough free disk"):
        pack_folder(photo_dir, tmp_path / "set.vcstore")


def test_a_write_failing_half_way_leaves_no_store(photo_dir, tmp_path, monkeypatch, caplog):
    calls = []
    real_add = pixel_store.StoreWriter.add

    def add(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_add(self, *a)

    monkeypatch.setattr(pixel_store.StoreWriter, "add", add)
    with caplog.at_level(logging.WARNING):
        folder = ImageFolder(photo_dir, 360, store_dir=tmp_path / "stores")
    assert folder.store is None and "No space left" in caplog.text
    assert not [p for p in (tmp_path / "stores").iterdir() if not p.name.endswith(".lock")]
    assert folder.images == ImageFolder(photo_dir, 360).images


def test_two_scans_racing_build_one_store(photo_dir, tmp_path):
    stores = tmp_path / "stores"
    got: list[ImageFolder] = []
    errors: list[BaseException] = []

    def scan():
        try:
            got.append(ImageFolder(photo_dir, 360, store_dir=stores))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=scan) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 2
    assert got[0].store_path == got[1].store_path is not None
    assert [p.suffix for p in stores.iterdir() if p.suffix != ".lock"] == [".vcstore"]
    for info in got[0].images:
        assert np.array_equal(got[0].load(info.name), got[1].load(info.name))


def test_a_builder_that_takes_too_long_is_not_waited_for(photo_dir, tmp_path, monkeypatch, caplog):
    """While another process holds the build lock, a scan waits; past the wait it decodes without a store."""
    stores = tmp_path / "stores"
    first = ImageFolder(photo_dir, 360, store_dir=stores)
    key = Path(first.store_path).stem
    first.store.close()
    Path(first.store_path).unlink()
    monkeypatch.setattr(pixel_store, "WAIT_SECONDS", 0.5)
    with StoreCache(stores).building(key) as locked, caplog.at_level(logging.INFO):
        assert locked
        folder = ImageFolder(photo_dir, 360, store_dir=stores)
    assert folder.store is None and "still being built" in caplog.text
    assert folder.images == first.images


def test_changed_folder_new_store_and_lru_eviction(photo_dir, tmp_path, caplog):
    stores = tmp_path / "stores"
    root = tmp_path / "photos"
    shutil.copytree(photo_dir, root)
    a = ImageFolder(root, 360, store_dir=stores)
    size_a = Path(a.store_path).stat().st_size
    a.store.close()
    Image.fromarray(np.asarray(Image.open(root / "coffee.png"))[::-1]).save(root / "coffee.png")  # edited
    b = ImageFolder(root, 360, store_dir=stores, store_max_gb=1.0)
    assert b.store_path != a.store_path  # a new fingerprint, a new store
    assert np.array_equal(b.load("coffee.png"), np.asarray(Image.open(root / "coffee.png").convert("RGB")))
    assert Path(a.store_path).exists()  # room for both
    (root / "rocket.png").unlink()  # removed: another store; two of the three fit, the least recently used goes
    with caplog.at_level(logging.INFO):
        c = ImageFolder(root, 360, store_dir=stores, store_max_gb=size_a * 2.5 / 1e9)
    assert c.store is not None and "rocket.png" not in c.store.images
    assert not Path(a.store_path).exists() and "evicted" in caplog.text
    assert Path(b.store_path).exists()
    # b and c are open here (a reader's shared lock): a store in use is never evicted
    d_root = tmp_path / "other"
    d_root.mkdir()
    shutil.copy(photo_dir / "astronaut.png", d_root)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        d = ImageFolder(d_root, 360, store_dir=stores, store_max_gb=(b.store.nbytes + c.store.nbytes) / 1e9)
    assert d.store is None and "--store-max-gb" in caplog.text  # b and c are in use: no room, decoded instead
    assert Path(b.store_path).exists() and Path(c.store_path).exists()


def test_store_flags_of_the_command_lines(tmp_path, monkeypatch):
    from server.cli import build_parser
    from server.degradation.pixel_store import store_options
    from server.service.serve import build_parser as server_parser, config_from_args

    monkeypatch.setenv("DEGRADE_STORE_DIR", str(tmp_path / "env"))
    args = build_parser().parse_args(["generate", "--out", "x"])
    assert store_options(args)["store_dir"] == tmp_path / "env"
    args = build_parser().parse_args(["generate", "--out", "x", "--store-dir", str(tmp_path / "s"),
                                      "--store-max-gb", "2"])
    assert store_options(args) == {"store_dir": tmp_path / "s", "store_max_gb": 2.0}
    assert store_options(build_parser().parse_args(["bench", "--no-store"]))["store_dir"] is None
    monkeypatch.setenv("DEGRADE_STORE_DIR", "off")
    assert store_options(build_parser().parse_args(["generate", "--out", "x"]))["store_dir"] is None
    cfg = config_from_args(server_parser().parse_args(["--no-store", "--store-max-gb", "3"]), environ={})
    assert cfg.no_store and cfg.store_max_gb == 3.0


def test_released_pages_read_back_the_same_pixels(photo_dir, tmp_path, monkeypatch):
    """A reader unmaps its pages every RELEASE_BYTES (its PSS stays flat): views taken before still read
    the store's bytes, never zeros."""
    monkeypatch.setattr(pixel_store, "RELEASE_BYTES", 1)  # release at every image
    plain = ImageFolder(photo_dir, 360)
    folder = ImageFolder(photo_dir, 360, store_dir=tmp_path / "stores")
    views = [(info.name, folder.load(info.name)) for info in folder.images for _ in range(2)]
    for name, view in views:
        assert np.array_equal(view, plain.load(name)), name


def test_a_server_on_a_store_file_and_a_trainer_cutting_hr_from_one(make_server, photo_dir, tmp_path):
    """degrade-server --images data.vcstore publishes the folder's fingerprint and serves the folder's
    batches; a trainer's hr_root may be a store file too (wire 'lr': HR cut from its map)."""
    import grpc

    from client import DegradeClient
    from client.protocol import degrade_pb2 as pb
    from client.protocol import degrade_pb2_grpc as pbg

    packed = tmp_path / "data.vcstore"
    pack_folder(photo_dir, packed)
    _, folder_address = make_server(no_store=True)
    _, store_address = make_server(images=packed)
    infos = [pbg.DegraderStub(grpc.insecure_channel(a)).GetInfo(pb.InfoRequest(include_dataset_files=True))
             for a in (folder_address, store_address)]
    assert infos[0].dataset_fingerprint == infos[1].dataset_fingerprint != ""
    assert list(infos[0].dataset_files) == list(infos[1].dataset_files)
    assert infos[1].dataset_name == photo_dir.name
    with DegradeClient(folder_address) as client:
        want = list(client.epoch(5, 0, ordered=True))
    with DegradeClient(store_address, wire="lr", hr_root=packed) as client:
        got = list(client.epoch(5, 0, ordered=True))
    assert [b.patch_ids for b in got] == [b.patch_ids for b in want]
    for a, b in zip(want, got):
        assert np.array_equal(a.lr, b.lr) and np.array_equal(a.hr, b.hr) and np.array_equal(a.hr_usm, b.hr_usm)
