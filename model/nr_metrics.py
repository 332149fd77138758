"""No-reference image quality metrics of the VCISR paper's tables, through ``pyiqa``.

NIQE, BRISQUE, NRQM and CLIP-IQA (pyiqa 0.1.16, the ``eval`` extra).  Every one
of them needs a parameter/weight file that pyiqa would normally download on
first use; this module never lets it:

* the files are looked for *before* any metric is created, in ``--weights-dir``
  (if given) and then where pyiqa itself keeps them;
* a missing file makes the metric *unavailable* with a message naming the file,
  where to put it and the URL to fetch it from - the other metrics still run;
* the files that are found are handed to pyiqa as explicit paths, and pyiqa's
  download functions are replaced by ones that raise while the metrics are
  built, so an offline run can never hang on a download.

Where pyiqa 0.1.16 keeps the files (``torch.hub.get_dir()`` is
``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``, or
``$XDG_CACHE_HOME/torch/hub`` when that variable is set):

=========  ==========================  ==========================================
metric     file                        pyiqa's location
=========  ==========================  ==========================================
niqe       niqe_modelparameters.mat    ``<hub>/pyiqa/`` (pyiqa's DEFAULT_CACHE_DIR)
brisque    brisque_svm_weights.pth     ``<hub>/pyiqa/``
nrqm       NRQM_model.mat              ``<hub>/pyiqa/``
clipiqa    RN50.pt (OpenAI CLIP RN50)  ``<hub>/clip/`` (pyiqa's own CLIP loader)
=========  ==========================  ==========================================

The first three come from the Hugging Face repo ``chaofengc/IQA-PyTorch-Weights``
(``$HF_ENDPOINT/chaofengc/IQA-PyTorch-Weights/resolve/main/<file>``); RN50.pt
from OpenAI's CDN.  Plain CLIP-IQA (``clipiqa``, not ``clipiqa+``) needs no
other file: its prompts are fixed text.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

PYIQA_VERSION = "0.1.16"
INSTALL_HINT = ("pip install 'vcisr-degrade[eval]'  (or: pip install pyiqa==" + PYIQA_VERSION + ")")

_HF_REPO = "chaofengc/IQA-PyTorch-Weights"
_CLIP_RN50_URL = ("https://openaipublic.azureedge.net/clip/models/"
                  "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")


def _hf_url(name: str) -> str:
    """What ``huggingface_hub.hf_hub_url`` gives pyiqa (``get_url_from_name``)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{_HF_REPO}/resolve/main/{name}"


def hub_dir() -> Path:
    """``torch.hub.get_dir()``: ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``), read now."""
    return Path(torch.hub.get_dir()).expanduser()


@dataclass(frozen=True)
class WeightFile:
    name: str
    subdir: str         # under torch.hub.get_dir(): "pyiqa" (pyiqa's DEFAULT_CACHE_DIR) or "clip"
    url_fn: Callable[[], str]

    @property
    def url(self) -> str:
        return self.url_fn()

    def default_path(self) -> Path:
        return hub_dir() / self.subdir / self.name

    def find(self, weights_dir: Path | None = None) -> Path | None:
        candidates = ([Path(weights_dir) / self.name] if weights_dir else []) + [self.default_path()]
        for c in candidates:
            if c.is_file() and c.stat().st_size > 0:
                return c
        return None

    def missing_message(self, metric: str, weights_dir: Path | None = None) -> str:
        where = str(self.default_path())
        if weights_dir:
            where += f" or {Path(weights_dir) / self.name}"
        return (f"{metric}: weight file {self.name} not found (looked for {where}); "
                f"download it from {self.url} and put it there")


@dataclass(frozen=True)
class NRMetricSpec:
    name: str                # our name (--metrics)
    title: str               # table header
    pyiqa_name: str          # pyiqa.create_metric name
    lower_better: bool
    files: tuple[WeightFile, ...]
    path_kwarg: str          # the create_metric keyword that takes the file's path
    digits: int


NR_METRICS: dict[str, NRMetricSpec] = {
    "niqe": NRMetricSpec("niqe", "NIQE", "niqe", True,
                         (WeightFile("niqe_modelparameters.mat", "pyiqa", lambda: _hf_url("niqe_modelparameters.mat")),),
                         "pretrained_model_path", 3),
    "brisque": NRMetricSpec("brisque", "BRISQUE", "brisque", True,
                            (WeightFile("brisque_svm_weights.pth", "pyiqa",
                                        lambda: _hf_url("brisque_svm_weights.pth")),),
                            "pretrained_model_path", 2),
    "nrqm": NRMetricSpec("nrqm", "NRQM", "nrqm", False,
                         (WeightFile("NRQM_model.mat", "pyiqa", lambda: _hf_url("NRQM_model.mat")),),
                         "pretrained_model_path", 3),
    # pyiqa's CLIPIQA calls its own clip loader with ``backbone``, which accepts a file path.
    "clipiqa": NRMetricSpec("clipiqa", "CLIP-IQA", "clipiqa", False,
                            (WeightFile("RN50.pt", "clip", lambda: _CLIP_RN50_URL),),
                            "backbone", 4),
}
DEFAULT_NR = tuple(NR_METRICS)


class DownloadRefused(RuntimeError):
    """pyiqa tried to download something: never allowed here (offline, fail fast)."""


@dataclass
class NRMetric:
    """A metric ready to score images, or an unavailable one with the reason."""

    spec: NRMetricSpec
    reason: str | None = None
    _metric: object | None = None
    _error: str | None = None  # the first per-image failure, reported once

    @property
    def available(self) -> bool:
        return self._metric is not None

    def score(self, img: torch.Tensor) -> float:
        """Score one image (1, 3, H, W) in [0, 1]; NaN (and ``error`` set) when pyiqa fails on it."""
        if self._metric is None:
            return math.nan
        try:
            with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
                value = self._metric(img.float().clamp(0, 1))
            value = float(torch.as_tensor(value).float().mean())
        except Exception as exc:  # noqa: BLE001 - e.g. an image smaller than NIQE's 96x96 blocks
            if self._error is None:
                self._error = f"{type(exc).__name__}: {exc}"
            return math.nan
        return value

    @property
    def error(self) -> str | None:
        return self._error


def import_pyiqa() -> tuple[types.ModuleType | None, str | None]:
    """``(pyiqa, None)`` or ``(None, why not)``."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return importlib.import_module("pyiqa"), None
    except ImportError as exc:
        return None, f"pyiqa is not installed ({exc}); install it with: {INSTALL_HINT}"
    except Exception as exc:  # noqa: BLE001 - a broken install must not stop PSNR/SSIM
        return None, f"pyiqa failed to import ({type(exc).__name__}: {exc}); reinstall it with: {INSTALL_HINT}"


@contextlib.contextmanager
def _pkg_resources_shim() -> Iterator[None]:
    """openai-clip 1.0.1 (pyiqa's CLIP tokenizer) does ``from pkg_resources import packaging``;
    setuptools >= 81 has no ``pkg_resources``.  Only while pyiqa's CLIP is imported, and only
    when the real module is absent, a stand-in that carries ``packaging`` is provided."""
    if "clip" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    try:
        import packaging
        import packaging.version  # what clip.py uses: packaging.version.parse
    except ImportError:
        yield
        return
    shim = types.ModuleType("pkg_resources")
    shim.packaging = packaging  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


@contextlib.contextmanager
def _downloads_refused() -> Iterator[None]:
    """Replace every download path the four metrics could take by one that raises."""

    def refuse(url, *args, **kwargs):
        raise DownloadRefused(f"download of {url} refused (offline evaluation; put the file in place)")

    patches: list[tuple[object, str, object]] = []

    def patch(obj: object, attr: str) -> None:
        if hasattr(obj, attr):
            patches.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, refuse)

    import urllib.request

    patch(urllib.request, "urlopen")          # pyiqa's CLIP loader (archs/clip_model.py)
    patch(torch.hub, "download_url_to_file")
    try:
        du = importlib.import_module("pyiqa.utils.download_util")
        patch(du, "download_url_to_file")     # load_file_from_url -> torch.hub's downloader
        patch(du, "download_file_from_google_drive")
    except Exception:  # noqa: BLE001 - no pyiqa: nothing of it to patch
        du = None
    try:
        yield
    finally:
        for obj, attr, orig in reversed(patches):
            setattr(obj, attr, orig)


def resolve(names: list[str], weights_dir: Path | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """The weight file of each metric, or why it is unavailable - without importing pyiqa."""
    found: dict[str, Path] = {}
    missing: dict[str, str] = {}
    for name in names:
        spec = NR_METRICS[name]
        for wf in spec.files:
            path = wf.find(weights_dir)
            if path is None:
                missing[name] = wf.missing_message(name, weights_dir)
                break
            found[name] = path
    return found, missing


def create_metrics(names: list[str], device: torch.device, weights_dir: Path | None = None) -> dict[str, NRMetric]:
    """The requested metrics; those without their file or without pyiqa are unavailable (with the reason)."""
    out: dict[str, NRMetric] = {}
    found, missing = resolve(names, weights_dir)
    for name, reason in missing.items():
        out[name] = NRMetric(NR_METRICS[name], reason=reason)
    todo = [n for n in names if n in found]
    if todo:
        pyiqa, why = import_pyiqa()
        for name in todo:
            spec = NR_METRICS[name]
            if pyiqa is None:
                out[name] = NRMetric(spec, reason=f"{name}: {why}")
                continue
            try:
                with _downloads_refused(), _pkg_resources_shim(), contextlib.redirect_stdout(io.StringIO()):
                    metric = pyiqa.create_metric(spec.pyiqa_name, device=device,
                                                 **{spec.path_kwarg: str(found[name])})
                out[name] = NRMetric(spec, _metric=metric)
            except DownloadRefused as exc:
                out[name] = NRMetric(spec, reason=f"{name}: pyiqa wanted a file that is not here: {exc}")
            except Exception as exc:  # noqa: BLE001 - a corrupt file or a pyiqa incompatibility
                wf = spec.files[0]
                out[name] = NRMetric(spec, reason=(
                    f"{name}: could not be created from {found[name]} ({type(exc).__name__}: {exc}); "
                    f"if the file is damaged, download it again from {wf.url}"))
    return {n: out[n] for n in names}
