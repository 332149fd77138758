"""The hand-written PairChunk bytes (server/service/chunks.py) are what the generated class writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.protocol import degrade_pb2 as pb
from server.degradation.engine import BatchResult
from server.service.chunks import batch_chunks, varint

FINGERPRINT = "ab" * 32


def reference_chunks(result: BatchResult, include_hr: bool, include_hr_usm: bool, max_chunk_bytes: int,
                     fingerprint: str) -> list[pb.PairChunk]:
    """The chunks as the service built them before, with the generated class (the same split rule)."""
    def tensor(arr: np.ndarray) -> pb.Tensor:
        return pb.Tensor(dtype=str(arr.dtype), shape=list(arr.shape), data=np.ascontiguousarray(arr).tobytes())

    n = len(result)
    records = [json.dumps(r, separators=(",", ":"), default=str) for r in result.records]
    per_patch = result.lr[0].nbytes + (result.hr[0].nbytes if include_hr else 0) \
        + (result.hr_usm[0].nbytes if include_hr_usm else 0)
    budget, out, lo = max_chunk_bytes - 4096, [], 0
    while lo < n:
        hi, size = lo, 0
        while hi < n and (hi == lo or size + per_patch + len(records[hi]) + 64 <= budget):
            size += per_patch + len(records[hi]) + 64
            hi += 1
        msg = pb.PairChunk(seed=result.seed, epoch=result.epoch, batch_index=result.batch_index, batch_size=n,
                           first_patch=lo, lr=tensor(result.lr[lo:hi]),
                           patch_ids=[r["patch_id"] for r in result.records[lo:hi]], records_json=records[lo:hi],
                           last_chunk=hi == n, dataset_fingerprint=fingerprint)
        if include_hr:
            msg.hr.CopyFrom(tensor(result.hr[lo:hi]))
        if include_hr_usm:
            msg.hr_usm.CopyFrom(tensor(result.hr_usm[lo:hi]))
        out.append(msg)
        lo = hi
    return out


def fake_batch(n: int, seed: int, epoch: int, index: int, hr: int = 24, scale: int = 4) -> BatchResult:
    rng = np.random.default_rng(n * 1000 + index)
    lr_size = hr // scale
    records = [{"patch_id": f"e{epoch}/dir/ph\u00f6to {i}.png/{8 * i}_{4 * i}", "image": f"ph\u00f6to {i}.png",
                "x": 8 * i, "y": 4 * i, "codec": "libx264", "crf": 20 + i, "sigma": 0.1 * i, "note": "\u00e9" * i}
               for i in range(n)]
    return BatchResult(seed=seed, epoch=epoch, batch_index=index,
                       lr=rng.integers(0, 256, (n, lr_size, lr_size, 3), dtype=np.uint8),
                       hr=rng.integers(0, 256, (n, hr, hr, 3), dtype=np.uint8),
                       hr_usm=rng.integers(0, 256, (n, hr, hr, 3), dtype=np.uint8), records=records)


MODES = {"full": (True, True), "lr-hr": (True, False), "lr": (False, False), "lr+usm": (False, True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("max_chunk_bytes", [1, 4096 + 2500, 4096 + 9000, 4 << 20])  # 1 patch .. all in one chunk
@pytest.mark.parametrize("ids", [(0, 0, 0, ""), (7, 3, 11, FINGERPRINT), (2**64 - 1, 2**40, 2**32 - 1, "x")])
def test_chunks_equal_the_generated_class_field_by_field_and_byte_for_byte(mode, max_chunk_bytes, ids):
    include_hr, include_usm = MODES[mode]
    seed, epoch, index, fp = ids
    result = fake_batch(7, seed, epoch, index)
    ours = list(batch_chunks(result, include_hr=include_hr, include_hr_usm=include_usm,
                             max_chunk_bytes=max_chunk_bytes, dataset_fingerprint=fp))
    ref = reference_chunks(result, include_hr, include_usm, max_chunk_bytes, fp)
    assert len(ours) == len(ref) >= 1
    if max_chunk_bytes == 1:
        assert len(ours) == 7  # below one patch: one patch per chunk
    if max_chunk_bytes == 4 << 20:
        assert len(ours) == 1
    for chunk, want in zip(ours, ref):
        got = pb.PairChunk.FromString(chunk.data)
        for field in pb.PairChunk.DESCRIPTOR.fields:
            name = field.name
            if field.message_type is not None:
                assert got.HasField(name) == want.HasField(name), name
                if field.message_type.name != "Tensor":
                    continue  # the shared-memory slot: never in a chunk of bytes
                for sub in ("dtype", "shape", "data"):
                    assert getattr(getattr(got, name), sub) == getattr(getattr(want, name), sub), (name, sub)
            else:
                assert getattr(got, name) == getattr(want, name), name
        assert got == want
        assert chunk.data == want.SerializeToString(deterministic=True)  # field order too: the same bytes
        assert chunk.patches == len(want.patch_ids)
        assert chunk.last == want.last_chunk
        assert chunk.tensor_bytes == len(want.lr.data) + len(want.hr.data) + len(want.hr_usm.data)
    # the patches of all chunks together are the batch's arrays
    lr = np.concatenate([np.frombuffer(pb.PairChunk.FromString(c.data).lr.data, np.uint8) for c in ours])
    assert lr.tobytes() == result.lr.tobytes()


def test_non_contiguous_arrays_are_sent_in_row_major_order():
    result = fake_batch(4, 1, 2, 3)
    result.hr = np.asfortranarray(result.hr)
    (chunk,) = batch_chunks(result, include_hr=True, include_hr_usm=False, max_chunk_bytes=4 << 20)
    got = pb.PairChunk.FromString(chunk.data)
    assert got.hr.data == np.ascontiguousarray(result.hr).tobytes()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32 - 1, 2**63, 2**64 - 1])
def test_varint_matches_protobuf(n):
    msg = pb.PairChunk(seed=n)
    assert msg.SerializeToString() == (b"\x08" + varint(n) if n else b"")


def test_a_slot_chunk_is_the_generated_class_and_merges_with_the_probe():
    from server.service.chunks import SHARED_MEMORY_PROBE, slot_chunk, string_field

    result = fake_batch(5, 3, 2, 9)
    slot = pb.SharedSlot(kind="file", path="/dev/shm/x", lease=2**64 - 1, size=123, timeout_ms=60_000,
                         tensors=[pb.SlotTensor(name="lr", dtype="uint8", shape=[5, 4, 4, 3], offset=0)])
    data = slot_chunk(result, slot.SerializeToString(), dataset_fingerprint=FINGERPRINT)
    want = pb.PairChunk(seed=3, epoch=2, batch_index=9, batch_size=5, last_chunk=True,
                        patch_ids=[r["patch_id"] for r in result.records], dataset_fingerprint=FINGERPRINT,
                        records_json=[json.dumps(r, separators=(",", ":")) for r in result.records], slot=slot)
    got = pb.PairChunk.FromString(data)
    assert got == want and not got.HasField("lr") and got.slot.lease == 2**64 - 1
    # the probe goes in front of a stream's first message: serialized messages concatenate as a merge
    merged = pb.PairChunk.FromString(string_field(SHARED_MEMORY_PROBE, "/dev/shm/probe") + data)
    assert merged.shared_memory_probe == "/dev/shm/probe" and merged.slot == slot
