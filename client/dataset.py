"""``DegradeDataset``: a torch ``IterableDataset`` of shuffled training batches.

    ds = DegradeDataset(["gpu-box:50051"], seed=0, batch_size=12, pool_size=384)
    for lr, hr, hr_usm, records in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
        ...  # uint8 NCHW tensors; divide by 255 on the GPU

``wire="lr-hr"`` (LR + HR over the network, the sharpened HR made in the
worker) or ``wire="lr", hr_root=DIR`` (LR + records, HR cut from the local
copy of the dataset) send many times fewer bytes (``client.wire``);
``sharpen_device=None`` yields ``hr_usm=None`` for a training loop that
sharpens on its GPU with ``client.wire.Sharpener(cfg, "cuda").targets(hr)``.

Worker-aware: with ``num_workers`` DataLoader workers (and ``world_size``
ranks), each worker streams its own shard of every epoch's video batches
(indices ``shard, shard + shards, ...``), so together they see every patch of
an epoch exactly once.  Each worker opens its own connections (gRPC channels
do not survive a fork).  Use ``batch_size=None`` in the DataLoader: batches
are made here, from the shuffle pool.
"""

from __future__ import annotations

from itertools import count
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shuffle import ShuffleBuffer, TrainingBatch


def to_tensor(arr: np.ndarray | None, pin: bool) -> torch.Tensor | None:
    """uint8 NHWC array -> uint8 NCHW tensor (contiguous; pinned if asked and CUDA exists)."""
    if arr is None:
        return None
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return t.pin_memory() if pin and torch.cuda.is_available() else t


class DegradeDataset(IterableDataset):
    """Training batches ``(lr, hr, hr_usm, records)`` from degrade-servers (or a local engine).

    ``addresses=None`` uses an in-process engine on the built-in sample data
    (``local_kwargs`` go to :class:`client.local.LocalSource`).
    ``epochs=None`` streams forever.
    """

    def __init__(self, addresses: str | Sequence[str] | None = None, *, seed: int = 0, batch_size: int = 12,
                 pool_size: int = 384, start_epoch: int = 0, epochs: int | None = None, token: str | None = None,
                 tls: Any = None, include_hr_usm: bool = True, pin_memory: bool = False, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, client_kwargs: dict | None = None,
                 local_kwargs: dict | None = None, wire: str = "full", hr_root: str | None = None,
                 sharpen_device: str | None = "cpu"):
        super().__init__()
        self.addresses = addresses
        self.seed, self.batch_size, self.pool_size = seed, batch_size, pool_size
        self.start_epoch, self.epochs = start_epoch, epochs
        self.token, self.tls = token, tls
        self.include_hr_usm = include_hr_usm
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.client_kwargs = client_kwargs or {}
        self.local_kwargs = local_kwargs or {}
        self.wire, self.hr_root, self.sharpen_device = wire, hr_root, sharpen_device
        if addresses is not None:
            from .wire import check_wire

            check_wire(wire, hr_root)  # a clear error now, not in a DataLoader worker

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + wid, self.world_size * workers

    def _source(self):
        if self.addresses is None:
            from .local import LocalSource

            return LocalSource(include_hr=True, include_hr_usm=self.include_hr_usm, **self.local_kwargs)
        from .client import DegradeClient

        return DegradeClient(self.addresses, token=self.token, tls=self.tls, include_hr=True,
                             include_hr_usm=self.include_hr_usm, wire=self.wire, hr_root=self.hr_root,
                             sharpen_device=self.sharpen_device, **self.client_kwargs)

    def batches(self) -> Iterator[TrainingBatch]:
        """Training batches as numpy arrays (what ``__iter__`` turns into tensors)."""
        shard = self._shard()
        buf = ShuffleBuffer(self.pool_size, self.batch_size, seed=(self.seed * 1_000_003 + shard[0]) & 0xFFFFFFFF)
        source = self._source()
        try:
            epochs = count(self.start_epoch) if self.epochs is None else range(self.start_epoch,
                                                                               self.start_epoch + self.epochs)
            for e in epochs:
                for vb in source.epoch(self.seed, e, shard=shard):
                    yield from buf.add(vb.lr, vb.hr, vb.hr_usm, vb.records)
            yield from buf.drain(drop_last=self.drop_last)
        finally:
            source.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[dict]]]:
        for tb in self.batches():
            yield (to_tensor(tb.lr, self.pin_memory), to_tensor(tb.hr, self.pin_memory),
                   to_tensor(tb.hr_usm, self.pin_memory), tb.records)
