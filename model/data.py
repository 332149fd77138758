"""The trainer's data: a deterministic, exactly resumable stream of training batches.

Video batches are taken in index order, epoch after epoch, from a
``DegradeClient`` (one or many servers) or a ``LocalSource`` (in-process
engine), and go through the shuffle pool.  Given (seed, pool size, batch size)
the stream is a pure function, and its position is small: the epoch, the
video batches consumed in it, and the *identities* of the pairs waiting in the
pool - any server can remake them, so a checkpoint holds no pixels.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import numpy as np

from client.shuffle import ShuffleBuffer, TrainingBatch


class TrainingStream:
    """Training batches from ``source`` (``epoch(seed, e, indices=..., ordered=True)`` + ``num_batches``)."""

    def __init__(self, source: Any, *, seed: int, batch_size: int, pool_size: int, shard: tuple[int, int] = (0, 1)):
        self.source = source
        self.seed = seed
        self.shard = shard
        self.buffer = ShuffleBuffer(pool_size, batch_size, seed=seed)
        self.epoch = 0
        self.consumed = 0  # video batches of ``epoch`` already in the pool
        self._ready: deque[TrainingBatch] = deque()
        self.video_batches = 0

    def _indices(self, epoch: int) -> list[int]:
        i, n = self.shard
        return list(range(i, self.source.num_batches(self.seed, epoch), n))

    def __iter__(self) -> Iterator[TrainingBatch]:
        while True:
            while self._ready:
                yield self._ready.popleft()
            indices = self._indices(self.epoch)[self.consumed:]
            if not indices:
                self.epoch, self.consumed = self.epoch + 1, 0
                continue
            for vb in self.source.epoch(self.seed, self.epoch, indices=indices, ordered=True):
                # add the whole video batch before yielding, so the state between yields is consistent
                self._ready.extend(self.buffer.add(vb.lr, vb.hr, vb.hr_usm, vb.records))
                self.consumed = self._indices_position(vb.index) + 1
                self.video_batches += 1
                while self._ready:
                    yield self._ready.popleft()
            self.epoch, self.consumed = self.epoch + 1, 0

    def _indices_position(self, index: int) -> int:
        i, n = self.shard
        return (index - i) // n

    # ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "buffer": self.buffer.state_dict(),
                "ready": [tb.records for tb in self._ready], "shard": list(self.shard), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or tuple(state["shard"]) != tuple(self.shard):
            raise ValueError(f"the checkpoint's data stream is seed {state['seed']} shard {state['shard']}; "
                             f"this run is seed {self.seed} shard {list(self.shard)}")
        cache: dict[tuple[int, int], Any] = {}

        def fetch(epoch: int, index: int):
            if (epoch, index) not in cache:
                cache[(epoch, index)] = next(iter(self.source.epoch(self.seed, epoch, indices=[index], ordered=True)))
            return cache[(epoch, index)]

        self.buffer.load_state_dict(state["buffer"], fetch)
        self._ready = deque()
        for records in state["ready"]:
            parts = [fetch(r["epoch"], r["batch_index"]) for r in records]
            idx = [r["index_in_batch"] for r in records]

            def stack(name: str):
                arrays = [getattr(p, name) for p in parts]
                return None if arrays[0] is None else np.stack([a[i] for a, i in zip(arrays, idx)])

            self._ready.append(TrainingBatch(stack("lr"), stack("hr"), stack("hr_usm"), list(records)))
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
