"""The built-in sample data: real photographs shipped with scikit-image.

No data set can be downloaded at run time, so the embedded default is the set
of colour photographs that scikit-image bundles (astronaut, coffee, rocket,
the motorcycle stereo pair, ...), each also resampled at a few larger scales
(Lanczos) so that an epoch holds a few hundred 360x360 patches - enough for
full 128-frame video batches.  Codecs behave very differently on noise than
on photographs, which is why the sample set is never synthetic.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

#: (name, loader attribute in skimage.data) - colour photographs plus one grayscale texture
SOURCES = (
    ("astronaut", "astronaut"),
    ("coffee", "coffee"),
    ("rocket", "rocket"),
    ("motorcycle_left", "stereo_motorcycle"),
    ("motorcycle_right", "stereo_motorcycle"),
    ("immunohistochemistry", "immunohistochemistry"),
    ("hubble_deep_field", "hubble_deep_field"),
    ("retina", "retina"),
    ("chelsea", "chelsea"),
    ("grass", "grass"),
)
SCALES = (1.0, 1.25, 1.5, 2.0)
_VERSION = 1


def _load(name: str, attr: str) -> np.ndarray:
    import skimage.data

    data = getattr(skimage.data, attr)()
    if attr == "stereo_motorcycle":
        data = data[0] if name.endswith("left") else data[1]
    return np.asarray(data)


def default_sample_dir() -> Path:
    """Where the embedded sample set lives unless ``DEGRADE_SAMPLE_DIR`` says otherwise."""
    env = os.environ.get("DEGRADE_SAMPLE_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "vcisr-degrade" / "sample"


def write_sample_data(out_dir: str | Path, *, scales: tuple[float, ...] = SCALES, progress: bool = False) -> list[Path]:
    """Write the sample photographs as PNG into ``out_dir`` (idempotent); returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / ".sample-manifest.json"
    want = {"version": _VERSION, "sources": [s[0] for s in SOURCES], "scales": list(scales)}
    if manifest.exists():
        try:
            have = json.loads(manifest.read_text())
            files = [out / f for f in have.get("files", [])]
            if {k: have.get(k) for k in want} == want and all(f.exists() for f in files):
                return files
        except (OSError, ValueError):
            pass
    jobs = [(name, attr, s) for name, attr in SOURCES for s in scales]
    from tqdm import tqdm

    it = tqdm(jobs, desc="sample photographs", unit="img", disable=not progress)
    files: list[Path] = []
    cache: dict[str, np.ndarray] = {}
    for name, attr, s in it:
        if name not in cache:
            cache[name] = _load(name, attr)
        im = Image.fromarray(cache[name])
        if s != 1.0:
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
        if min(im.size) < 360:
            continue  # would be skipped by every loader anyway
        path = out / f"{name}_x{s:.2f}.png"
        im.save(path, compress_level=1)
        files.append(path)
    manifest.write_text(json.dumps({**want, "files": [f.name for f in files]}))
    log.info("wrote %d sample photographs to %s", len(files), out)
    return files


def ensure_sample_data(progress: bool = False) -> Path:
    """The embedded default image folder, written on first use."""
    d = default_sample_dir()
    write_sample_data(d, progress=progress)
    return d
