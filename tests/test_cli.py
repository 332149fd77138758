"""The ``degrade`` command line, run for real on real photographs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from server.cli import main


def test_generate_writes_pairs_and_records(photo_dir, tmp_path, capsys):
    out = tmp_path / "pairs"
    rc = main(["generate", "--images", str(photo_dir), "--out", str(out), "--limit", "9", "--workers", "0",
               "--seed", "4"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 9  # 7 patches per epoch: continues into epoch 1
    assert {r["epoch"] for r in recs} == {0, 1}
    assert len({r["patch_id"] for r in recs}) == 9
    for r in recs:
        lr = np.asarray(Image.open(out / "lr" / r["file"]))
        hr = np.asarray(Image.open(out / "hr" / r["file"]))
        usm = np.asarray(Image.open(out / "hr_usm" / r["file"]))
        assert lr.shape == (90, 90, 3) and hr.shape == usm.shape == (360, 360, 3)
    assert len(list((out / "lr").glob("*.png"))) == 9
    assert "pairs/s" in capsys.readouterr().out


def test_preview_sheet(photo_dir, tmp_path):
    sheet = tmp_path / "sheet.png"
    assert main(["preview", "--images", str(photo_dir), "--out", str(sheet), "--n", "6", "--workers", "0"]) == 0
    im = Image.open(sheet)
    assert im.width > 4 * 360 and im.height > 2 * 180  # 4 columns of HR|LR pairs, 2 rows
    arr = np.asarray(im.convert("L"))
    assert arr.std() > 20  # pictures, not a blank page


def test_clear_errors_for_bad_input(tmp_path, capsys):
    assert main(["generate", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("unknown_knob = 3\n")
    assert main(["generate", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_help_explains_commands():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("generate", "preview", "bench", "sample-data", "demo"):
        assert word in out
    gen = subprocess.run([sys.executable, "-m", "server", "generate", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--limit" in gen and "--profile" in gen


def test_sample_data_is_real_photographs(tmp_path):
    assert main(["sample-data", str(tmp_path / "s")]) == 0
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) >= 20
    from server.degradation.images import ImageFolder

    folder = ImageFolder(tmp_path / "s", 360)
    assert len(folder.images) == len(files) and not folder.skipped
    arr = folder.load(folder.images[0].name).astype(float)
    assert arr.std() > 20  # a photograph, not a flat or random image
    # neighbouring pixels are correlated in photographs (they are not in noise)
    assert np.corrcoef(arr[:, :-1, 0].ravel(), arr[:, 1:, 0].ravel())[0, 1] > 0.8


@pytest.mark.parametrize("pipeline", ["batch", "split"])
def test_python_dash_m_with_worker_processes(photo_dir, tmp_path, pipeline):
    """Worker processes re-import the entry module: it must not start the CLI again."""
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "server", "generate", "--images", str(photo_dir), "--out", str(out),
                           "--limit", "7", "--workers", "2", "--no-usm", "--pipeline", pipeline],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{pipeline} pipeline" in proc.stderr
    assert len((out / "records.jsonl").read_text().splitlines()) == 7
    assert len(list((out / "lr").glob("*.png"))) == 7 and not (out / "hr_usm").exists()


def test_generate_split_writes_the_same_files_as_batch(photo_dir, tmp_path, capsys):
    """--pipeline split on the CPU: the very same records and pixels as the whole-batch path."""
    outs = {}
    for pipeline in ("batch", "split"):
        out = outs[pipeline] = tmp_path / pipeline
        args = ["generate", "--images", str(photo_dir), "--out", str(out), "--limit", "8", "--seed", "3",
                "--pipeline", pipeline, "--workers", "0" if pipeline == "batch" else "1", "--png-level", "1"]
        assert main(args) == 0
        assert "kB per pair at PNG level 1" in capsys.readouterr().out
    recs = [(outs[p] / "records.jsonl").read_text() for p in ("batch", "split")]
    assert recs[0] == recs[1] and len(recs[0].splitlines()) == 8
    for rec in map(json.loads, recs[0].splitlines()):
        for kind in ("lr", "hr", "hr_usm"):
            a, b = (np.asarray(Image.open(outs[p] / kind / rec["file"])) for p in ("batch", "split"))
            assert np.array_equal(a, b)


def test_image_broken_after_scan_skips_its_batch_and_says_so(photo_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from server.degradation import images

    src = tmp_path / "imgs"
    shutil.copytree(photo_dir, src)
    real_decode = images.decode_rgb8
    scanned = []

    def decode_then_break(path):  # the scan sees good files; afterwards coffee.png is truncated
        arr = real_decode(path)
        scanned.append(path)
        if len(scanned) == len(list(src.iterdir())):
            data = (src / "coffee.png").read_bytes()
            (src / "coffee.png").write_bytes(data[: len(data) // 3])
        return arr

    monkeypatch.setattr(images, "decode_rgb8", decode_then_break)
    out = tmp_path / "o"
    cfg = tmp_path / "c.toml"
    cfg.write_text("video_batch_size = 2\nfirst_batch_range = [2, 2]\n")
    rc = main(["generate", "--images", str(src), "--out", str(out), "--workers", "0", "--config", str(cfg),
               "--no-usm", "--no-store"])  # a pixel store would serve the pixels the scan saw (tests/test_pixel_store.py)
    err = capsys.readouterr().err
    assert rc == 1 and "coffee.png" in err and "skipped" in err
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and all(r["image"] != "coffee.png" for r in recs)  # 7 patches, coffee's batch of 2 lost


def test_profile_flag_with_a_config_file_keeps_the_profile_quirks(tmp_path):
    from server.cli import build_parser, load_config

    f = tmp_path / "c.toml"
    f.write_text("v2_prob = 0.7\n")
    cfg = load_config(build_parser().parse_args(["generate", "--out", "o", "--config", str(f),
                                                 "--profile", "vcisr-code"]))
    assert cfg.profile == "vcisr-code" and cfg.v2_prob == 0.7
    assert cfg.kernel_per_batch and cfg.bitrate_kbps == (3800, 5800)  # the quirks, not the paper's values


def test_demo_writes_pairs_and_both_sheets(photo_dir, tmp_path, service_cfg_file):
    out = tmp_path / "demo"
    rc = main(["demo", "--images", str(photo_dir), "--config", str(service_cfg_file), "--out", str(out),
               "--limit", "6", "--workers", "1"])
    assert rc == 0
    assert len(list((out / "pairs" / "lr").glob("*.png"))) == 6
    for sheet in ("preview.png", "served.png"):
        assert (out / sheet).stat().st_size > 10_000
