"""A made batch as ``degrade.v1.PairChunk`` messages, written straight in protobuf's wire format.

Building ``pb.PairChunk`` objects and serializing them copies every tensor
several times (``tobytes``, the message's own copy, ``CopyFrom``, the
serialization): ~2.6 ms of the server's main process per MB sent.  Here each
chunk is one ``bytes`` object made by a single ``b"".join`` of a few small
headers and the batch arrays' own memory, so each tensor byte is copied once
on its way to gRPC (which is given the bytes as they are: the StreamBatches
handler has no response serializer).  The bytes are the ones the generated
class would write for the same fields, in field order
(``tests/test_chunks.py`` parses them with it and compares, for every wire mode
and chunk split).

Proto3 encoding used (https://protobuf.dev/programming-guides/encoding/):
a field is ``key = field_number << 3 | wire_type`` as a varint, then a varint
(wire type 0) or a varint length and that many bytes (wire type 2); fields
equal to their default are left out; ``repeated uint32`` is packed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from server.degradation.engine import BatchResult

#: PairChunk field numbers (proto/degrade/v1/degrade.proto)
SEED, EPOCH, BATCH_INDEX, BATCH_SIZE, FIRST_PATCH = 1, 2, 3, 4, 5
LR, HR, HR_USM, PATCH_IDS, RECORDS_JSON, LAST_CHUNK, BATCH_ERROR, DATASET_FINGERPRINT = 6, 7, 8, 9, 10, 11, 12, 13
SHARED_MEMORY_PROBE, SLOT = 14, 15
#: Tensor field numbers
T_DTYPE, T_SHAPE, T_DATA = 1, 2, 3

_VARINT, _LEN = 0, 2
#: room left in a chunk for its own fields, and per patch for its id and framing (as the old builder had)
CHUNK_OVERHEAD, PATCH_OVERHEAD = 4096, 64


def varint(n: int) -> bytes:
    """``n`` >= 0 as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def uint_field(field: int, value: int) -> bytes:
    """A varint field; nothing for 0 (proto3 leaves defaults out)."""
    return key(field, _VARINT) + varint(int(value)) if value else b""


def len_field(field: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) with its payload."""
    return key(field, _LEN) + varint(len(payload)) + payload


def string_field(field: int, text: str) -> bytes:
    return len_field(field, text.encode()) if text else b""


def tensor_parts(field: int, arr: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A ``Tensor`` field holding ``arr``: (everything before the data bytes, the array to append as they are)."""
    arr = np.ascontiguousarray(arr)
    head = string_field(T_DTYPE, str(arr.dtype))
    if arr.ndim:
        head += len_field(T_SHAPE, b"".join(varint(d) for d in arr.shape))
    if arr.nbytes:
        head += key(T_DATA, _LEN) + varint(arr.nbytes)
    return key(field, _LEN) + varint(len(head) + arr.nbytes) + head, arr


@dataclass(frozen=True)
class Chunk:
    """One serialized PairChunk and what the metrics count of it."""

    data: bytes
    patches: int        # patches in it
    tensor_bytes: int   # bytes of its tensors
    last: bool          # the batch's final chunk


def _patch_fields(result: BatchResult) -> tuple[list[bytes], list[str], list[bytes]]:
    """Per patch: its encoded id field, its record as JSON text, and that record's encoded field."""
    ids = [string_field(PATCH_IDS, r["patch_id"]) for r in result.records]
    records = [json.dumps(r, separators=(",", ":"), default=str) for r in result.records]
    return ids, records, [string_field(RECORDS_JSON, r) for r in records]


def slot_chunk(result: BatchResult, slot: bytes, *, dataset_fingerprint: str = "") -> bytes:
    """The one PairChunk of a batch whose tensors are in a shared-memory slot (``slot``: a serialized
    ``SharedSlot``): ids, records and the slot, no tensor bytes (server/service/slots.py)."""
    ids, _, encoded = _patch_fields(result)
    head = (uint_field(SEED, result.seed) + uint_field(EPOCH, result.epoch)
            + uint_field(BATCH_INDEX, result.batch_index) + uint_field(BATCH_SIZE, len(result)))
    return b"".join([head, *ids, *encoded, uint_field(LAST_CHUNK, 1),
                     string_field(DATASET_FINGERPRINT, dataset_fingerprint), len_field(SLOT, slot)])


def batch_chunks(result: BatchResult, *, include_hr: bool, include_hr_usm: bool, max_chunk_bytes: int,
                 dataset_fingerprint: str = "") -> Iterator[Chunk]:
    """Split one batch into serialized PairChunks of whole patches below ``max_chunk_bytes``
    (at least one patch each)."""
    n = len(result)
    tensors = [(LR, result.lr)]
    if include_hr and result.hr is not None:
        tensors.append((HR, result.hr))
    if include_hr_usm and result.hr_usm is not None:
        tensors.append((HR_USM, result.hr_usm))
    ids, records, encoded = _patch_fields(result)
    per_patch = sum(arr[0].nbytes for _, arr in tensors)
    head = (uint_field(SEED, result.seed) + uint_field(EPOCH, result.epoch)
            + uint_field(BATCH_INDEX, result.batch_index) + uint_field(BATCH_SIZE, n))
    tail = string_field(DATASET_FINGERPRINT, dataset_fingerprint)
    budget = max_chunk_bytes - CHUNK_OVERHEAD
    lo = 0
    while lo < n:
        hi, size = lo, 0
        while hi < n and (hi == lo or size + per_patch + len(records[hi]) + PATCH_OVERHEAD <= budget):
            size += per_patch + len(records[hi]) + PATCH_OVERHEAD
            hi += 1
        parts: list = [head, uint_field(FIRST_PATCH, lo)]
        nbytes = 0
        for field, arr in tensors:
            prefix, data = tensor_parts(field, arr[lo:hi])
            parts += (prefix, data)
            nbytes += data.nbytes
        parts += ids[lo:hi]
        parts += encoded[lo:hi]
        if hi == n:
            parts.append(uint_field(LAST_CHUNK, 1))
        parts.append(tail)
        yield Chunk(b"".join(parts), hi - lo, nbytes, hi == n)
        lo = hi
