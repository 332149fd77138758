"""An in-process source with the client's interface: the engine on this machine, no server.

For trainers that run alone (the sample data by default) and for tests; the
batches are the same bytes a server with the same dataset and config sends.
"""

from __future__ import annotations

from itertools import count
from pathlib import Path
from typing import Iterator, Sequence

from .client import VideoBatch


class LocalSource:
    """Makes video batches with a local producer (``server.pipeline.registry.make_producer``): on a GPU
    the split pipeline (image stages on the device, codecs on the other cores), else worker processes."""

    def __init__(self, images: str | Path | None = None, *, cfg=None, workers: int | None = None,
                 device: str = "cpu", include_hr: bool = True, include_hr_usm: bool = True,
                 pipeline: str = "auto"):
        from server.degradation.config import DegradationConfig
        from server.degradation.images import ImageFolder
        from server.degradation.sample_data import ensure_sample_data
        from server.pipeline.registry import make_producer

        self.cfg = cfg or DegradationConfig()
        root = Path(images) if images is not None else ensure_sample_data()
        self.folder = ImageFolder(root, self.cfg.patch_size)
        self.producer = make_producer(self.folder, self.cfg, pipeline=pipeline, workers=workers, device=str(device))
        self.include_hr = include_hr
        self.include_hr_usm = include_hr_usm
        self.failures: list[tuple[int, int, str]] = []

    def degradation_config(self):
        """The config the batches are made with (as ``DegradeClient.degradation_config``)."""
        return self.cfg

    def num_batches(self, seed: int, epoch: int) -> int:
        return self.producer.plan(seed, epoch).num_batches

    def epoch(self, seed: int, epoch: int, *, indices: Sequence[int] | None = None,
              shard: tuple[int, int] = (0, 1), ordered: bool = True) -> Iterator[VideoBatch]:
        """Like ``DegradeClient.epoch``; always in order (one producer)."""
        if indices is None:
            indices = range(shard[0], self.num_batches(seed, epoch), shard[1])
        indices = list(indices)
        done = set()
        for r in self.producer.produce(seed, epoch, indices, want_hr=self.include_hr, want_usm=self.include_hr_usm):
            done.add(r.batch_index)
            yield VideoBatch(seed, epoch, r.batch_index, r.lr, r.hr, r.hr_usm, r.records,
                             [rec["patch_id"] for rec in r.records], "local")
        for k in indices:
            if k not in done:
                self.failures.append((epoch, k, self.producer.failure_reason(epoch, k) or "unknown"))

    def epochs(self, seed: int, start_epoch: int = 0, *, shard: tuple[int, int] = (0, 1),
               ordered: bool = True) -> Iterator[VideoBatch]:
        for e in count(start_epoch):
            yield from self.epoch(seed, e, shard=shard)

    def close(self) -> None:
        self.producer.close()
