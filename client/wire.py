"""Wire modes: what travels from the server, and what the trainer makes itself.

=========  ===============================  ===========================================================
mode       on the wire (per 360/90 pair)    made on the trainer's side
=========  ===============================  ===========================================================
``full``   LR, HR, sharpened HR (~800 kB)   nothing
``lr-hr``  LR, HR (~415 kB)                 the sharpened HR (USM), with the server's function
``lr``     LR and the records (~26 kB)      HR, cut from the trainer's own copy of the dataset, and the
                                            sharpened HR; the copy is checked against the server's
                                            dataset fingerprint before the first batch
=========  ===============================  ===========================================================

Everything made here uses the server's own code, so the training tensors do
not depend on the mode: USM is :func:`server.degradation.filters.usm_sharpen` with the
server's ``usm_weight``/``usm_threshold``/``usm_radius`` (from GetInfo's
``config_json``) and the engine's float conversion and uint8 rounding - byte
for byte the server's ``hr_usm`` on the CPU, within 1/255 on CUDA (batched FFT
blurs); HR crops are :func:`server.degradation.engine.crop_patches` of the records'
``image``, ``x``, ``y``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .errors import DatasetMismatchError, DegradeError, LocalError

if TYPE_CHECKING:  # pragma: no cover
    from server.degradation.config import DegradationConfig

    from .client import DegradeClient, VideoBatch

log = logging.getLogger(__name__)

WIRE_MODES = ("full", "lr-hr", "lr")

#: One line per mode, for logs and --help texts.
DESCRIPTIONS = {
    "full": "LR + HR + sharpened HR from the server",
    "lr-hr": "LR + HR from the server, HR sharpened here",
    "lr": "LR + records from the server, HR cut here from the local dataset copy and sharpened here",
}


def check_wire(mode: str, hr_root: str | Path | None) -> str:
    """Validate a wire mode and its ``hr_root`` (a clear ValueError otherwise)."""
    if mode not in WIRE_MODES:
        raise ValueError(f"wire mode must be one of {', '.join(WIRE_MODES)}, got {mode!r}")
    if mode == "lr" and hr_root is None:
        raise ValueError("wire mode 'lr' cuts HR patches from your own copy of the dataset: give its folder "
                         "(--hr-root DIR / hr_root=...), or use wire mode 'lr-hr'")
    if mode != "lr" and hr_root is not None:
        raise ValueError(f"an HR root (--hr-root) is only used with wire mode 'lr', not {mode!r}")
    return mode


def wire_flags(mode: str) -> tuple[bool, bool]:
    """(include_hr, include_hr_usm) of a BatchRequest in this mode."""
    return {"full": (True, True), "lr-hr": (True, False), "lr": (False, False)}[mode]


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} given but torch sees no CUDA GPU")
    return dev


# ---------------------------------------------------------------------------
class Sharpener:
    """The server's sharpened target (Real-ESRGAN USM), made on ``device``.

    :meth:`uint8` gives the engine's bytes (uint8 NHWC, same chunks, conversion
    and rounding as ``Engine.make_batch``); :meth:`targets` gives the float
    training target the trainer would get from those bytes, on the tensor's own
    device (no host round trip)."""

    def __init__(self, cfg: "DegradationConfig", device: str | torch.device | None = "cpu"):
        self.weight, self.threshold, self.radius = cfg.usm_weight, cfg.usm_threshold, cfg.usm_radius
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device

    def _usm(self, hr: torch.Tensor) -> torch.Tensor:
        from server.degradation.filters import usm_sharpen

        return usm_sharpen(hr, weight=self.weight, threshold=self.threshold, radius=self.radius)

    def uint8(self, hr8: np.ndarray) -> np.ndarray:
        """uint8 NHWC HR -> the uint8 NHWC sharpened HR, exactly as the engine makes it."""
        from server.degradation.engine import CHUNK, to_uint8_nhwc

        out = np.empty_like(hr8)
        for lo in range(0, len(hr8), CHUNK):
            hi = min(lo + CHUNK, len(hr8))
            hr = torch.from_numpy(hr8[lo:hi]).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            out[lo:hi] = to_uint8_nhwc(self._usm(hr))
        return out

    def targets(self, hr: torch.Tensor) -> torch.Tensor:
        """Float NCHW HR in [0, 1] (uint8 levels / 255) -> the sharpened HR as the trainer gets it from
        the server's bytes: rounded to uint8 levels, divided by 255, on ``hr``'s device."""
        return self._usm(hr.float()).mul_(255.0).round_().clamp_(0, 255).div_(255.0)


class LocalHR:
    """HR patches cut from the trainer's own copy of the dataset (``crop_patches`` of the records' corners)."""

    def __init__(self, root: str | Path, files: Sequence[Any], patch_size: int, fingerprint: str):
        from server.degradation.images import ImageFolder, ImageInfo

        self.root = Path(root)
        self.patch_size = int(patch_size)
        self.fingerprint = fingerprint
        self.names = {f.name for f in files}
        # already checked: no scan (a scan decodes every file); images are decoded when first cut
        self.folder = ImageFolder(self.root, self.patch_size, images=[ImageInfo(f.name, f.width, f.height)
                                                                      for f in files], cache_images=8)

    @classmethod
    def verified(cls, root: str | Path, info: Any, patch_size: int) -> "LocalHR":
        """Check ``root`` against a ServerInfo's dataset fingerprint (with ``dataset_files``), then open it."""
        from server.degradation.fingerprint import DatasetMismatch, FileDigest, fingerprint, verify_copy

        if not info.dataset_fingerprint or not info.dataset_files:
            raise DegradeError("the server publishes no dataset fingerprint (an older degrade-server), so a local "
                               "copy of its dataset cannot be checked; use wire mode 'lr-hr'")
        files = [FileDigest(f.name, int(f.size), f.blake2b, int(f.width), int(f.height)) for f in info.dataset_files]
        outside = [f.name for f in files if Path(f.name).is_absolute() or ".." in Path(f.name).parts]
        if outside:  # names are relative to the image folder; nothing outside hr_root is ever read
            raise DegradeError(f"the server names a dataset file outside its folder: {outside[0]!r}")
        if fingerprint(files) != info.dataset_fingerprint:
            raise DegradeError("the server's dataset file list does not match its own fingerprint")
        try:
            verify_copy(root, files, what=f"the server's dataset '{info.dataset_name}'")
        except DatasetMismatch as exc:
            raise DatasetMismatchError(str(exc), files=exc.files) from None
        return cls(root, files, patch_size, info.dataset_fingerprint)

    def crop(self, batch: "VideoBatch") -> np.ndarray:
        from server.degradation.engine import crop_patches
        from server.degradation.epoch_plan import PatchRef

        if batch.dataset_fingerprint != self.fingerprint:
            if not batch.dataset_fingerprint:
                raise DatasetMismatchError(f"server {batch.server} does not say which dataset made its batches (an "
                                           "older degrade-server); wire mode 'lr' needs servers that do")
            raise DatasetMismatchError(
                f"server {batch.server} serves a different dataset (fingerprint {batch.dataset_fingerprint[:16]}...) "
                f"than the one {self.root} was checked against ({self.fingerprint[:16]}...); every server must serve "
                "the same images")
        unknown = sorted({r["image"] for r in batch.records} - self.names)
        if unknown:
            raise DatasetMismatchError(f"batch {batch.index} names image {unknown[0]!r}, which is not in the "
                                       "checked dataset", files=unknown)
        refs = tuple(PatchRef(r["image"], int(r["x"]), int(r["y"])) for r in batch.records)
        try:
            return crop_patches(self.folder, refs, self.patch_size)
        except ValueError as exc:  # a local file became unreadable or changed after the check
            raise LocalError(f"cutting HR from {self.root}: {exc}") from None


def config_from_info(info: Any, overrides_json: str = "") -> "DegradationConfig":
    """The degradation config a server resolves a request to (``config_json``; older servers: the default
    config plus the request's overrides)."""
    from server.degradation.config import DegradationConfig

    if info.config_json:
        return DegradationConfig.from_dict(json.loads(info.config_json))
    data = json.loads(info.default_config_json)
    if overrides_json:
        data.update(json.loads(overrides_json))
    return DegradationConfig.from_dict(data)


class WireSide:
    """The trainer's side of a wire mode: the server's config, and what ``complete`` makes locally."""

    def __init__(self, mode: str, cfg: "DegradationConfig", *, sharpener: Sharpener | None = None,
                 local_hr: LocalHR | None = None):
        self.mode, self.cfg, self.sharpener, self.local_hr = mode, cfg, sharpener, local_hr

    @classmethod
    def connect(cls, client: "DegradeClient") -> "WireSide":
        """Ask a server for its config (and, in mode 'lr', its dataset fingerprint) and check the local copy."""
        info = client.info(dataset_files=client.wire == "lr")
        cfg = config_from_info(info, client.config_overrides_json)
        sharpener = None
        if client.wire != "full" and client.local_usm:
            sharpener = Sharpener(cfg, client.sharpen_device)
        local_hr = None
        if client.wire == "lr":
            local_hr = LocalHR.verified(client.hr_root, info, cfg.patch_size)
            log.info("local dataset copy %s matches the server's (%d files, fingerprint %s...)", client.hr_root,
                     len(local_hr.names), local_hr.fingerprint[:16])
        return cls(client.wire, cfg, sharpener=sharpener, local_hr=local_hr)

    def complete(self, batch: "VideoBatch") -> "VideoBatch":
        """Fill in what the wire mode left out (HR cut locally, the sharpened HR). Errors are LocalError."""
        try:
            if self.local_hr is not None:
                batch.hr = self.local_hr.crop(batch)
            if self.sharpener is not None and batch.hr is not None:
                batch.hr_usm = self.sharpener.uint8(batch.hr)
        except LocalError:
            raise
        except Exception as exc:  # noqa: BLE001 - no other server can fix a local failure: stop with the reason
            raise LocalError(f"making batch {batch.index} locally ({self.mode}) failed: {exc}") from exc
        return batch
