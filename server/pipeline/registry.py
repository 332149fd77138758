"""Which pipeline makes the batches: ``--pipeline auto|split|batch``.

* ``batch`` (``server.pipeline.batch.BatchProducer``): every worker process makes whole
  batches on the CPU; with a GPU engine it runs in-process, one batch at a time.
* ``split`` (``server.pipeline.split.SplitProducer``): one device stage owns
  the engine's device for the image stages; a pool on the other cores decodes
  HR images and runs the codecs; arrays travel in shared memory.
* ``auto``: ``split`` when the engine's device is not the CPU, else ``batch``
  (on a CPU-only machine the whole-batch path is today's and the faster one:
  its workers run the image stages on every core).

Both give the same bytes for the same (seed, epoch, batch index, config, codec plan).
"""

from __future__ import annotations

from server.codecs import CodecBackend
from server.degradation.config import DegradationConfig
from server.degradation.images import ImageFolder

from .batch import BatchProducer

PIPELINES = ("auto", "split", "batch")


def resolve_pipeline(pipeline: str, device: str) -> str:
    """``auto`` -> ``split`` on a GPU, ``batch`` on the CPU; the others as given."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if pipeline == "auto":
        return "batch" if str(device) == "cpu" else "split"
    return pipeline


def make_producer(folder: ImageFolder, cfg: DegradationConfig, *, pipeline: str = "auto", device: str = "cpu",
                  workers: int | None = None, backend: CodecBackend | None = None, keep_precodec: bool = False,
                  time_stages: bool = False, prefetch: int | None = None, cpus: int | None = None) -> BatchProducer:
    """The producer of ``pipeline`` (resolved for ``device``), with the same interface either way.
    ``cpus``: the CPU budget in cores it sizes its pool to (default: this process's, see
    ``server.degradation.cpu_budget``)."""
    kind = resolve_pipeline(pipeline, str(device))
    kw = dict(workers=workers, device=str(device), backend=backend, keep_precodec=keep_precodec,
              time_stages=time_stages, prefetch=prefetch, cpus=cpus)
    if kind == "split":
        from .split import SplitProducer

        return SplitProducer(folder, cfg, **kw)
    return BatchProducer(folder, cfg, **kw)


def add_pipeline_argument(parser) -> None:
    """The ``--pipeline`` flag, the same on every command that makes batches."""
    parser.add_argument("--pipeline", choices=PIPELINES, default="auto",
                        help="auto (default): split on a GPU, batch on the CPU; split: image stages in one device "
                             "stage, HR decoding and codecs on a pool of the other cores, shared memory between; "
                             "batch: each worker makes whole batches")


__all__ = ["PIPELINES", "add_pipeline_argument", "make_producer", "resolve_pipeline"]
