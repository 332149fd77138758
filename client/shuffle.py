"""The training-pair pool: video batches in, shuffled training batches out.

A video batch holds patches that went through one codec at one setting, and
neighbouring patches of one photograph; training on it as it comes would give
correlated batches.  Real-ESRGAN keeps a pool of pairs and swaps random ones
out; this is the same idea as a bounded shuffle buffer: every incoming pair
replaces a random resident once the pool is full, and the evicted pairs form
the training batches.  Memory is fixed up front: the pool and one output
batch, allocated on the first pair (shapes are known from then on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


@dataclass
class TrainingBatch:
    """``batch_size`` pairs drawn from the pool: uint8 NHWC arrays and their records."""

    lr: np.ndarray
    hr: np.ndarray | None
    hr_usm: np.ndarray | None
    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.records)


class ShuffleBuffer:
    """A pool of ``capacity`` pairs; :meth:`add` returns training batches as they fill."""

    def __init__(self, capacity: int, batch_size: int, seed: int = 0):
        if capacity < 0 or batch_size < 1:
            raise ValueError("capacity must be >= 0 and batch_size >= 1")
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._pool: dict[str, np.ndarray] = {}
        self._records: list[Any] = [None] * self.capacity
        self._n = 0  # residents
        self._out: dict[str, np.ndarray] = {}
        self._out_records: list[Any] = []

    def __len__(self) -> int:
        return self._n

    def _allocate(self, arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            self._pool[name] = np.empty((self.capacity, *arr.shape[1:]), arr.dtype)
            self._out[name] = np.empty((self.batch_size, *arr.shape[1:]), arr.dtype)

    def _emit_one(self, arrays: dict[str, np.ndarray], i: int, record: Any) -> TrainingBatch | None:
        j = len(self._out_records)
        for name, arr in arrays.items():
            self._out[name][j] = arr[i]
        self._out_records.append(record)
        if len(self._out_records) == self.batch_size:
            return self._flush()
        return None

    def _flush(self) -> TrainingBatch:
        n = len(self._out_records)
        got = {name: arr[:n].copy() for name, arr in self._out.items()}
        records, self._out_records = self._out_records, []
        return TrainingBatch(got["lr"], got.get("hr"), got.get("hr_usm"), records)

    def add(self, lr: np.ndarray, hr: np.ndarray | None, hr_usm: np.ndarray | None,
            records: list[Any]) -> Iterator[TrainingBatch]:
        """Offer the pairs of one video batch; yields every training batch completed meanwhile."""
        arrays = {"lr": lr}
        if hr is not None:
            arrays["hr"] = hr
        if hr_usm is not None:
            arrays["hr_usm"] = hr_usm
        if len(records) != len(lr) or any(len(a) != len(lr) for a in arrays.values()):
            raise ValueError("lr, hr, hr_usm and records must have one entry per pair")
        if not self._out:
            self._allocate(arrays)
        elif set(arrays) != set(self._out) or any(a.shape[1:] != self._out[k].shape[1:] for k, a in arrays.items()):
            raise ValueError("every video batch must carry the same arrays with the same patch shapes")
        for i in range(len(lr)):
            if self._n < self.capacity:  # filling up: keep it
                for name, arr in arrays.items():
                    self._pool[name][self._n] = arr[i]
                self._records[self._n] = records[i]
                self._n += 1
                continue
            if self.capacity == 0:  # no pool: pass through in order
                out = self._emit_one(arrays, i, records[i])
            else:  # evict a random resident, the newcomer takes its slot
                slot = int(self._rng.integers(self.capacity))
                out = self._emit_one(self._pool, slot, self._records[slot])
                for name, arr in arrays.items():
                    self._pool[name][slot] = arr[i]
                self._records[slot] = records[i]
            if out is not None:
                yield out

    def drain(self, drop_last: bool = False) -> Iterator[TrainingBatch]:
        """Empty the pool in random order (end of a finite run)."""
        order = self._rng.permutation(self._n)
        for slot in order:
            out = self._emit_one(self._pool, int(slot), self._records[int(slot)])
            if out is not None:
                yield out
        self._n = 0
        self._records = [None] * self.capacity
        if self._out_records and not drop_last:
            yield self._flush()
        self._out_records = []

    # ------------------------------------------------------------------
    # Exact resume without saving pixels: a pair is identified by its record
    # (epoch, video batch, index in batch), and any server can remake its batch.
    def state_dict(self) -> dict[str, Any]:
        """The pool's identity: RNG state and the records of residents and of the half-filled batch."""
        return {"rng": self._rng.bit_generator.state, "residents": list(self._records[:self._n]),
                "pending": list(self._out_records), "capacity": self.capacity, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any], fetch) -> None:
        """Rebuild the pool from ``state``; ``fetch(epoch, batch_index)`` returns that video batch
        (anything with ``lr``, ``hr``, ``hr_usm``), fetched once per batch."""
        if (state["capacity"], state["batch_size"]) != (self.capacity, self.batch_size):
            raise ValueError(f"saved pool is capacity {state['capacity']} / batch {state['batch_size']}, "
                             f"this one {self.capacity} / {self.batch_size}")
        needed = sorted({(r["epoch"], r["batch_index"]) for r in state["residents"] + state["pending"]})
        batches = {key: fetch(*key) for key in needed}
        self._out_records, self._n = [], 0
        self._records = [None] * self.capacity

        def arrays_of(rec: dict[str, Any]) -> dict[str, np.ndarray]:
            vb = batches[(rec["epoch"], rec["batch_index"])]
            return {k: v for k, v in (("lr", vb.lr), ("hr", vb.hr), ("hr_usm", vb.hr_usm)) if v is not None}

        for rec in state["residents"] + state["pending"]:
            arrays = arrays_of(rec)
            if not self._out:
                self._allocate(arrays)
            i = rec["index_in_batch"]
            if self._n < len(state["residents"]):
                for name, arr in arrays.items():
                    self._pool[name][self._n] = arr[i]
                self._records[self._n] = rec
                self._n += 1
            else:
                self._emit_one(arrays, i, rec)
        self._rng.bit_generator.state = state["rng"]
