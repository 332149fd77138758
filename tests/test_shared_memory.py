"""Same-host delivery through shared-memory slots (server/service/slots.py, client/shared_memory.py).

Real servers on port 0, real photographs, real /dev/shm files: the arrays that
arrive through slots are the bytes that arrive over the socket, the socket
carries only records, a slot is given back or times out, and a client killed
while it holds slots leaks nothing and stalls nobody.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import DegradeClient
from client.protocol import degrade_pb2 as pb
from client.protocol import degrade_pb2_grpc as pbg
from client.shared_memory import SharedMemoryReader, SlotError, read_slot
from server.pipeline import shared_result
from server.service.slots import SlotTable

pytestmark = pytest.mark.skipif(not os.path.isdir(shared_result.SHM_DIR), reason="needs /dev/shm")

SEED = 11
ROOT = Path(__file__).resolve().parents[1]


def slot_files(pid: int | None = None) -> set[str]:
    """Our slot and batch files in /dev/shm (of process ``pid``'s tree when given)."""
    names = {n for n in os.listdir(shared_result.SHM_DIR) if n.startswith(("degrade-slot-", "degrade-batch-"))}
    return names if pid is None else {n for n in names if n.split("-")[2] == str(pid)}


def wait_until(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def pull(address: str, epoch: int = 0, **kw) -> tuple[list, DegradeClient]:
    with DegradeClient(address, group_size=2, **kw) as client:
        return list(client.epoch(SEED, epoch, ordered=True)), client


def assert_same(a: list, b: list) -> None:
    assert [x.index for x in a] == [x.index for x in b] and a
    for x, y in zip(a, b):
        assert x.patch_ids == y.patch_ids and x.records == y.records
        for name in ("lr", "hr", "hr_usm"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None)
            if u is not None:
                assert u.dtype == v.dtype == np.uint8 and u.shape == v.shape and u.tobytes() == v.tobytes()


# --- the slot table alone ------------------------------------------------------
def test_probe_token_proves_the_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_result, "SHM_DIR", str(tmp_path))
    table = SlotTable()
    path = table.probe_path()
    assert path and Path(path).parent == tmp_path and (Path(path).stat().st_mode & 0o777) == 0o600
    token = Path(path).read_bytes()
    assert table.verify(token) and not table.verify(b"") and not table.verify(bytes(32))
    assert not table.verify(token[:-1])
    reader = SharedMemoryReader()
    assert reader.learn("a:1", path) and reader.token("a:1") == token
    assert not reader.learn("b:1", str(tmp_path / "gone")) and reader.token("b:1") == b""
    assert "bytes" in reader.describe("b:1") and reader.describe("a:1") == "shared memory"
    table.close()
    assert not Path(path).exists()


def test_slots_are_released_expired_and_bounded_per_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_result, "SHM_DIR", str(tmp_path))
    now = [0.0]
    expired = []
    table = SlotTable(timeout=5, per_stream=2, on_expired=expired.append, clock=lambda: now[0])
    arr = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)

    def leased(stream: int) -> int:
        f = shared_result.write_arrays([("lr", arr)], tag="slot")
        assert f.take()
        return table.lease(f, stream)

    a, b, c = leased(1), leased(1), leased(2)
    assert len(os.listdir(tmp_path)) == 3 and table.held(1) == 2 and table.leased == 3
    assert not table.wait_for_room(1, stop=lambda: True)  # full: waits (and gives up when told to stop)
    assert table.wait_for_room(2, stop=lambda: True)
    assert table.release([a, a, 12345]) == 1  # repeated and unknown leases are ignored
    assert table.wait_for_room(1, stop=lambda: True) and len(os.listdir(tmp_path)) == 2
    now[0] = 4.9
    assert table.expire() == 0
    now[0] = 5.0
    assert table.expire() == 2 and expired == [2] and os.listdir(tmp_path) == [] and table.leased == 0
    assert table.release([b, c]) == 0  # too late: already gone
    d = leased(3)
    assert table.release_stream(3) == 1 and table.release([d]) == 0 and os.listdir(tmp_path) == []


def test_read_slot_refuses_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_result, "SHM_DIR", str(tmp_path))
    arr = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    f = shared_result.write_arrays([("lr", arr)], tag="slot")
    good = pb.SharedSlot(kind="file", path=f.path, size=f.size, tensors=[
        pb.SlotTensor(name="lr", dtype="uint8", shape=[2, 4, 4, 3], offset=0)])
    arrays, nbytes = read_slot(good, 2)
    assert nbytes == arr.nbytes and arrays["lr"].tobytes() == arr.tobytes()
    arrays["lr"][:] = 0  # writable and private: the file keeps its bytes
    assert read_slot(good, 2)[0]["lr"].tobytes() == arr.tobytes()
    bad = [
        pb.SharedSlot(kind="cuda-ipc", path=f.path, size=f.size, tensors=good.tensors),
        pb.SharedSlot(kind="file", path=str(tmp_path / "nope"), size=f.size, tensors=good.tensors),
        pb.SharedSlot(kind="file", path=f.path, size=f.size + 1, tensors=good.tensors),
        pb.SharedSlot(kind="file", path=f.path, size=f.size, tensors=[
            pb.SlotTensor(name="lr", dtype="uint8", shape=[2, 4, 4, 3], offset=8)]),
        pb.SharedSlot(kind="file", path=f.path, size=f.size, tensors=[
            pb.SlotTensor(name="hr", dtype="uint8", shape=[2, 4, 4, 3], offset=0)]),
    ]
    for slot in bad:
        with pytest.raises(SlotError):
            read_slot(slot, 2)
    with pytest.raises(SlotError):
        read_slot(good, 3)  # the batch announced 3 patches
    f.remove()


# --- a real server -------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["batch", "split"])
def test_every_mode_delivers_the_same_bytes_and_shared_memory_sends_only_records(make_server, pipeline):
    srv, address = make_server(pipeline=pipeline)
    bytes_full, plain = pull(address, shared_memory=False)
    shm_full, shm = pull(address)
    assert plain.stats.shared_batches == 0
    # the client read the probe GetInfo named before its first stream: every batch came through a slot
    assert shm.stats.shared_batches == len(shm_full) > 0
    assert_same(bytes_full, shm_full)
    lr_hr, _ = pull(address, wire="lr-hr")
    assert_same(bytes_full, lr_hr)
    # over the socket: about the records (~1 kB per pair here), not the ~800 kB of pixels per pair
    shared = [b for b in shm_full if b.wire_bytes < 10_000 * len(b)]
    assert len(shared) == shm.stats.shared_batches
    assert max(b.wire_bytes / len(b) for b in shared) < 2048
    assert min(b.wire_bytes / len(b) for b in bytes_full) > 2 * 360 * 360 * 3
    m = srv.metrics
    assert m.shared_batches._value.get() == shm.stats.shared_batches + _.stats.shared_batches
    # every slot given back: nothing left leased, no file of the server's left in /dev/shm
    assert wait_until(lambda: srv.service.shared.leased == 0, 10)
    assert wait_until(lambda: not slot_files(os.getpid()), 10), slot_files(os.getpid())


def test_opt_out_on_the_server_sends_bytes(make_server):
    srv, address = make_server(shared_memory=False)
    got, client = pull(address)
    assert got and client.stats.shared_batches == 0 and srv.service.shared is None


def test_a_wrong_token_or_an_unreadable_probe_gets_bytes(make_server):
    srv, address = make_server()
    stub = pbg.DegraderStub(grpc.insecure_channel(address))
    req = pb.BatchRequest(seed=SEED, epoch=0, index_list=pb.IndexList(indices=[0]), include_hr=True,
                          include_hr_usm=True, shared_memory=True, shared_memory_token=b"x" * 32)
    chunks = list(stub.StreamBatches(req))
    assert chunks[0].shared_memory_probe and not any(c.HasField("slot") for c in chunks)
    assert all(not c.shared_memory_probe for c in chunks[1:]) and chunks[0].lr.data
    # a client that cannot open the probe (another host, another /dev/shm) keeps getting bytes
    probe = Path(chunks[0].shared_memory_probe)
    saved = probe.read_bytes()
    probe.unlink()
    try:
        got, client = pull(address)
        assert got and client.stats.shared_batches == 0 and client.shm.token(address) == b""
    finally:
        probe.write_bytes(saved)
    # with the right token: one message per batch, naming its slot
    req.shared_memory_token = saved
    chunks = list(stub.StreamBatches(req))
    assert len(chunks) == 1 and chunks[0].HasField("slot") and not chunks[0].HasField("lr")
    slot = chunks[0].slot
    assert {t.name for t in slot.tensors} == {"lr", "hr", "hr_usm"} and Path(slot.path).exists()
    assert stub.ReleaseSlots(pb.SlotRelease(leases=[slot.lease])).released == 1
    assert not Path(slot.path).exists()
    assert stub.ReleaseSlots(pb.SlotRelease(leases=[slot.lease])).released == 0


def test_a_slot_never_given_back_times_out(make_server):
    srv, address = make_server(slot_seconds=1.0)
    stub = pbg.DegraderStub(grpc.insecure_channel(address))
    token = b""
    for _ in range(2):  # the first call learns the probe
        req = pb.BatchRequest(seed=SEED, epoch=0, index_list=pb.IndexList(indices=[1]), include_hr=True,
                              shared_memory=True, shared_memory_token=token)
        chunks = list(stub.StreamBatches(req))
        if chunks[0].shared_memory_probe:
            token = Path(chunks[0].shared_memory_probe).read_bytes()
    slot = chunks[0].slot
    assert Path(slot.path).exists() and {t.name for t in slot.tensors} == {"lr", "hr"}
    assert wait_until(lambda: not Path(slot.path).exists(), 15)
    assert srv.metrics.slots_expired._value.get() == 1 and srv.service.shared.leased == 0


KILLED_CLIENT = textwrap.dedent("""
    import sys, time, grpc
    from pathlib import Path
    from client.protocol import degrade_pb2 as pb, degrade_pb2_grpc as pbg
    stub = pbg.DegraderStub(grpc.insecure_channel(sys.argv[1]))
    first = next(iter(stub.StreamBatches(pb.BatchRequest(seed=11, epoch=0, index_list=pb.IndexList(indices=[0]),
                                                       shared_memory=True, include_hr=True))))
    token = Path(first.shared_memory_probe).read_bytes()
    call = stub.StreamBatches(pb.BatchRequest(seed=11, epoch=0, index_list=pb.IndexList(indices=[0, 1, 2, 3]),
                                              shared_memory=True, shared_memory_token=token, include_hr=True))
    got = next(call)
    print(got.slot.path, flush=True)
    time.sleep(600)  # holds its slot, never gives it back: killed here
""")


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_client_killed_or_stopped_holding_slots_leaks_nothing_and_stalls_nobody(make_server, how):
    srv, address = make_server(slot_seconds=3.0)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, address], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        path = Path(proc.stdout.readline().strip())
        assert path.name and path.exists()
        assert wait_until(lambda: srv.service.shared.leased >= 1, 10)
        os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        # killed: its stream ends and its slots go at once; stopped: they time out (--slot-seconds)
        assert wait_until(lambda: not path.exists(), 20), f"{path} still held after the client was {how}ed"
        assert wait_until(lambda: srv.service.shared.leased == 0, 20)
        if how == "stop":
            assert srv.metrics.slots_expired._value.get() >= 1
        # the server goes on serving everyone else, through slots
        got, client = pull(address, epoch=1)
        assert got and client.stats.shared_batches > 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert wait_until(lambda: srv.service.shared.leased == 0, 10)
