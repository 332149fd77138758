"""Validation of service requests: every check happens before any work.

A request that cannot be served as sent raises :class:`RequestError`, whose
message says what to change; the service turns it into INVALID_ARGUMENT.
Nothing here trusts the Python client: the limits hold for any peer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from server.degradation.config import ConfigError, DegradationConfig
from server.degradation.epoch_plan import EpochPlan

#: Largest accepted config-overrides JSON text.
MAX_OVERRIDES_BYTES = 16 * 1024
#: Largest accepted index list (an epoch of a big dataset has a few thousand batches).
MAX_INDICES = 100_000
#: Keys a request may not override: they fix the dataset geometry (the image folder was
#: scanned for this patch size) or bound the cost of a batch (filter sizes).
FIXED_KEYS = ("scale", "patch_size", "usm_radius", "kernel_pad_to", "final_sinc_size")
#: Default and largest chunk message, in bytes (gRPC's default receive limit is 4 MiB).
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024


class RequestError(ValueError):
    """A request that cannot be served as sent; the message says what to change."""


@dataclass(frozen=True)
class BatchJob:
    """A validated StreamBatches request."""

    seed: int
    epoch: int
    indices: tuple[int, ...]
    include_hr: bool
    include_hr_usm: bool
    cfg: DegradationConfig
    max_chunk_bytes: int
    shared_memory: bool = False      # the client asks for same-host delivery (server/service/slots.py)
    shared_memory_token: bytes = b""  # its proof: the bytes of the server's probe file


def resolve_config(base: DegradationConfig, overrides_json: str, *, max_video_batch: int) -> DegradationConfig:
    """The server's config with a request's JSON overrides applied (validated)."""
    if not overrides_json:
        return base
    if len(overrides_json.encode("utf-8", "replace")) > MAX_OVERRIDES_BYTES:
        raise RequestError(f"config_overrides_json is {len(overrides_json)} characters; at most "
                           f"{MAX_OVERRIDES_BYTES} bytes are accepted")
    try:
        overrides = json.loads(overrides_json)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"config_overrides_json is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(overrides, dict):
        raise RequestError("config_overrides_json must be a JSON object of config keys, e.g. "
                           '{"codec_probs": [0, 0, 1, 0]}')
    if not overrides:
        return base
    fixed = sorted(set(overrides) & set(FIXED_KEYS))
    if fixed:
        raise RequestError(f"config key(s) {', '.join(fixed)} are fixed by the server (dataset geometry and "
                           "filter sizes); start a server with --config to change them")
    try:
        # the request's profile (or the server's) first, then the server's own departures
        # from that profile's defaults, then the request's keys
        profile = overrides.get("profile", base.profile)
        if not isinstance(profile, str):
            raise ConfigError(f"profile must be a string, got {str(profile)[:40]!r}")
        server_defaults = DegradationConfig.for_profile(base.profile).to_dict()
        custom = {k: v for k, v in base.to_dict().items() if server_defaults[k] != v and k != "profile"}
        cfg = DegradationConfig.for_profile(profile, **{**custom, **overrides})
    except ConfigError as exc:
        raise RequestError(str(exc)) from None
    if cfg.video_batch_size > max_video_batch or cfg.first_batch_range[1] > max_video_batch:
        raise RequestError(f"video batches larger than {max_video_batch} patches are not served "
                           f"(video_batch_size={cfg.video_batch_size}, first_batch_range={list(cfg.first_batch_range)})")
    return cfg


def resolve_indices(which: str | None, index_list: Any, index_range: Any, num_batches: int, epoch: int) -> tuple[int, ...]:
    """The batch indices named by a request's ``indices`` oneof, checked against the epoch."""
    if which is None:
        raise RequestError("name the video batches wanted: set index_list (e.g. [0, 1, 2]) or "
                           f"index_range (start, stop); epoch {epoch} has {num_batches} batches")
    if which == "index_range":
        start, stop = int(index_range.start), int(index_range.stop)
        if not 0 <= start < stop <= num_batches:
            raise RequestError(f"index_range [{start}, {stop}) is not a non-empty range inside [0, {num_batches}): "
                               f"epoch {epoch} has {num_batches} video batches")
        return tuple(range(start, stop))
    indices = index_list.indices
    if len(indices) == 0:
        raise RequestError("index_list is empty: name at least one video batch")
    if len(indices) > min(MAX_INDICES, num_batches):
        raise RequestError(f"index_list has {len(indices)} entries but epoch {epoch} has only {num_batches} "
                           "video batches (each may be asked for once)")
    out = tuple(int(k) for k in indices)
    bad = [k for k in out if k >= num_batches]
    if bad:
        raise RequestError(f"batch index {bad[0]} is out of range: epoch {epoch} has {num_batches} video batches "
                           f"(valid indices are 0..{num_batches - 1})")
    if len(set(out)) != len(out):
        seen: set[int] = set()
        dup = next(k for k in out if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise RequestError(f"batch index {dup} appears more than once in index_list; ask for each batch once")
    return out


def validate_batch_request(req: Any, base: DegradationConfig, plan_for: Callable[[int, int, DegradationConfig], EpochPlan],
                           *, max_video_batch: int) -> BatchJob:
    """Turn a ``degrade.v1.BatchRequest`` into a :class:`BatchJob` or raise :class:`RequestError`."""
    cfg = resolve_config(base, req.config_overrides_json, max_video_batch=max_video_batch)
    plan = plan_for(int(req.seed), int(req.epoch), cfg)
    indices = resolve_indices(req.WhichOneof("indices"), req.index_list, req.index_range, plan.num_batches,
                              int(req.epoch))
    chunk = int(req.max_chunk_bytes) or DEFAULT_CHUNK_BYTES
    return BatchJob(seed=int(req.seed), epoch=int(req.epoch), indices=indices, include_hr=bool(req.include_hr),
                    include_hr_usm=bool(req.include_hr_usm), cfg=cfg, max_chunk_bytes=min(chunk, MAX_CHUNK_BYTES),
                    shared_memory=bool(req.shared_memory), shared_memory_token=bytes(req.shared_memory_token))
