"""Bad input never crashes a run: converted where sound, else skipped and counted."""

import numpy as np
import pytest
from PIL import Image

from server.degradation.images import ImageFolder, decode_rgb8


@pytest.fixture()
def messy_dir(tmp_path, photo_patches):
    photo = photo_patches[0]  # 360x360 RGB crop of a real photograph
    Image.fromarray(photo).save(tmp_path / "a_rgb.png")
    Image.fromarray(photo).convert("L").save(tmp_path / "b_gray.png")
    Image.fromarray(photo).convert("RGBA").save(tmp_path / "c_rgba.png")
    gray16 = (np.asarray(Image.fromarray(photo).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "d_gray16.png")
    Image.fromarray(photo).convert("P").save(tmp_path / "e_palette.png")
    Image.fromarray(photo[:200, :200]).save(tmp_path / "f_tiny.png")
    good = tmp_path / "g_truncated.jpg"
    Image.fromarray(photo).save(good, quality=90)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    (tmp_path / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "i_empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_messy_folder_is_converted_or_skipped(messy_dir, photo_patches):
    folder = ImageFolder(messy_dir, 360)
    names = [i.name for i in folder.images]
    assert names == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_gray16.png", "e_palette.png"]
    skipped = {s.name: s.reason for s in folder.skipped}
    assert set(skipped) == {"f_tiny.png", "g_truncated.jpg", "h_corrupt.png", "i_empty.jpg"}
    assert "too small" in skipped["f_tiny.png"]
    for name in names:
        arr = folder.load(name)
        assert arr.dtype == np.uint8 and arr.shape == (360, 360, 3)
    # 16-bit gray is scaled to 8 bits, not clipped: equal to the 8-bit gray version
    assert np.array_equal(folder.load("d_gray16.png"), folder.load("b_gray.png"))
    assert np.array_equal(folder.load("c_rgba.png"), photo_patches[0])
    gray = folder.load("b_gray.png")
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_empty_or_missing_folder_has_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 360)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable images"):
        ImageFolder(tmp_path, 360)


def test_decode_reports_reason(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb8(p)
