"""Which backend runs each codec: software, hybrid (software encode + NVDEC)
or NVENC + NVDEC, chosen once at start-up from the probed hardware
(:class:`.nvcodec.HardwareCaps`), optional measured throughputs and an
optional override.  Pure logic: no codec library, no GPU needed.

Rules, per codec, when the choice is ``"auto"``:

1. Feasible backends: ``software`` always; ``hybrid`` when NVDEC decodes
   the codec; ``nvenc`` when NVENC encodes it (H.264 / HEVC only, spec
   section 6) and NVDEC decodes it.
2. With measured throughputs (frames/s per codec and backend, e.g. from
   ``benchmarks/nvcodec_speed.py``) for at least two feasible backends, the
   fastest measured one wins, but a hardware backend must beat software by
   ``min_gain`` (default 5 %) to be worth the GPU dependency; unmeasured
   backends are not candidates then (the benchmark measures all feasible
   ones).  With a one-worker-per-core engine the figure to feed is frames
   per CPU-second, not wall frames/s (see the benchmark).
3. Without measurements, the ``policy`` decides:
   ``"measured"`` (default): ``nvenc`` where feasible, else software - the
   hybrid only pays off where the CPU decoder is the bottleneck, which at
   90x90 frames has to be measured; ``"prefer-hardware"``: nvenc, else
   hybrid, else software; ``"software"``: software everywhere.

An override (``"software" | "hybrid" | "nvenc" | "auto"``, global or per
codec) forces a backend; one the GPU cannot run falls back to the automatic
choice with the reason in the plan (or raises with ``strict=True``), the
spec's "detect this once at start-up and use software encoding for that
run".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from server.degradation.video import CODECS, CodecError, VideoParams

from .base import CodecBackend

if TYPE_CHECKING:  # no torch / PyNvVideoCodec import at module load
    from .nvcodec import HardwareCaps

BACKENDS: tuple[str, ...] = ("software", "hybrid", "nvenc")
CHOICES: tuple[str, ...] = ("auto",) + BACKENDS
POLICIES: tuple[str, ...] = ("measured", "prefer-hardware", "software")
#: NVENC encodes only these (spec section 6); kept here so this module stays
#: import-light (same as ``nvcodec.NVENC_CODECS``).
NVENC_ENCODABLE: frozenset[str] = frozenset({"libx264", "libx265"})

#: Short names accepted in overrides.
CODEC_ALIASES: dict[str, str] = {
    "mpeg2": "mpeg2video",
    "mpeg2video": "mpeg2video",
    "mpeg4": "mpeg4",
    "h264": "libx264",
    "avc": "libx264",
    "x264": "libx264",
    "libx264": "libx264",
    "h265": "libx265",
    "hevc": "libx265",
    "x265": "libx265",
    "libx265": "libx265",
}


def canonical_codec(name: str) -> str:
    key = name.strip().lower()
    if key not in CODEC_ALIASES:
        raise ValueError(f"unknown codec {name!r}; use one of {', '.join(CODECS)} (or h264, hevc, mpeg2)")
    return CODEC_ALIASES[key]


def parse_override(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Normalise an override to ``{codec or "*": choice}``.

    Accepts ``None``, a choice (``"hybrid"``: every codec), a mapping, or a
    string like ``"auto,h264=nvenc,mpeg4=software"`` (a bare choice sets the
    default for the codecs not named).
    """
    if spec is None:
        return {}
    items: list[tuple[str, str]]
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                k, v = part.split("=", 1)
                items.append((k.strip(), v.strip()))
            else:
                items.append(("*", part))
    out: dict[str, str] = {}
    for k, v in items:
        choice = v.strip().lower()
        if choice not in CHOICES:
            raise ValueError(f"backend {v!r} is not one of {', '.join(CHOICES)}")
        codec = "*" if k in ("*", "", "all", "default") else canonical_codec(k)
        out[codec] = choice
    return out


@dataclass(frozen=True)
class CodecChoice:
    """The backend chosen for one codec and why."""

    codec: str
    backend: str
    reason: str
    requested: str = "auto"


@dataclass(frozen=True)
class BackendPlan:
    """Per-codec backends for a run, with a start-up explanation."""

    choices: Mapping[str, CodecChoice]
    hardware: str = ""
    policy: str = "measured"
    warnings: tuple[str, ...] = field(default_factory=tuple)
    #: the probe's own warnings (``HardwareCaps.warnings``), also in ``warnings``;
    #: the server lists them in GetInfo next to the backend names
    hardware_warnings: tuple[str, ...] = ()

    def backend_for(self, codec: str) -> str:
        return self.choices[codec].backend if codec in self.choices else "software"

    @property
    def backends_used(self) -> frozenset[str]:
        return frozenset(c.backend for c in self.choices.values())

    def explain(self) -> str:
        """Human-readable, one line per codec, for the start-up log."""
        lines = [f"codec backends ({self.hardware or 'no hardware info'}; policy {self.policy}):"]
        width = max(len(c) for c in self.choices) if self.choices else 0
        for codec, ch in self.choices.items():
            forced = "" if ch.requested == "auto" else f" [requested {ch.requested}]"
            lines.append(f"  {codec:<{width}} -> {ch.backend:<8} {ch.reason}{forced}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    __str__ = explain


def feasibility(caps: "HardwareCaps", codec: str) -> dict[str, str | None]:
    """``{backend: None if feasible else why not}`` for one codec."""
    out: dict[str, str | None] = {"software": None}
    if not caps.available:
        why = f"no hardware codecs ({caps.reason})"
        out["hybrid"] = why
        out["nvenc"] = why
        return out
    dec_note = caps.notes.get(f"decode:{codec}", "NVDEC cannot decode it")
    out["hybrid"] = None if caps.can_decode(codec) else dec_note
    if codec not in NVENC_ENCODABLE:
        out["nvenc"] = "NVENC encodes only H.264 and HEVC"
    elif not caps.can_encode(codec):
        out["nvenc"] = caps.notes.get(f"encode:{codec}", "NVENC cannot encode it")
    elif not caps.can_decode(codec):
        out["nvenc"] = f"NVENC can encode it but {dec_note}"
    else:
        out["nvenc"] = None
    return out


def _fmt_fps(v: float) -> str:
    return f"{v:.0f}"


def _auto(
    codec: str,
    feasible: Mapping[str, str | None],
    fps: Mapping[str, float],
    policy: str,
    min_gain: float,
) -> tuple[str, str]:
    ok = [b for b in BACKENDS if feasible.get(b) is None]
    measured = {b: float(fps[b]) for b in ok if b in fps and fps[b] is not None and fps[b] > 0}
    if len(measured) >= 2:
        best = max(measured, key=lambda b: measured[b])
        if best != "software" and "software" in measured:
            gain = measured[best] / measured["software"] - 1
            nums = f"{best} {_fmt_fps(measured[best])} vs software {_fmt_fps(measured['software'])} frames/s"
            if gain < min_gain:
                # a faster hardware option may still exist below the threshold; software wins
                return "software", f"measured: {nums} ({gain:+.0%}, below the {min_gain:.0%} needed)"
            return best, f"measured: {nums} ({gain:+.0%})"
        others = ", ".join(f"{b} {_fmt_fps(v)}" for b, v in measured.items() if b != best)
        return best, f"measured fastest: {best} {_fmt_fps(measured[best])} frames/s (vs {others})"
    if policy == "software":
        return "software", "policy: software"
    if "nvenc" in ok:
        return "nvenc", "NVENC + NVDEC available"
    if policy == "prefer-hardware" and "hybrid" in ok:
        return "hybrid", f"policy prefer-hardware: NVDEC decodes it; no nvenc: {feasible['nvenc']}"
    if "hybrid" in ok:
        return "software", f"hybrid possible but not measured faster; no nvenc: {feasible['nvenc']}"
    return "software", feasible["hybrid"] or "software"


def select_backends(
    caps: "HardwareCaps",
    throughput: Mapping[str, Mapping[str, float]] | None = None,
    override: str | Mapping[str, str] | None = None,
    *,
    policy: str = "measured",
    min_gain: float = 0.05,
    strict: bool = False,
    codecs: tuple[str, ...] = CODECS,
) -> BackendPlan:
    """Choose a backend per codec (see the module docstring).

    ``throughput``: ``{codec: {backend: frames_per_s}}`` (any subset).
    ``override``: see :func:`parse_override`.  ``strict``: raise
    ``ValueError`` when an override asks for a backend the hardware cannot
    run, instead of falling back.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    wanted = parse_override(override)
    measured = {canonical_codec(k): dict(v) for k, v in (throughput or {}).items()}
    for k, v in measured.items():
        unknown = set(v) - set(BACKENDS)
        if unknown:
            raise ValueError(f"throughput for {k} names unknown backends {sorted(unknown)}")

    choices: dict[str, CodecChoice] = {}
    warnings: list[str] = list(caps.warnings)
    for codec in codecs:
        requested = wanted.get(codec, wanted.get("*", "auto"))
        feasible = feasibility(caps, codec)
        if requested != "auto":
            why_not = feasible[requested]
            if why_not is None:
                choices[codec] = CodecChoice(codec, requested, "requested", requested)
                continue
            msg = f"{codec}: {requested} requested but unavailable ({why_not})"
            if strict:
                raise ValueError(msg)
            backend, reason = _auto(codec, feasible, measured.get(codec, {}), policy, min_gain)
            warnings.append(f"{msg}; using {backend}")
            choices[codec] = CodecChoice(codec, backend, f"{requested} unavailable; auto: {reason}", requested)
            continue
        backend, reason = _auto(codec, feasible, measured.get(codec, {}), policy, min_gain)
        choices[codec] = CodecChoice(codec, backend, reason, requested)
    return BackendPlan(choices=choices, hardware=caps.summary(), policy=policy, warnings=tuple(warnings),
                       hardware_warnings=tuple(caps.warnings))


class PlanBackend(CodecBackend):
    """Dispatches each codec to the backend its :class:`BackendPlan` chose;
    records that backend's name (``label``)."""

    name = "auto"

    def __init__(self, plan: BackendPlan, backends: Mapping[str, CodecBackend]) -> None:
        missing = plan.backends_used - set(backends)
        if missing:
            raise ValueError(f"plan uses backends {sorted(missing)} that were not given")
        self.plan = plan
        self.backends = dict(backends)

    def _pick(self, codec: str) -> CodecBackend:
        return self.backends[self.plan.backend_for(codec)]

    def supports(self, codec: str) -> bool:
        return codec in self.plan.choices and self._pick(codec).supports(codec)

    def label(self, codec: str) -> str:
        return self._pick(codec).label(codec)

    def roundtrip(self, frames: Any, params: VideoParams) -> Any:
        backend = self._pick(params.codec)
        if not backend.supports(params.codec):
            raise CodecError(f"{params.codec}: planned backend {backend.name} cannot run it")
        return backend.roundtrip(frames, params)


def build_backend(
    caps: "HardwareCaps | None" = None,
    throughput: Mapping[str, Mapping[str, float]] | None = None,
    override: str | Mapping[str, str] | None = None,
    *,
    policy: str = "measured",
    device: Any = None,
    strict: bool = False,
) -> tuple[PlanBackend, BackendPlan]:
    """Probe (unless ``caps`` is given), plan, and build the dispatching
    backend; hardware backends are constructed only if the plan uses them."""
    from .nvcodec import NvCodecBackend, probe_hardware
    from .software import SoftwareBackend

    if caps is None:
        caps = probe_hardware()
    plan = select_backends(caps, throughput, override, policy=policy, strict=strict)
    backends: dict[str, CodecBackend] = {"software": SoftwareBackend()}
    if "hybrid" in plan.backends_used:
        backends["hybrid"] = NvCodecBackend(caps, encode="software", device=device)
    if "nvenc" in plan.backends_used:
        backends["nvenc"] = NvCodecBackend(caps, encode="nvenc", device=device)
    return PlanBackend(plan, backends), plan


__all__ = [
    "BACKENDS",
    "BackendPlan",
    "CHOICES",
    "CodecChoice",
    "POLICIES",
    "PlanBackend",
    "build_backend",
    "canonical_codec",
    "feasibility",
    "parse_override",
    "select_backends",
]
