"""DaliPatchLoader (optional NVIDIA DALI extra) gives the same HR crops as the CPU loader.

Skipped as a whole where DALI is not installed (CI does not install it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from server.degradation.engine import crop_patches  # noqa: E402
from server.degradation.epoch_plan import make_epoch_plan  # noqa: E402
from server.degradation.images import ImageFolder  # noqa: E402
from server.pipeline.dali_loader import DaliPatchLoader, dali_decodable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _plans(folder, cfg, epochs=(0, 1, 2)):
    return [make_epoch_plan(folder.images, cfg, seed=7, epoch=e) for e in epochs]


def _pil_uses_libjpeg_turbo() -> bool:
    from PIL import features

    return bool(features.check_feature("libjpeg_turbo"))


@pytest.fixture(scope="module")
def folder(photo_dir, small_cfg):
    return ImageFolder(photo_dir, small_cfg.patch_size)


@pytest.fixture(scope="module")
def cpu_loader(folder, small_cfg):
    try:
        loader = DaliPatchLoader(folder, small_cfg.patch_size, device="cpu", threads=2)
    except RuntimeError as exc:  # pragma: no cover - would mean DALI's CPU backend needs a GPU
        pytest.skip(f"DALI's CPU backend does not run here: {exc}")
    yield loader
    loader.close()


def test_photo_dir_files_go_through_dali(folder, cpu_loader):
    # the fixture's PNGs and JPEG are plain 8-bit RGB: all decoded by DALI, none by the fallback
    assert all(cpu_loader.uses_dali(info.name) for info in folder.images)
    assert any(info.name.endswith(".jpg") for info in folder.images)


def test_cpu_backend_matches_crop_patches(folder, cpu_loader, small_cfg):
    p = small_cfg.patch_size
    jpeg_diff = 0
    batches = 0
    for plan in _plans(folder, small_cfg):
        assert plan.num_batches >= 2
        for b in range(plan.num_batches):
            refs = plan.batch(b)
            want = crop_patches(folder, refs, p)
            got = cpu_loader.crop(refs)
            assert got.dtype == np.uint8 and got.shape == want.shape == (len(refs), p, p, 3)
            assert got.flags.c_contiguous
            for i, ref in enumerate(refs):
                if ref.image.endswith(".png"):
                    np.testing.assert_array_equal(got[i], want[i], err_msg=f"{ref}")
                else:
                    jpeg_diff = max(jpeg_diff, int(np.abs(got[i].astype(int) - want[i]).max()))
            batches += 1
        # a whole epoch in one call too (several distinct images, one decode each)
        np.testing.assert_array_equal(cpu_loader.crop(plan.patches), crop_patches(folder, plan.patches, p))
    assert batches >= 6
    # DALI's CPU JPEG decoder is libjpeg-turbo (accurate IDCT, fancy upsampling), as in Pillow's wheels
    if _pil_uses_libjpeg_turbo():
        assert jpeg_diff == 0
    else:  # pragma: no cover - a Pillow built against IJG libjpeg
        assert jpeg_diff <= 1


def test_cpu_backend_whole_epoch_and_small_batches(folder, photo_dir, small_cfg):
    p = small_cfg.patch_size
    loader = DaliPatchLoader(folder, p, device="cpu", threads=1, max_batch=2)  # forces several DALI runs
    try:
        for plan in _plans(folder, small_cfg, epochs=(3, 4)):
            np.testing.assert_array_equal(loader.crop(plan.patches), crop_patches(folder, plan.patches, p))
            assert loader.crop(()).shape == (0, p, p, 3)
    finally:
        loader.close()


def _odd_images(root: Path) -> dict[str, bool]:
    """Files DALI might decode differently from server.degradation.images -> whether DALI should take them."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a_rgb.png")
    Image.fromarray(rgb[..., 0]).save(root / "b_gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "c_rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "d_palette.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257 + 3)).save(root / "e_gray16.png")
    Image.fromarray(rgb[..., 2]).save(root / "f_gray.jpg", quality=90)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    im.save(root / "g_rotated.jpg", quality=90, exif=exif)
    Image.fromarray(rgb).convert("CMYK").save(root / "h_cmyk.jpg", quality=90)
    Image.fromarray(rgb).save(root / "i_rgb.bmp")
    Image.fromarray(rgb).save(root / "j_rgb.jpg", quality=90)
    # 16-bit RGB PNG: Pillow calls it mode RGB, the IHDR says depth 16
    import zlib

    h, w = 260, 270
    px = (rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)).astype(">u2")
    raw = b"".join(b"\x00" + px[r].tobytes() for r in range(h))

    def chunk(tag, data):
        return struct_pack(len(data)) + tag + data + struct_pack(zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct_pack(w) + struct_pack(h) + bytes([16, 2, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    (root / "k_rgb16.png").write_bytes(png)
    return {"a_rgb.png": True, "b_gray.png": False, "c_rgba.png": False, "d_palette.png": False,
            "e_gray16.png": False, "f_gray.jpg": False, "g_rotated.jpg": False, "h_cmyk.jpg": False,
            "i_rgb.bmp": False, "j_rgb.jpg": True, "k_rgb16.png": False}


def struct_pack(v: int) -> bytes:
    return int(v).to_bytes(4, "big")


def test_odd_modes_fall_back_to_the_cpu_decoder(tmp_path):
    expected = _odd_images(tmp_path)
    folder = ImageFolder(tmp_path, 256)
    assert sorted(i.name for i in folder.images) == sorted(expected)  # all usable
    for name, want in expected.items():
        assert dali_decodable(tmp_path / name) is want, name
    loader = DaliPatchLoader(folder, 128, device="cpu", threads=2)
    try:
        for name in expected:
            assert loader.uses_dali(name) is expected[name]
        from server.degradation.epoch_plan import PatchRef

        refs = tuple(PatchRef(info.name, x, y) for info in folder.images for (x, y) in ((0, 0), (5, 17), (100, 120)))
        np.testing.assert_array_equal(loader.crop(refs), crop_patches(folder, refs, 128))
    finally:
        loader.close()


def test_size_change_and_corrupt_file_errors(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    folder = ImageFolder(tmp_path, 256)
    loader = DaliPatchLoader(folder, 256, device="cpu", threads=1)
    from server.degradation.epoch_plan import PatchRef

    try:
        with pytest.raises(ValueError, match="changed size"):
            loader.crop((PatchRef("a.png", 100, 0),))
        (tmp_path / "a.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])  # truncated
        loader.folder._cache.clear()
        with pytest.raises(ValueError, match="became unreadable"):
            loader.crop((PatchRef("a.png", 0, 0),))
    finally:
        loader.close()


def test_bad_device_and_cpu_crop_tensor(folder):
    with pytest.raises(ValueError, match="device"):
        DaliPatchLoader(folder, 360, device="cuda")
    loader = DaliPatchLoader(folder, 360, device="cpu", threads=1)
    with pytest.raises(RuntimeError, match="crop_tensor"):
        loader.crop_tensor(())
    loader.close()


def test_import_without_dali_and_clear_error():
    # importing the module never needs DALI; constructing the loader says how to install it
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"
        "import server.pipeline.dali_loader as m\n"
        "assert not m.dali_available()\n"
        "try:\n"
        "    m.DaliPatchLoader(None, 8, device='cpu')\n"
        "except m.DaliUnavailableError as e:\n"
        "    assert \"pip install 'vcisr-degrade[dali]'\" in str(e), e\n"
        "    assert isinstance(e, ImportError)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.gpu
def test_gpu_crop_tensor_matches_crop_patches(folder, small_cfg):
    import torch

    p = small_cfg.patch_size
    loader = DaliPatchLoader(folder, p, device="gpu", threads=2)
    try:
        for plan in _plans(folder, small_cfg):
            for b in range(plan.num_batches):
                refs = plan.batch(b)
                want = crop_patches(folder, refs, p)
                t = loader.crop_tensor(refs)
                assert t.is_cuda and t.dtype == torch.uint8 and tuple(t.shape) == want.shape
                got = t.cpu().numpy()
                for i, ref in enumerate(refs):
                    if ref.image.endswith(".png"):
                        np.testing.assert_array_equal(got[i], want[i], err_msg=f"{ref}")
                    else:
                        # nvJPEG's IDCT/rounding differs from libjpeg-turbo (documented in server/pipeline/dali_loader.py)
                        d = np.abs(got[i].astype(int) - want[i])
                        assert d.mean() <= 1.0 and d.max() <= 16, (ref, d.mean(), d.max())
                np.testing.assert_array_equal(loader.crop(refs), got)
    finally:
        loader.close()
