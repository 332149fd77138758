"""Contact sheets: HR / LR pairs side by side, each labelled with how it was degraded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 180  # pixels per image in the sheet
LABEL_H = 34


def describe(rec: dict[str, Any]) -> tuple[str, str]:
    """Two short label lines for one patch record."""
    if rec.get("ending") == "v2" and rec.get("codec"):
        q = f"crf {rec['crf']}" if rec.get("crf") is not None else f"{rec['bitrate_kbps']} kb/s"
        preset = f" {rec['preset']}" if rec.get("preset") else ""
        line1 = f"V2 {rec['codec']} {q}{preset}"
        ar = rec.get("aspect_ratio") or 1.0
        line2 = f"fps {rec['fps']} ar {ar:.2f} jpeg1 q{rec['jpeg1_quality']}"
    else:
        line1 = f"V1 jpeg q{rec.get('jpeg1_quality')} -> q{rec.get('jpeg2_quality')}"
        line2 = f"k1 {rec['kernel1']['type']} {rec['kernel1']['size']}"
    if rec.get("codec_failure"):
        line2 = "codec failure: fallback"
    return line1, line2


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - very old Pillow
        return ImageFont.load_default()


def contact_sheet(hr: Sequence[np.ndarray], lr: Sequence[np.ndarray], records: Sequence[dict[str, Any]],
                  out: str | Path, columns: int = 4, title: str | None = None) -> Path:
    """Write a PNG grid of (HR | LR x4 nearest) pairs with labels; returns the path."""
    n = len(lr)
    if n == 0:
        raise ValueError("nothing to show: no pairs given")
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    pair_w = 2 * CELL + 6
    head = 30 if title else 0
    sheet = Image.new("RGB", (columns * (pair_w + 10) + 10, head + rows * (CELL + LABEL_H + 10) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    if title:
        draw.text((10, 8), title, fill="black", font=_font(16))
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = 10 + c * (pair_w + 10)
        y0 = head + 10 + r * (CELL + LABEL_H + 10)
        h = Image.fromarray(hr[i]).resize((CELL, CELL), Image.Resampling.LANCZOS)
        lo = Image.fromarray(lr[i]).resize((CELL, CELL), Image.Resampling.NEAREST)
        sheet.paste(h, (x0, y0))
        sheet.paste(lo, (x0 + CELL + 6, y0))
        l1, l2 = describe(records[i])
        draw.text((x0, y0 + CELL + 3), l1, fill="black", font=font)
        draw.text((x0, y0 + CELL + 18), l2, fill=(90, 90, 90), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
