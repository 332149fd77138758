"""The degradation config: one frozen dataclass whose defaults are the spec.

Every probability and range of ``shared/spec/DEGRADATION.md`` lives here and
nowhere else.  Two profiles exist:

* ``vcisr`` (default): the paper, with Real-ESRGAN where the paper is silent.
* ``vcisr-code``: the departures of the authors' public code (spec section 7).

A config is built from defaults, then a profile, then a TOML/YAML file, then
explicit overrides; unknown keys are rejected with a message naming the key.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .video import CODECS, PRESETS

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
#: Kernel type codes used in tensors; ``sinc`` is the extra code 6.
SINC = len(KERNEL_TYPES)
KERNEL_NAMES = KERNEL_TYPES + ("sinc",)

RESIZE_MODES = ("area", "bilinear", "bicubic")
PROFILES = ("vcisr", "vcisr-code")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class DegradationConfig:
    """All knobs of the VCISR x4 degradation model (spec sections 1-7)."""

    profile: str = "vcisr"

    # --- sizes (section 1-2) ---
    scale: int = 4
    patch_size: int = 360
    video_batch_size: int = 128
    first_batch_range: tuple[int, int] = (32, 128)

    # --- HR target (section 1) ---
    usm_radius: int = 50  # Real-ESRGAN USMSharp(radius=50): a 51-tap Gaussian, sigma 8
    usm_weight: float = 0.5
    usm_threshold: float = 10.0  # on the 0-255 scale

    # --- blur kernels (section 5) ---
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_pad_to: int = 21
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob1: float = 0.1
    sinc_prob2: float = 0.1
    blur_sigma1: tuple[float, float] = (0.2, 3.0)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_sinc_size: int = 21

    # --- first order (section 3) ---
    resize_probs1: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range1: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob1: float = 0.5
    noise_sigma1: tuple[float, float] = (1.0, 30.0)
    poisson_scale1: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob1: float = 0.4
    jpeg_range1: tuple[int, int] = (30, 95)

    # --- second order (section 4) ---
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_sigma2: tuple[float, float] = (1.0, 25.0)
    poisson_scale2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    v2_prob: float = 0.95  # video ending; else the Real-ESRGAN (V1) ending

    # --- video block (section 6) ---
    codec_probs: tuple[float, float, float, float] = (0.2, 0.2, 0.4, 0.2)  # order of CODECS
    bitrate_kbps: tuple[int, int] = (4000, 6000)
    crf_x264: tuple[int, int] = (20, 32)
    crf_x265: tuple[int, int] = (25, 37)
    preset_probs: tuple[float, ...] = (0.1, 0.5, 0.25, 0.12, 0.03)  # order of PRESETS
    fps_range: tuple[int, int] = (16, 30)
    mpeg2_fps: int = 25
    aspect_shrink_prob: float = 0.2
    aspect_shrink_range: tuple[float, float] = (0.85, 1.0)
    aspect_expand_prob: float = 0.4
    aspect_expand_range: tuple[float, float] = (1.0, 1.35)
    mpeg2_aspect: bool = False

    # --- implementation choices (spec section 3.4 allows the JPEG swap) ---
    #: auto = libjpeg-turbo on the CPU, kornia's DiffJPEG on a GPU (no host round trip inside the
    #: device stage); libjpeg | diffjpeg force one everywhere.  The record names the one that ran.
    jpeg_impl: str = "auto"

    # --- reference-code quirks (section 7) ---
    kernel_per_batch: bool = False
    resize2_relative_to_current: bool = False

    # ------------------------------------------------------------------
    @property
    def lr_size(self) -> int:
        return self.patch_size // self.scale

    def __post_init__(self) -> None:
        problems = []
        if self.profile not in PROFILES:
            problems.append(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.scale < 1 or self.patch_size % self.scale:
            problems.append(f"patch_size ({self.patch_size}) must be a multiple of scale ({self.scale})")
        if not 2 <= self.lr_size <= 4096:
            problems.append(f"LR size {self.lr_size} out of range [2, 4096]")
        if not 1 <= self.video_batch_size <= 1024:
            problems.append(f"video_batch_size must be in [1, 1024], got {self.video_batch_size}")
        lo, hi = self.first_batch_range
        if not 1 <= lo <= hi <= 1024:
            problems.append(f"first_batch_range must satisfy 1 <= lo <= hi <= 1024, got {self.first_batch_range}")
        if any(k % 2 == 0 or k > self.kernel_pad_to for k in self.kernel_sizes):
            problems.append(f"kernel_sizes must be odd and <= kernel_pad_to ({self.kernel_pad_to})")
        for name, probs, n in (
            ("kernel_probs", self.kernel_probs, len(self.kernel_types)),
            ("resize_probs1", self.resize_probs1, 3),
            ("resize_probs2", self.resize_probs2, 3),
            ("codec_probs", self.codec_probs, len(CODECS)),
            ("preset_probs", self.preset_probs, len(PRESETS)),
        ):
            if len(probs) != n or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                problems.append(f"{name} must be {n} non-negative numbers summing to 1, got {probs}")
        for name in (
            "sinc_prob1", "sinc_prob2", "second_blur_prob", "final_sinc_prob",
            "gaussian_noise_prob1", "gray_noise_prob1", "gaussian_noise_prob2",
            "gray_noise_prob2", "v2_prob", "aspect_shrink_prob", "aspect_expand_prob",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be a probability in [0, 1], got {v}")
        if self.aspect_shrink_prob + self.aspect_expand_prob > 1.0 + 1e-9:
            problems.append("aspect_shrink_prob + aspect_expand_prob must not exceed 1")
        for name in (
            "blur_sigma1", "blur_sigma2", "betag_range", "betap_range", "resize_range1",
            "resize_range2", "noise_sigma1", "noise_sigma2", "poisson_scale1", "poisson_scale2",
            "jpeg_range1", "jpeg_range2", "bitrate_kbps", "crf_x264", "crf_x265", "fps_range",
            "aspect_shrink_range", "aspect_expand_range",
        ):
            r = getattr(self, name)
            if len(r) != 2 or r[0] > r[1]:
                problems.append(f"{name} must be a [low, high] pair with low <= high, got {r}")
        if not (1 <= self.jpeg_range1[0] and self.jpeg_range1[1] <= 100 and 1 <= self.jpeg_range2[0] and self.jpeg_range2[1] <= 100):
            problems.append("JPEG qualities must lie in [1, 100]")
        if not 0 < self.resize_range1[0] <= 1 <= self.resize_range1[1] <= 4:
            problems.append(f"resize_range1 must satisfy 0 < low <= 1 <= high <= 4, got {self.resize_range1}")
        if not 0 < self.resize_range2[0] <= 1 <= self.resize_range2[1] <= 4:
            problems.append(f"resize_range2 must satisfy 0 < low <= 1 <= high <= 4, got {self.resize_range2}")
        if self.jpeg_impl not in ("auto", "libjpeg", "diffjpeg"):
            problems.append(f"jpeg_impl must be 'auto', 'libjpeg' or 'diffjpeg', got {self.jpeg_impl!r}")
        if not (1 <= self.fps_range[0] and self.fps_range[1] <= 240):
            problems.append(f"fps_range must lie in [1, 240], got {self.fps_range}")
        if not 1 <= self.mpeg2_fps <= 240:
            problems.append(f"mpeg2_fps must lie in [1, 240], got {self.mpeg2_fps}")
        if not self.kernel_sizes or min(self.kernel_sizes) < 1:
            problems.append(f"kernel_sizes must be a non-empty list of odd sizes >= 1, got {self.kernel_sizes}")
        unknown_types = [t for t in self.kernel_types if t not in KERNEL_TYPES]
        if unknown_types or len(set(self.kernel_types)) != len(self.kernel_types):
            problems.append(f"kernel_types must be distinct names from {KERNEL_TYPES}, got {self.kernel_types}")
        # ranges whose sign matters (checked only when they are well-formed pairs, reported above otherwise)
        for name, low, high in (
            ("blur_sigma1", 1e-3, 100.0), ("blur_sigma2", 1e-3, 100.0), ("betag_range", 1e-2, 100.0),
            ("betap_range", 1e-2, 100.0), ("noise_sigma1", 0.0, 255.0), ("noise_sigma2", 0.0, 255.0),
            ("poisson_scale1", 0.0, 100.0), ("poisson_scale2", 0.0, 100.0), ("bitrate_kbps", 1, 1_000_000),
            ("crf_x264", 0, 51), ("crf_x265", 0, 51), ("aspect_shrink_range", 0.25, 1.0),
            ("aspect_expand_range", 1.0, 4.0),
        ):
            r = getattr(self, name)
            if len(r) == 2 and not low <= r[0] <= r[1] <= high:
                problems.append(f"{name} must lie in [{low}, {high}], got {r}")
        if not 0.0 <= self.usm_weight <= 10.0 or not 0.0 <= self.usm_threshold <= 255.0 or self.usm_radius < 0:
            problems.append("usm_weight must lie in [0, 10], usm_threshold in [0, 255] and usm_radius be >= 0")
        if problems:
            raise ConfigError("invalid degradation config: " + "; ".join(problems))

    # ------------------------------------------------------------------
    @classmethod
    def for_profile(cls, profile: str = "vcisr", **overrides: Any) -> "DegradationConfig":
        """Defaults, then the profile's departures, then ``overrides`` (validated)."""
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        base: dict[str, Any] = {"profile": profile}
        if profile == "vcisr-code":
            base.update(PROFILE_VCISR_CODE)
        base.update(overrides)
        return cls.from_dict(base)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DegradationConfig":
        """Build from a mapping; unknown keys and wrong types are rejected."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join(unknown)}; valid keys are: {', '.join(sorted(known))}"
            )
        defaults = cls()
        kwargs: dict[str, Any] = {}
        if data.get("profile") == "vcisr-code":
            kwargs.update(PROFILE_VCISR_CODE)  # explicit keys below still win
        for key, value in data.items():
            kwargs[key] = _coerce(key, value, getattr(defaults, key))
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "DegradationConfig":
        """Load a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, then apply overrides."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = tomllib.loads(text)
        except Exception as exc:  # noqa: BLE001 - parser errors have many types
            raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        data = dict(data.get("degradation", data))
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path | None = None, profile: str = "vcisr") -> "DegradationConfig":
        """A command line's config: the profile's defaults, or the file with a non-default
        ``profile`` winning over the file's (the file's keys over the profile's)."""
        if path is None:
            return cls.for_profile(profile)
        return cls.from_file(path, **({"profile": profile} if profile != "vcisr" else {}))

    def replace(self, **overrides: Any) -> "DegradationConfig":
        merged = self.to_dict()
        merged.update(overrides)
        return DegradationConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


#: The departures of the authors' public code (spec section 7).
PROFILE_VCISR_CODE: dict[str, Any] = {
    "kernel_per_batch": True,
    "resize2_relative_to_current": True,
    "bitrate_kbps": (3800, 5800),
    "aspect_shrink_range": (0.8, 1.0),
    "mpeg2_aspect": True,
    "first_batch_range": (32, 127),
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert file/JSON values (lists, ints for floats) to the field's type."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, tuple):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError
            items = list(value)
            if len(items) > 64:
                raise TypeError
            if default and all(isinstance(v, str) for v in default):
                return tuple(str(v) for v in items)
            if default and all(isinstance(v, int) for v in default):
                out = []
                for v in items:
                    if isinstance(v, bool) or float(v) != int(v):
                        raise TypeError
                    out.append(int(v))
                return tuple(out)
            if any(isinstance(v, bool) for v in items):
                raise TypeError
            return tuple(float(v) for v in items)
        if isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
            if not math.isfinite(v):
                raise TypeError
            return v
        if isinstance(default, str):
            if not isinstance(value, str) or len(value) > 64:
                raise TypeError
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    raise ConfigError(f"config key {key!r}: cannot use {str(value)[:80]!r} (expected a value like {default!r})")


def default_config() -> DegradationConfig:
    return DegradationConfig()


__all__ = [
    "CODECS",
    "ConfigError",
    "DegradationConfig",
    "KERNEL_NAMES",
    "KERNEL_TYPES",
    "PRESETS",
    "PROFILES",
    "RESIZE_MODES",
    "SINC",
    "default_config",
]
