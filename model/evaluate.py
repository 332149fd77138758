"""``grl-eval``: super-resolve a folder with a GRL-small checkpoint and measure it (also ``python -m model.evaluate``).

    grl-eval --checkpoint runs/l1/checkpoints/latest.pt --images lr/ --out sr/
    grl-eval --checkpoint gen.pt --images lr/ --references hr/ --per-image --json scores.json
    grl-eval --checkpoint gen.pt --images big/ --tile 256 --metrics niqe,clipiqa --device cuda

Checkpoints: a ``grl-train`` checkpoint (its saved ``model_overrides`` build the
network) or a bare GRL state_dict (also under ``params_ema``/``params``/
``model_state_dict``; ``--model-config`` for a non-default GRL).

Metrics, all on the SR output rounded to 8 bits (exactly what ``--out`` writes):

* no-reference, through pyiqa (the ``eval`` extra) - NIQE, BRISQUE, NRQM,
  CLIP-IQA, the metrics of the VCISR paper's tables.  Each needs a weight file
  that is never downloaded here: a missing one makes its metric unavailable
  with the file name, where pyiqa looks for it and the URL (see
  ``model/nr_metrics.py``); the others still run.
* full-reference, with ``--references`` (HR images with the same file names,
  or the same names with another image extension): PSNR and SSIM of
  ``model/quality.py`` on the Y channel (BT.601, ``--fr-space y``, the SR
  papers' convention) or on RGB (``--fr-space rgb``), with a border of
  ``scale`` pixels cropped (``--crop``).  An HR image up to ``scale - 1``
  pixels larger than the SR output (an HR size that was not a multiple of the
  scale) is cropped to it at the bottom/right.

Unreadable images are reported and skipped; gray, palette, RGBA and 16-bit
images are converted to 8-bit RGB.  Exit status: 0 when done (even with
skipped images or unavailable metrics), 2 for bad arguments, an unusable
checkpoint or a folder without images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .nr_metrics import DEFAULT_NR, NR_METRICS, create_metrics
from .quality import psnr, ssim

PROG = "grl-eval"
FR_METRICS = {"psnr": ("PSNR", 2), "ssim": ("SSIM", 4)}
_STATE_KEYS = ("generator", "params_ema", "params", "model_state_dict", "state_dict", "model")


class EvalError(Exception):
    """A problem the user has to fix (exit status 2)."""


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------
# the generator
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise EvalError(f"--device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda given but torch sees no CUDA GPU")
    return dev


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _torch_load(path: Path) -> Any:
    """Weights-only first; grl-train checkpoints also hold RNG and data states, which need the full
    unpickler (load only checkpoints you trust)."""
    for weights_only in (True, False):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as exc:  # noqa: BLE001 - any failure: the file is not a usable checkpoint
            error = exc
    raise EvalError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error


def load_generator(path: str | Path, overrides: dict | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The GRL-small generator of a checkpoint, in eval mode on ``device``, and a description of it."""
    from .grl import build_grl_small, clean_grl_state_dict

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    obj = _torch_load(path)
    model_overrides: dict[str, Any] = {}
    info: dict[str, Any] = {"path": str(path)}
    if isinstance(obj, dict) and obj.get("format") == "grl-train/1":
        if not _is_state_dict(obj.get("generator")):
            raise EvalError(f"checkpoint {path} is a grl-train checkpoint without generator weights")
        state = obj["generator"]
        cfg = obj.get("config") or {}
        model_overrides = dict(cfg.get("model_overrides") or {})
        info.update(format="grl-train/1", stage=cfg.get("stage"), iteration=obj.get("iteration"))
    elif _is_state_dict(obj):
        state = obj
        info["format"] = "state_dict"
    elif isinstance(obj, dict) and any(_is_state_dict(obj.get(k)) for k in _STATE_KEYS):
        key = next(k for k in _STATE_KEYS if _is_state_dict(obj.get(k)))
        state = obj[key]
        info["format"] = f"state_dict under {key!r}"
    else:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise EvalError(f"checkpoint {path} holds no GRL generator weights ({what})")
    model_overrides.update(overrides or {})
    info["model_overrides"] = model_overrides
    try:
        model = build_grl_small(**model_overrides)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise EvalError(f"GRL config {model_overrides} of {path} is not valid: {exc}") from exc
    state = clean_grl_state_dict(state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another GRL config
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise EvalError(f"{path} does not fit GRL-small {model_overrides or '(defaults)'} (another GRL config? "
                        f"give it with --model-config): {' '.join(lines[1:3]) or lines[0]}"
                        + (f" ... ({len(lines) - 1} mismatches)" if len(lines) > 3 else "")) from exc
    if missing or unexpected:
        raise EvalError(f"{path} does not fit GRL-small {model_overrides or '(defaults)'}: "
                        f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model.eval().to(device), info


@torch.no_grad()
def super_resolve(model: torch.nn.Module, lr: torch.Tensor, scale: int, tile: int = 0,
                  overlap: int = 16) -> torch.Tensor:
    """SR of ``lr`` (1, 3, h, w) in [0, 1], clamped to [0, 1].

    With ``tile`` > 0, the image is cut into ``tile`` x ``tile`` LR tiles; each is
    super-resolved with ``overlap`` LR pixels of context on every side (clipped at
    the image border) and only its own area is kept, so a model whose receptive
    field is within ``overlap`` gives exactly the untiled result.
    """
    h, w = lr.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        return model(lr).float().clamp_(0, 1)
    out = lr.new_zeros(lr.shape[0], lr.shape[1], h * scale, w * scale, dtype=torch.float32)
    s = scale
    for y0 in range(0, h, tile):
        y1 = min(y0 + tile, h)
        ya, yb = max(y0 - overlap, 0), min(y1 + overlap, h)
        for x0 in range(0, w, tile):
            x1 = min(x0 + tile, w)
            xa, xb = max(x0 - overlap, 0), min(x1 + overlap, w)
            sr = model(lr[..., ya:yb, xa:xb]).float()
            out[..., y0 * s:y1 * s, x0 * s:x1 * s] = sr[..., (y0 - ya) * s:(y1 - ya) * s, (x0 - xa) * s:(x1 - xa) * s]
    return out.clamp_(0, 1)


# ---------------------------------------------------------------------------
# images and metrics
def list_images(root: Path) -> list[Path]:
    from server.degradation.images import IMAGE_EXTENSIONS

    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(root).as_posix())


def find_reference(ref_root: Path, rel: Path) -> Path | None:
    """The HR image of ``rel``: the same relative name, else the same stem with another image extension."""
    from server.degradation.images import IMAGE_EXTENSIONS

    same = ref_root / rel
    if same.is_file():
        return same
    folder = (ref_root / rel).parent
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.stem == rel.stem and p.suffix.lower() in IMAGE_EXTENSIONS:
                return p
    return None


def to_tensor(rgb8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 -> float (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(rgb8, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1)[None].float().div_(255.0)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [16/255, 235/255] as MATLAB's ``rgb2ycbcr`` (the SR papers' Y channel), (N, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def full_reference(sr: torch.Tensor, hr: torch.Tensor, crop: int, space: str) -> dict[str, float]:
    """PSNR (dB) and SSIM of two same-size images (1, 3, H, W) in [0, 1]."""
    if space == "y":
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    return {"psnr": float(psnr(sr, hr, crop=crop)[0]), "ssim": float(ssim(sr, hr, crop=crop)[0])}


@dataclass
class ImageResult:
    name: str
    lr_size: tuple[int, int]                         # (width, height)
    sr_size: tuple[int, int]
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    note: str | None = None


# ---------------------------------------------------------------------------
# output
def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def summarize(results: list[ImageResult], metrics: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in metrics:
        vals = [r.scores[m] for r in results if _finite(r.scores.get(m))]
        out[m] = {"mean": float(np.mean(vals)) if vals else None, "n": len(vals)}
    return out


def _title(m: str) -> str:
    return FR_METRICS[m][0] if m in FR_METRICS else NR_METRICS[m].title


def _digits(m: str) -> int:
    return FR_METRICS[m][1] if m in FR_METRICS else NR_METRICS[m].digits


def format_table(results: list[ImageResult], columns: list[str], summary: dict[str, dict[str, Any]],
                 per_image: bool, unavailable: dict[str, str]) -> str:
    def cell(m: str, v: float | None) -> str:
        if m in unavailable:
            return "n/a"
        return f"{v:.{_digits(m)}f}" if _finite(v) else "-"

    header = ["image"] + [_title(m) for m in columns]
    rows = []
    if per_image:
        rows += [[r.name] + [cell(m, r.scores.get(m)) for m in columns] for r in results]
    mean_label = f"mean ({len(results)} image{'s' if len(results) != 1 else ''})"
    rows.append([mean_label] + [cell(m, summary[m]["mean"]) for m in columns])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    sep = "  ".join("-" * w for w in widths)
    out = [line(header), sep]
    if per_image:
        out += [line(r) for r in rows[:-1]] + [sep]
    out.append(line(rows[-1]))
    higher = [_title(m) for m in columns if m in FR_METRICS or not NR_METRICS[m].lower_better]
    lower = [_title(m) for m in columns if m in NR_METRICS and NR_METRICS[m].lower_better]
    legend = []
    if higher:
        legend.append("higher is better: " + ", ".join(higher))
    if lower:
        legend.append("lower is better: " + ", ".join(lower))
    if legend:
        out.append("; ".join(legend))
    partial = [f"{_title(m)} n={summary[m]['n']}" for m in columns
               if m not in unavailable and summary[m]["n"] < len(results)]
    if partial:
        out.append("means over fewer images (no reference or a metric failure): " + ", ".join(partial))
    out += [f"n/a {reason}" for reason in unavailable.values()]
    return "\n".join(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    epilog = "weight files of the no-reference metrics (never downloaded by grl-eval):\n" + "\n".join(
        f"  {name:8s} {wf.default_path()}\n           from {wf.url}" for name, spec in NR_METRICS.items()
        for wf in spec.files)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="grl-train checkpoint (e.g. runs/l1/checkpoints/latest.pt) or a GRL state_dict")
    p.add_argument("--images", type=Path, required=True, help="folder of LR images (searched recursively)")
    p.add_argument("--references", type=Path, default=None,
                   help="folder of HR images with the same names: adds PSNR and SSIM")
    p.add_argument("--out", type=Path, default=None, help="write the SR images here (PNG, same relative names)")
    p.add_argument("--metrics", default=",".join(DEFAULT_NR),
                   help=f"no-reference metrics, comma separated, from {','.join(NR_METRICS)} "
                        "(default: all; 'none' for none). PSNR/SSIM come with --references")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder holding the metrics' weight files (looked at before pyiqa's own cache)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--tile", type=int, default=0, help="super-resolve in LR tiles of this size (0: whole images)")
    p.add_argument("--tile-overlap", type=int, default=16, help="LR context pixels around each tile (default 16)")
    p.add_argument("--fr-space", choices=("y", "rgb"), default="y",
                   help="PSNR/SSIM on the Y channel (BT.601, default) or on RGB")
    p.add_argument("--crop", type=int, default=None, help="border cropped for PSNR/SSIM (default: the scale)")
    p.add_argument("--model-config", default=None,
                   help="JSON of GRL config overrides (for a bare state_dict of a non-default GRL)")
    p.add_argument("--per-image", action="store_true", help="a table row per image, not only the mean")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    return p


def _parse_metrics(text: str) -> list[str]:
    names = [] if text.strip().lower() in ("", "none") else [t.strip().lower() for t in text.split(",") if t.strip()]
    names = [n.replace("-", "") for n in names]  # clip-iqa -> clipiqa
    unknown = [n for n in names if n not in NR_METRICS]
    if unknown:
        fr = [n for n in unknown if n in FR_METRICS]
        hint = " (PSNR/SSIM are computed whenever --references is given)" if fr else ""
        raise EvalError(f"unknown metric(s) {unknown}: choose from {','.join(NR_METRICS)}{hint}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image
    from tqdm import tqdm

    from server.degradation.images import decode_rgb8

    nr_names = _parse_metrics(args.metrics)
    if args.tile < 0 or args.tile_overlap < 0:
        raise EvalError("--tile and --tile-overlap must be >= 0")
    if not args.images.is_dir():
        raise EvalError(f"image folder {args.images} does not exist or is not a folder")
    if args.out is not None and args.out.resolve() == args.images.resolve():
        raise EvalError("--out is the --images folder: the SR images would overwrite the inputs")
    if args.references is not None and not args.references.is_dir():
        raise EvalError(f"reference folder {args.references} does not exist or is not a folder")
    try:
        overrides = json.loads(args.model_config) if args.model_config else {}
    except json.JSONDecodeError as exc:
        raise EvalError(f"--model-config is not valid JSON: {exc}") from exc
    if not isinstance(overrides, dict):
        raise EvalError("--model-config must be a JSON object")
    device = resolve_device(args.device)
    model, info = load_generator(args.checkpoint, overrides, device)
    scale = int(getattr(model, "upscale", 4))
    crop = scale if args.crop is None else args.crop
    files = list_images(args.images)
    if not files:
        raise EvalError(f"no images (png, jpg, webp, bmp, tif, ...) in {args.images}")

    nr = create_metrics(nr_names, device, args.weights_dir)
    unavailable = {n: m.reason for n, m in nr.items() if not m.available}
    for reason in unavailable.values():
        _warn(f"metric unavailable - {reason}")
    fr_names = list(FR_METRICS) if args.references is not None else []
    columns = fr_names + nr_names

    results: list[ImageResult] = []
    skipped: list[dict[str, str]] = []
    no_reference: list[str] = []
    t_start = time.perf_counter()
    for path in tqdm(files, unit="img", desc=PROG, dynamic_ncols=True, disable=None, file=sys.stderr):
        rel = path.relative_to(args.images)
        name = rel.as_posix()
        try:
            lr8 = decode_rgb8(path)
        except ValueError as exc:
            skipped.append({"name": name, "reason": str(exc)})
            _warn(f"skipping {name}: {exc}")
            continue
        t0 = time.perf_counter()
        try:
            sr = super_resolve(model, to_tensor(lr8, device), scale, args.tile, args.tile_overlap)
        except torch.OutOfMemoryError as exc:
            reason = f"out of memory super-resolving {lr8.shape[1]}x{lr8.shape[0]} ({exc}); try --tile 256"
            skipped.append({"name": name, "reason": reason})
            _warn(f"skipping {name}: {reason}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        sr8 = sr[0].mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        res = ImageResult(name, (lr8.shape[1], lr8.shape[0]), (sr8.shape[1], sr8.shape[0]), seconds)
        if args.out is not None:
            dst = (args.out / rel).with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sr8).save(dst)
        sr_q = to_tensor(sr8, device)  # the 8-bit image: what --out holds is what is measured
        if fr_names:
            ref = find_reference(args.references, rel)
            if ref is None:
                no_reference.append(name)
                res.note = "no reference"
            else:
                res.reference = ref.relative_to(args.references).as_posix()
                try:
                    hr8 = decode_rgb8(ref)
                except ValueError as exc:
                    hr8 = None
                    res.note = f"reference unreadable: {exc}"
                    _warn(f"{name}: reference {res.reference} {exc}")
                if hr8 is not None:
                    (hh, hw), (sh, sw) = hr8.shape[:2], sr8.shape[:2]
                    if 0 <= hh - sh < scale and 0 <= hw - sw < scale:
                        res.scores.update(full_reference(sr_q, to_tensor(hr8[:sh, :sw], device), crop, args.fr_space))
                    else:
                        res.note = f"reference is {hw}x{hh}, the SR output {sw}x{sh}"
                        _warn(f"{name}: no PSNR/SSIM: {res.note}")
        for n, metric in nr.items():
            if metric.available:
                res.scores[n] = metric.score(sr_q)
        results.append(res)

    if not results:
        raise EvalError(f"none of the {len(files)} image(s) in {args.images} could be used: "
                        + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:5]))
    for n, metric in nr.items():
        if metric.error:
            _warn(f"{n} failed on some images (reported as '-'): {metric.error}")
    if no_reference:
        _warn(f"no reference image for {len(no_reference)} image(s): {', '.join(no_reference[:5])}"
              + (" ..." if len(no_reference) > 5 else ""))
    summary = summarize(results, columns)
    report = {
        "checkpoint": info,
        "device": str(device),
        "scale": scale,
        "images": str(args.images),
        "references": str(args.references) if args.references is not None else None,
        "out": str(args.out) if args.out is not None else None,
        "tile": args.tile,
        "tile_overlap": args.tile_overlap,
        "full_reference": ({"space": "Y (BT.601)" if args.fr_space == "y" else "RGB", "crop": crop}
                           if fr_names else None),
        "metrics": {m: {**summary[m], "available": m not in unavailable, "reason": unavailable.get(m),
                        "lower_better": (m in NR_METRICS and NR_METRICS[m].lower_better),
                        **({"error": nr[m].error} if m in nr and nr[m].error else {})}
                    for m in columns},
        "per_image": [{"name": r.name, "lr_size": list(r.lr_size), "sr_size": list(r.sr_size),
                       "seconds": r.seconds, "reference": r.reference, "note": r.note, **r.scores}
                      for r in results],
        "skipped": skipped,
        "seconds": time.perf_counter() - t_start,
    }
    print(format_table(results, columns, summary, args.per_image, unavailable))
    if fr_names:
        print(f"PSNR/SSIM on {report['full_reference']['space']}, border {crop} px cropped")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s): {', '.join(s['name'] for s in skipped)}")
    if args.out is not None:
        print(f"SR images written to {args.out}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except EvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
