"""``grl-eval`` (model/evaluate.py, model/nr_metrics.py): a tiny GRL, a few small real photographs.

No weight file is ever downloaded: ``TORCH_HOME`` points at an empty folder, so
the pyiqa metrics are unavailable with a message - or run from a fabricated
parameter file where pyiqa is installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.evaluate import full_reference, main, rgb_to_y, super_resolve, to_tensor
from model.grl import build_grl_small
from model.nr_metrics import NR_METRICS

TINY = {"embed_dim": 16, "depths": [1, 1], "num_heads_window": [1, 1], "num_heads_stripe": [1, 1], "img_size": 16}
HR_SIZE = (64, 48)  # w, h; LR 16x12 (a tiny GRL still takes ~0.1 s per image on 2 cores)


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch) -> Path:
    """pyiqa's caches point at an empty folder (never the user's ~/.cache)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return home


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    import skimage.data as d

    root = tmp_path_factory.mktemp("eval")
    lr, hr = root / "lr", root / "hr"
    lr.mkdir()
    hr.mkdir()
    for name in ("astronaut", "coffee", "camera"):  # camera is gray: converted to RGB
        im = Image.fromarray(getattr(d, name)()).resize(HR_SIZE, Image.Resampling.LANCZOS)
        im.save(hr / f"{name}.png")
        im.resize((HR_SIZE[0] // 4, HR_SIZE[1] // 4), Image.Resampling.BICUBIC).save(lr / f"{name}.png")
    # RGBA LR (reference saved as .jpg: matched by stem) and a 16-bit gray LR without a reference
    rgba = Image.fromarray(d.chelsea()).resize(HR_SIZE, Image.Resampling.LANCZOS)
    rgba.resize((HR_SIZE[0] + 2, HR_SIZE[1] + 3)).save(hr / "chelsea.jpg", quality=95)  # cropped to 64x48
    rgba.resize((16, 12), Image.Resampling.BICUBIC).convert("RGBA").save(lr / "chelsea.png")
    gray16 = Image.fromarray(np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300)
    assert gray16.mode.startswith("I;16")
    gray16.save(lr / "gray16.png")
    (lr / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    one = root / "one"  # one 24x24 LR image (SR 96x96: one NIQE block) for the cheaper runs
    one.mkdir()
    (root / "one_hr").mkdir()
    big = Image.fromarray(d.astronaut()).resize((96, 96), Image.Resampling.LANCZOS)
    big.save(root / "one_hr" / "astronaut.png")
    big.resize((24, 24), Image.Resampling.BICUBIC).save(one / "astronaut.png")

    torch.manual_seed(0)
    gen = build_grl_small(**TINY)
    ckpt = root / "latest.pt"
    torch.save({"format": "grl-train/1", "config": {"stage": "l1", "model_overrides": TINY}, "iteration": 7,
                "generator": gen.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "data": {"pool": np.arange(3)}}, ckpt)  # not weights-only: loaded with the full unpickler
    bare = root / "bare.pt"
    torch.save(gen.state_dict(), bare)
    return {"root": root, "lr": lr, "hr": hr, "one": one, "one_hr": root / "one_hr", "ckpt": ckpt, "bare": bare}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_references_give_psnr_ssim_and_bad_image_is_skipped(data, tmp_path, capsys):
    js, out_dir = tmp_path / "r.json", tmp_path / "sr"
    code, out, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["lr"], "--references", data["hr"],
                          "--out", out_dir, "--metrics", "none", "--per-image", "--json", js, "--device", "cpu")
    assert code == 0, err
    rep = json.loads(js.read_text())
    assert rep["checkpoint"]["format"] == "grl-train/1" and rep["checkpoint"]["iteration"] == 7
    assert rep["scale"] == 4 and rep["full_reference"] == {"space": "Y (BT.601)", "crop": 4}
    rows = {r["name"]: r for r in rep["per_image"]}
    assert set(rows) == {"astronaut.png", "coffee.png", "camera.png", "chelsea.png", "gray16.png"}
    for name in ("astronaut.png", "coffee.png", "camera.png", "chelsea.png"):
        assert math.isfinite(rows[name]["psnr"]) and 3 < rows[name]["psnr"] < 60
        assert -1 <= rows[name]["ssim"] <= 1
        assert rows[name]["sr_size"] == list(HR_SIZE)
    assert rows["chelsea.png"]["reference"] == "chelsea.jpg"
    assert rows["gray16.png"]["note"] == "no reference" and "psnr" not in rows["gray16.png"]
    assert rep["metrics"]["psnr"]["n"] == 4 and math.isfinite(rep["metrics"]["psnr"]["mean"])
    assert rep["skipped"][0]["name"] == "broken.jpg"
    assert "broken.jpg" in err and "broken.jpg" in out
    assert "mean (5 images)" in out and "astronaut.png" in out
    with Image.open(out_dir / "chelsea.png") as im:
        assert im.size == HR_SIZE and im.mode == "RGB"


def test_psnr_sanity(data, tmp_path, capsys):
    """SR against itself: PSNR at the 1e-12 MSE cap (120 dB), SSIM 1; and the Y PSNR formula."""
    out_dir, js = tmp_path / "sr", tmp_path / "r.json"
    out_dir.mkdir()
    code, _, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["one"], "--out", out_dir,
                        "--references", out_dir, "--metrics", "none", "--json", js, "--fr-space", "rgb")
    assert code == 0, err  # --out is written before each image's reference is read
    m = json.loads(js.read_text())["metrics"]
    assert m["psnr"]["mean"] == pytest.approx(120.0) and m["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)

    rng = np.random.default_rng(0)
    hr8 = np.asarray(Image.open(data["hr"] / "astronaut.png").convert("RGB"))
    noisy8 = np.clip(hr8.astype(int) + rng.integers(-6, 7, hr8.shape), 0, 255).astype(np.uint8)
    got = full_reference(to_tensor(noisy8, torch.device("cpu")), to_tensor(hr8, torch.device("cpu")), 4, "y")

    def y(a: np.ndarray) -> np.ndarray:
        return 16 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0

    d = (y(noisy8.astype(np.float64)) - y(hr8.astype(np.float64)))[4:-4, 4:-4]
    assert got["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2 / np.mean(d ** 2)), abs=1e-3)
    assert 0.5 < got["ssim"] < 1
    assert rgb_to_y(torch.ones(1, 3, 2, 2)).flatten()[0].item() == pytest.approx(235 / 255, abs=1e-4)


def test_missing_weight_files_are_named_and_run_goes_on(data, tmp_path, capsys, no_weights):
    js = tmp_path / "r.json"
    code, out, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["one"], "--references", data["one_hr"],
                          "--json", js)
    assert code == 0, err
    rep = json.loads(js.read_text())
    for name, spec in NR_METRICS.items():
        wf = spec.files[0]
        reason = rep["metrics"][name]["reason"]
        assert rep["metrics"][name]["available"] is False and rep["metrics"][name]["mean"] is None
        assert wf.name in reason and wf.url in reason
        assert str(no_weights / "hub" / wf.subdir / wf.name) in reason
        assert wf.name in out and wf.name in err
    assert "huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/niqe_modelparameters.mat" in out
    assert str(no_weights / "hub" / "clip" / "RN50.pt") in out
    assert not (no_weights / "hub").exists()  # nothing tried to download (pyiqa would create its folder)
    assert math.isfinite(rep["metrics"]["psnr"]["mean"])  # the full-reference metrics still ran


def _niqe_params(folder: Path) -> Path:
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    path = folder / "niqe_modelparameters.mat"  # the layout of pyiqa's file, made-up numbers
    scipy.io.savemat(path, {"mu_prisparam": rng.normal(size=(1, 36)), "cov_prisparam": np.eye(36)})
    return path


def test_weight_file_present_but_no_pyiqa(data, tmp_path, capsys, monkeypatch):
    _niqe_params(tmp_path / "w")
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # an `import pyiqa` raises ImportError
    js = tmp_path / "r.json"
    code, out, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["one"], "--metrics", "niqe",
                          "--weights-dir", tmp_path / "w", "--json", js)
    assert code == 0, err
    reason = json.loads(js.read_text())["metrics"]["niqe"]["reason"]
    assert "pyiqa is not installed" in reason and "pip install" in reason and "[eval]" in reason
    assert "n/a" in out


def test_niqe_runs_from_a_local_file_when_pyiqa_is_installed(data, tmp_path, capsys, no_weights):
    pytest.importorskip("pyiqa", reason="pyiqa (the eval extra) not installed")
    _niqe_params(no_weights / "hub" / "pyiqa")  # where pyiqa keeps it
    js = tmp_path / "r.json"
    code, _, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["one"], "--metrics", "niqe,brisque",
                        "--json", js)
    assert code == 0, err
    m = json.loads(js.read_text())["metrics"]
    assert m["niqe"]["available"] and m["niqe"]["n"] == 1 and math.isfinite(m["niqe"]["mean"])
    assert not m["brisque"]["available"] and "brisque_svm_weights.pth" in m["brisque"]["reason"]


@pytest.mark.parametrize("kind", ["missing", "garbage", "wrong_config", "not_weights"])
def test_bad_checkpoint_exits_2(data, tmp_path, capsys, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "garbage":
        path.write_bytes(b"definitely not a checkpoint")
    elif kind == "wrong_config":
        path = data["bare"]  # a tiny GRL's weights, but no --model-config: GRL-small defaults do not fit
    elif kind == "not_weights":
        torch.save({"hello": "world"}, path)
    code, out, err = _run(capsys, "--checkpoint", path, "--images", data["lr"])
    assert code == 2 and out == ""
    assert err.startswith("grl-eval: error:") and str(path) in err
    if kind == "missing":
        assert "does not exist" in err
    if kind == "wrong_config":
        assert "--model-config" in err


def test_bare_state_dict_with_model_config(data, capsys):
    code, out, err = _run(capsys, "--checkpoint", data["bare"], "--images", data["one"], "--metrics", "none",
                          "--model-config", json.dumps(TINY))
    assert code == 0, err
    assert "mean (1 image)" in out


@pytest.mark.parametrize("argv,msg", [
    (["--metrics", "niqe,psnr"], "unknown metric"),
    (["--references", "/nonexistent/hr"], "reference folder"),
    (["--out", "{lr}"], "overwrite the inputs"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--tile", "-1"], ""),
])
def test_bad_arguments_exit_2(data, capsys, argv, msg):
    argv = [a.format(lr=data["lr"]) for a in argv]
    code, _, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["lr"], *argv)
    assert code == 2 and msg in err
    code, _, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["root"] / "nope")
    assert code == 2 and "does not exist" in err


class _LocalSR(torch.nn.Module):
    """Nearest x4 after a 3x3 convolution: a receptive field of 1 LR pixel."""

    upscale = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="replicate")

    def forward(self, x):
        return torch.nn.functional.interpolate(torch.sigmoid(self.conv(x)), scale_factor=4, mode="nearest")


def test_tiling_is_exact_for_a_local_model():
    model, x = _LocalSR(), torch.rand(1, 3, 37, 53)
    whole = super_resolve(model, x, 4)

    def diff(tile: int, overlap: int) -> float:
        return (super_resolve(model, x, 4, tile=tile, overlap=overlap) - whole).abs().max().item()

    assert diff(16, 1) < 1e-6 and diff(10, 3) < 1e-6  # the same up to float rounding of the convolution
    assert diff(16, 0) > 1e-3  # without context the tile borders differ: the test has teeth


def test_tiled_grl_run(data, tmp_path, capsys):
    out_dir = tmp_path / "sr"
    code, _, err = _run(capsys, "--checkpoint", data["ckpt"], "--images", data["one"], "--out", out_dir,
                        "--metrics", "none", "--tile", "12", "--tile-overlap", "2")
    assert code == 0, err
    with Image.open(out_dir / "astronaut.png") as im:  # 2 x 2 tiles of 24x24
        assert im.size == (96, 96)
