"""The gRPC service against real servers on port 0: contract, exactly-once, failures, auth, shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import spawn_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import DegradeClient, DegradeError
from client.protocol import degrade_pb2 as pb
from client.protocol import degrade_pb2_grpc as pbg
from server.codecs import VideoRoundTrip
from server.degradation.config import DegradationConfig
from server.degradation.engine import Engine
from server.degradation.epoch_plan import make_epoch_plan
from server.degradation.images import ImageFolder

SEED = 7


def stub_for(address: str) -> pbg.DegraderStub:
    return pbg.DegraderStub(grpc.insecure_channel(address))


def small_cfg_from(path) -> DegradationConfig:
    return DegradationConfig.from_file(path)


# ---------------------------------------------------------------------------
def test_get_info_describes_the_dataset(make_server, photo_dir, service_cfg_file):
    srv, address = make_server()
    info = stub_for(address).GetInfo(pb.InfoRequest(seed=SEED, epoch=3))
    cfg = small_cfg_from(service_cfg_file)
    plan = make_epoch_plan(ImageFolder(photo_dir, cfg.patch_size).images, cfg, SEED, 3)
    assert info.batches_per_epoch == plan.num_batches >= 4
    assert info.patches_per_epoch == plan.num_patches == 7
    assert (info.scale, info.hr_patch_size, info.lr_patch_size) == (4, 360, 90)
    assert info.num_images == 5 and info.dataset_name == photo_dir.name
    assert "software" in info.codec_backends and info.device == "cpu"
    assert json.loads(info.default_config_json) == json.loads(cfg.to_json())
    assert info.max_streams == 8 and info.workers == 1


def test_full_epoch_arrives_exactly_once_with_engine_bytes(make_server, photo_dir, service_cfg_file):
    srv, address = make_server()
    cfg = small_cfg_from(service_cfg_file)
    folder = ImageFolder(photo_dir, cfg.patch_size)
    plan = make_epoch_plan(folder.images, cfg, SEED, 0)
    with DegradeClient(address, group_size=1) as client:
        batches = list(client.epoch(SEED, 0))
    ids = [i for b in batches for i in b.patch_ids]
    expected = [f"e0/{r.image}/{r.x}_{r.y}" for k in range(plan.num_batches) for r in plan.batch(k)]
    assert Counter(ids) == Counter(expected) and len(ids) == 7
    assert sorted(b.index for b in batches) == list(range(plan.num_batches))
    engine = Engine(cfg, codec=VideoRoundTrip())
    for b in batches:
        n = len(plan.batch(b.index))
        assert b.lr.shape == (n, 90, 90, 3) and b.lr.dtype == np.uint8
        assert b.hr.shape == b.hr_usm.shape == (n, 360, 360, 3) and b.hr.dtype == np.uint8
        assert [r["patch_id"] for r in b.records] == b.patch_ids
        assert all(r["batch_index"] == b.index and r["seed"] == SEED for r in b.records)
        local = engine.make_batch(folder, plan, b.index)  # the same pure function, in this process
        assert np.array_equal(b.lr, local.lr) and np.array_equal(b.hr, local.hr)
        assert np.array_equal(b.hr_usm, local.hr_usm)
    assert srv.metrics.registry.get_sample_value("degrade_pairs_total") == 7


def test_two_servers_give_identical_bytes(make_server):
    _, a = make_server(workers=1)
    _, b = make_server(workers=0)  # in-process engine: a different execution path, same function
    srv_c, c = make_server(workers=1, pipeline="split")  # device stage + pool + shared memory: same function again
    assert srv_c.service.producer.pipeline == "split"
    req = pb.BatchRequest(seed=SEED, epoch=2, index_list=pb.IndexList(indices=[3, 0]), include_hr=True,
                          include_hr_usm=True, max_chunk_bytes=200_000)
    got_a = [c.SerializeToString() for c in stub_for(a).StreamBatches(req)]
    got_b = [c.SerializeToString() for c in stub_for(b).StreamBatches(req)]
    got_c = [c.SerializeToString() for c in stub_for(c).StreamBatches(req)]
    assert got_a == got_b == got_c
    chunks = [pb.PairChunk.FromString(c) for c in got_a]
    assert chunks[0].batch_index == 3 and chunks[-1].batch_index == 0  # request order
    # a patch with HR and USM is 778 kB, above the 200 kB asked for: one patch per chunk
    assert all(c.lr.shape[0] == 1 for c in chunks) and sum(c.last_chunk for c in chunks) == 2


def test_chunks_stay_below_the_default_message_limit(make_server):
    _, address = make_server()
    info = stub_for(address).GetInfo(pb.InfoRequest(seed=1, epoch=0))
    req = pb.BatchRequest(seed=1, epoch=0, index_range=pb.IndexRange(start=0, stop=info.batches_per_epoch),
                          include_hr=True, include_hr_usm=True)
    sizes = [c.ByteSize() for c in stub_for(address).StreamBatches(req)]
    assert max(sizes) < 4 * 1024 * 1024


# --- failures -------------------------------------------------------------
def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.mark.slow
def test_sigkill_one_of_two_servers_mid_epoch_loses_and_duplicates_nothing(photo_dir, service_cfg_file):
    (pa, a), (pb_, b) = spawn_server(photo_dir, service_cfg_file), spawn_server(photo_dir, service_cfg_file)
    try:
        client = DegradeClient([a, b], group_size=1, streams_per_server=1, queue_batches=1, unreachable_timeout=60)
        n = client.num_batches(SEED, 1)
        got, killed = [], False
        for batch in client.epoch(SEED, 1):
            got.append(batch)
            if not killed:
                # kill the server that has NOT sent this batch... either one is mid-stream by now
                pa.send_signal(signal.SIGKILL)
                pa.wait(10)
                killed = True
        ids = [i for bt in got for i in bt.patch_ids]
        assert sorted(bt.index for bt in got) == list(range(n))
        assert len(ids) == len(set(ids)) == 7
        assert client.stats.retries >= 1 or client.stats.per_server.get(a, 0) == 0
        assert client.stats.per_server.get(b, 0) > 0
    finally:
        for p in (pa, pb_):
            kill_group(p)


def test_all_servers_gone_is_a_clear_error():
    client = DegradeClient(["127.0.0.1:1"], unreachable_timeout=2)
    with pytest.raises(DegradeError, match="no server answered"):
        client.info()


# --- auth ---------------------------------------------------------------
def test_token_required_but_health_open(make_server):
    _, address = make_server(token="s3cret")
    ch = grpc.insecure_channel(address)
    stub = pbg.DegraderStub(ch)
    for md in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
        with pytest.raises(grpc.RpcError) as e:
            stub.GetInfo(pb.InfoRequest(), metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamBatches(pb.BatchRequest(index_list=pb.IndexList(indices=[0])), metadata=md))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.GetInfo(pb.InfoRequest(), metadata=(("authorization", "Bearer s3cret"),)).num_images == 5
    with DegradeClient(address, token="s3cret") as client:
        assert len(next(iter(client.epoch(SEED, 0, indices=[1]))).lr) >= 1
    with DegradeClient(address, token="nope") as client, pytest.raises(DegradeError) as e:
        list(client.epoch(SEED, 0))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


# --- hostile input ----------------------------------------------------------
def _req(**kw) -> pb.BatchRequest:
    kw.setdefault("index_list", pb.IndexList(indices=[0]))
    return pb.BatchRequest(seed=1, epoch=0, **kw)


BAD_REQUESTS = [
    (pb.BatchRequest(seed=1), "index_list"),
    (_req(index_list=pb.IndexList(indices=[])), "empty"),
    (_req(index_list=pb.IndexList(indices=[2**32 - 1])), "out of range"),
    (_req(index_list=pb.IndexList(indices=[1, 0, 1])), "more than once"),
    (_req(index_list=pb.IndexList(indices=list(range(200_000)))), "has only"),
    (pb.BatchRequest(seed=1, index_range=pb.IndexRange(start=3, stop=2)), "range"),
    (pb.BatchRequest(seed=1, index_range=pb.IndexRange(start=0, stop=2**32 - 1)), "range"),
    (_req(config_overrides_json='{"no_such_key": 1}'), "unknown config key"),
    (_req(config_overrides_json='{"video_batch_size": 100000000}'), "video_batch_size"),
    (_req(config_overrides_json='{"video_batch_size": 1000, "first_batch_range": [1000, 1000]}'), "larger than"),
    (_req(config_overrides_json='{"patch_size": 4}'), "fixed by the server"),
    (_req(config_overrides_json='{"resize_range1": [1, 1e9]}'), "resize_range1"),
    (_req(config_overrides_json='{"noise_sigma1": [1, 1e999]}'), "noise_sigma1"),
    (_req(config_overrides_json='{"bitrate_kbps": [1, 1e400]}'), "bitrate_kbps"),
    (_req(config_overrides_json='{"kernel_types": ["evil"]}'), "kernel_types"),
    (_req(config_overrides_json='{"profile": {"x": 1}}'), "profile"),
    (_req(config_overrides_json="[1, 2]"), "JSON object"),
    (_req(config_overrides_json="{not json"), "not valid JSON"),
    (_req(config_overrides_json="[" * 10_000 + "]" * 10_000), "characters"),
    (_req(config_overrides_json="x" * (3 * 1024 * 1024)), "characters"),
    (_req(config_overrides_json='{"a": "' + "y" * 10_000 + '"}'), "unknown config key"),
]


def test_malformed_and_hostile_requests_get_invalid_argument_and_server_keeps_serving(make_server):
    srv, address = make_server()
    stub = stub_for(address)
    for req, needle in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamBatches(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (needle, e.value.details())
        assert needle in e.value.details(), (needle, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.GetInfo(pb.InfoRequest(config_overrides_json='{"scale": 2}'))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # bytes that are no protobuf at all, on both methods
    ch = grpc.insecure_channel(address)
    raw_stream = ch.unary_stream("/degrade.v1.Degrader/StreamBatches")
    raw_unary = ch.unary_unary("/degrade.v1.Degrader/GetInfo")
    for junk in (b"\xff\xff\xff\xff", b"\x1a\xff", b"\x0a" + b"\x80" * 20):
        for call in (lambda j: list(raw_stream(j)), raw_unary):
            with pytest.raises(grpc.RpcError) as e:
                call(junk)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # unknown methods are UNIMPLEMENTED, never a crash
    with pytest.raises(grpc.RpcError) as e:
        ch.unary_unary("/degrade.v1.Degrader/DeleteEverything")(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # still serving, and the refusals are counted
    chunks = list(stub.StreamBatches(_req(max_chunk_bytes=1, include_hr=True)))
    assert chunks and all(c.lr.shape[0] == 1 for c in chunks) and chunks[-1].last_chunk
    assert srv.metrics.registry.get_sample_value("degrade_requests_rejected_total", {"code": "INVALID_ARGUMENT"}) >= len(BAD_REQUESTS)


def test_request_overrides_change_the_degradation_within_limits(make_server):
    _, address = make_server()
    stub = stub_for(address)
    only_h265 = json.dumps({"codec_probs": [0, 0, 0, 1], "v2_prob": 1.0})
    info = stub.GetInfo(pb.InfoRequest(seed=1, config_overrides_json=only_h265))
    chunks = list(stub.StreamBatches(pb.BatchRequest(
        seed=1, index_range=pb.IndexRange(start=0, stop=info.batches_per_epoch), config_overrides_json=only_h265)))
    codecs = {json.loads(r)["codec"] for c in chunks for r in c.records_json}
    assert codecs == {"libx265"}


def test_stream_limit_gives_resource_exhausted(make_server):
    srv, address = make_server(max_streams=1, max_waiting_streams=0)  # no queue: refused at once
    stub = stub_for(address)
    first = stub.StreamBatches(pb.BatchRequest(seed=1, index_range=pb.IndexRange(start=0, stop=3),
                                               include_hr=True, max_chunk_bytes=1))
    next(first)  # the stream is open and holds the only slot
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamBatches(_req()))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-streams" in e.value.details()
    assert stub.GetInfo(pb.InfoRequest()).max_streams == 1  # other RPCs still answer
    first.cancel()
    deadline = time.monotonic() + 20
    while srv.service.active_streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(stub.StreamBatches(_req()))  # the slot is free again


# --- backpressure ---------------------------------------------------------------
def _big_folder(tmp_path) -> str:
    """64 patches of real photographs (upscaled), so one epoch is far more than transport buffers hold."""
    import skimage.data as d
    from PIL import Image

    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        img = Image.fromarray(getattr(d, name)()).resize((1440, 1440), Image.Resampling.BICUBIC)
        img.save(tmp_path / f"{i}_{name}.png")
    return str(tmp_path)


def test_slow_client_does_not_grow_server_memory(make_server, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("video_batch_size = 4\nfirst_batch_range = [4, 4]\n")
    srv, address = make_server(images=_big_folder(tmp_path), config_file=cfg, workers=1)
    stub = stub_for(address)
    n = stub.GetInfo(pb.InfoRequest(seed=1)).batches_per_epoch
    assert n == 16  # 64 patches: 16 batches x 4 x (HR 389 kB + LR) = 25 MB if the server ran ahead
    call = stub.StreamBatches(pb.BatchRequest(seed=1, index_range=pb.IndexRange(start=0, stop=n), include_hr=True,
                                              max_chunk_bytes=400_000))
    next(call)  # then stop reading
    time.sleep(6)  # unbounded, the whole epoch (about 1 s of work per batch here) would be made meanwhile
    window = srv.service.producer.workers + srv.service.producer.prefetch
    sent = srv.metrics.registry.get_sample_value("degrade_batches_total")
    assert srv.service.producer.in_flight <= window
    assert sent <= 8, f"{sent} of {n} batches pushed to a client that reads nothing"
    more = [next(call) for _ in range(8)]  # reading again resumes the stream
    assert {c.batch_index for c in more} >= {1}
    call.cancel()


# --- shutdown and health ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["batch", "split"])
def test_sigterm_goes_not_serving_then_exits(photo_dir, service_cfg_file, pipeline):
    proc, address = spawn_server(photo_dir, service_cfg_file, "--drain-seconds", "1.5", "--grace-seconds", "5",
                                 "--pipeline", pipeline)
    try:
        ch = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="degrade.v1.Degrader"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = pbg.DegraderStub(ch)
        n = stub.GetInfo(pb.InfoRequest(seed=1)).batches_per_epoch
        running = stub.StreamBatches(pb.BatchRequest(seed=1, index_range=pb.IndexRange(start=0, stop=n),
                                                     include_hr=True, include_hr_usm=True, max_chunk_bytes=1))
        next(running)  # a stream in flight, its client reading slowly
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:  # while draining, new streams are turned away
            list(stub.StreamBatches(_req()))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # the running stream finishes the batch it was sending, then ends: UNAVAILABLE, "ask another server"
        with pytest.raises(grpc.RpcError) as e:
            list(running)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "another server" in e.value.details()
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 1.5 + 5 + 10  # drain + grace + start-up slack, not a stuck pool
        # the split pipeline's shared-memory slots are gone with the server
        assert not list(Path("/dev/shm").glob(f"degrade-{proc.pid}-*"))
    finally:
        kill_group(proc)


def test_metrics_endpoint_and_health_probe(make_server):
    srv, address = make_server(metrics_port=0)
    list(stub_for(address).StreamBatches(_req(include_hr=True)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("degrade_pairs_total", "degrade_pairs_per_second", "degrade_queue_depth",
                 "degrade_codec_failures_total", "degrade_skipped_images", "degrade_active_streams",
                 "degrade_bytes_sent_total"):
        assert name in text
    pairs = float(re.search(r"^degrade_pairs_total (\S+)", text, re.M).group(1))
    assert pairs >= 1
    from server.service.health_probe import main as probe

    assert probe(["--address", address]) == 0
    assert probe(["--address", "127.0.0.1:1", "--timeout", "0.5"]) == 1


def test_reflection_lists_the_services(make_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, address = make_server()
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(address))
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"degrade.v1.Degrader", "grpc.health.v1.Health"} <= names


def test_skipped_batch_is_reported_not_lost(make_server, tmp_path):
    import shutil

    import skimage.data as d
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(d.astronaut()).save(folder / "a.png")
    Image.fromarray(d.coffee()).save(folder / "b.png")
    # no pixel store: with one the scan's pixels are served (they match the published fingerprint), so a
    # file broken after the scan is what the server decodes only when it reads the folder itself
    srv, address = make_server(images=folder, workers=0, no_store=True)
    (folder / "b.png").write_bytes(b"not a png any more")  # broken after the scan
    srv.service.producer.folder._cache.clear()
    with DegradeClient(address, group_size=4) as client:
        got = list(client.epoch(SEED, 0))
        assert client.failures and "could not be made" in client.failures[0][2]
        assert len(got) + len(client.failures) == client.num_batches(SEED, 0)
    assert srv.metrics.registry.get_sample_value("degrade_batch_failures_total") == len(client.failures)
    shutil.rmtree(folder)


def test_hardware_codec_request_without_a_gpu_falls_back_to_software(make_server):
    _, address = make_server(codec_backend="auto,libx264=hybrid")
    assert list(stub_for(address).GetInfo(pb.InfoRequest()).codec_backends) == ["software"]
    from server.service.serve import main

    assert main(["--codec-backend", "quantum", "--port", "0"]) == 2  # a clear error, no traceback


def test_tls_with_a_self_signed_certificate(make_server, tmp_path):
    import shutil as sh

    if sh.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    _, address = make_server(tls_cert=cert, tls_key=key, token="tls-tok")
    port = address.rsplit(":", 1)[1]
    from client import TLS

    with DegradeClient(f"localhost:{port}", tls=TLS(ca=cert), token="tls-tok") as client:
        assert client.info().num_images == 5
        assert len(next(iter(client.epoch(SEED, 0, indices=[0]))).lr) >= 1
    with DegradeClient(f"localhost:{port}", token="tls-tok", unreachable_timeout=3) as plain:
        with pytest.raises(DegradeError):  # plaintext against a TLS port
            plain.info(timeout=3)


def test_random_hostile_requests_never_get_unknown_or_internal(make_server):
    """A small fuzz run: random field values and random bytes, every answer a deliberate status."""
    import random

    rng = random.Random(1234)
    srv, address = make_server()
    ch = grpc.insecure_channel(address)
    stub, raw = pbg.DegraderStub(ch), ch.unary_stream("/degrade.v1.Degrader/StreamBatches")
    keys = list(json.loads(srv.service.cfg.to_json()))
    values = [None, True, -1, 0, 1, 2**70, -2**70, 1e308, "x" * 70, [], [1], [1, 2], [2, 1], [0, 0, 1, 0],
              {"a": 1}, [[1]], "nan", 0.5]
    seen = Counter()
    for _ in range(60):
        req = pb.BatchRequest(seed=rng.choice([0, 1, 2**64 - 1]), epoch=rng.choice([0, 5, 2**64 - 1]),
                              include_hr=rng.random() < 0.5, max_chunk_bytes=rng.choice([0, 1, 2**32 - 1]))
        if rng.random() < 0.5:
            req.index_list.indices.extend(rng.choice([0, 1, 3, 2**31, 2**32 - 1]) for _ in range(rng.randint(0, 3)))
        else:
            req.index_range.start, req.index_range.stop = rng.choice([0, 2, 2**32 - 1]), rng.choice([0, 1, 2**32 - 1])
        if rng.random() < 0.7:
            req.config_overrides_json = json.dumps({rng.choice(keys): rng.choice(values)
                                                    for _ in range(rng.randint(1, 3))})
        body = req.SerializeToString()
        if rng.random() < 0.2:  # flip bytes: often not protobuf any more
            body = bytes(b ^ rng.randrange(256) if rng.random() < 0.1 else b for b in body)
        call = raw(body, timeout=60)
        try:
            next(call)
            seen["OK"] += 1
        except StopIteration:
            seen["OK"] += 1
        except grpc.RpcError as exc:
            seen[exc.code().name] += 1
            # RESOURCE_EXHAUSTED: valid requests whose cancelled predecessors still hold stream slots
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                exc.code(), exc.details(), body[:80])
        finally:
            call.cancel()
    assert seen["INVALID_ARGUMENT"] > 30 and seen["OK"] >= 1, seen
    assert stub.GetInfo(pb.InfoRequest(), timeout=10).num_images == 5  # still serving
