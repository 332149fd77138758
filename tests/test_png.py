"""The fast PNG writer of ``degrade generate``: any decoder reads back the exact pixels."""

import io

import numpy as np
import pytest
from PIL import Image

from server.pipeline.png import encode_png, write_png


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_photographs_round_trip_exactly_through_pillow(photo_patches, level):
    for img in photo_patches[:3]:
        back = np.asarray(Image.open(io.BytesIO(encode_png(img, level))))
        assert back.dtype == np.uint8 and np.array_equal(back, img)


def test_level_0_stores_and_higher_levels_deflate(photo_patches):
    img = photo_patches[0]
    stored, deflated = len(encode_png(img, 0)), len(encode_png(img, 1))
    assert stored > img.nbytes  # the pixels, one filter byte per row and the headers
    assert deflated < 0.9 * stored  # the Up filter + deflate shrink a photograph


def test_gray_odd_sizes_and_a_file(tmp_path):
    gray = (np.arange(7 * 5) * 37 % 256).astype(np.uint8).reshape(7, 5)
    size = write_png(tmp_path / "g.png", gray, 3)
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "L" and size == (tmp_path / "g.png").stat().st_size
    assert np.array_equal(np.asarray(im), gray)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 3), np.uint16), "uint8"),
    (np.zeros((4, 4, 4), np.uint8), "uint8"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
])
def test_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        encode_png(bad)
    with pytest.raises(ValueError, match="0-9"):
        encode_png(np.zeros((2, 2, 3), np.uint8), 10)
