"""Trainer side: the shuffle pool, the torch dataset, the degrade-client command, the local source."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from client import ShuffleBuffer
from client.dataset import DegradeDataset


def _video(start: int, n: int):
    lr = np.stack([np.full((2, 2, 3), i % 256, np.uint8) for i in range(start, start + n)])
    hr = np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in range(start, start + n)])
    return lr, hr, [{"patch_id": f"p{i}"} for i in range(start, start + n)]


def test_shuffle_buffer_passes_every_pair_once_and_mixes_videos():
    buf = ShuffleBuffer(capacity=40, batch_size=6, seed=1)
    out = []
    for v in range(10):
        lr, hr, recs = _video(v * 20, 20)
        out += list(buf.add(lr, hr, None, recs))
    assert len(buf) == 40  # the pool stays full
    out += list(buf.drain())
    ids = [r["patch_id"] for b in out for r in b.records]
    assert Counter(ids) == Counter(f"p{i}" for i in range(200))
    assert all(len(b) == 6 for b in out[:-1]) and len(out[-1]) == 200 % 6
    for b in out:  # arrays travel with their records
        vals = [int(r["patch_id"][1:]) % 256 for r in b.records]
        assert b.lr[:, 0, 0, 0].tolist() == vals and b.hr[:, 7, 7, 2].tolist() == vals and b.hr_usm is None
    # batches mix video batches: most training batches hold pairs of at least two videos
    mixed = sum(len({int(r["patch_id"][1:]) // 20 for r in b.records}) > 1 for b in out)
    assert mixed >= 0.8 * len(out)
    assert ids != sorted(ids, key=lambda s: int(s[1:]))


def test_shuffle_buffer_without_pool_keeps_order_and_drop_last():
    buf = ShuffleBuffer(capacity=0, batch_size=4)
    lr, hr, recs = _video(0, 10)
    out = list(buf.add(lr, hr, hr, recs)) + list(buf.drain(drop_last=True))
    assert [r["patch_id"] for b in out for r in b.records] == [f"p{i}" for i in range(8)]


def test_shuffle_buffer_rejects_mismatched_input():
    buf = ShuffleBuffer(capacity=4, batch_size=2)
    lr, hr, recs = _video(0, 3)
    with pytest.raises(ValueError, match="one entry per pair"):
        list(buf.add(lr, hr, None, recs[:2]))
    list(buf.add(lr, hr, None, recs))
    with pytest.raises(ValueError, match="same patch shapes"):
        list(buf.add(lr[:, :1], hr, None, recs))


def test_dataset_workers_share_an_epoch_exactly_once(make_server):
    _, address = make_server(workers=1)
    ds = DegradeDataset(address, seed=3, batch_size=3, pool_size=4, epochs=1, drop_last=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    ids = []
    for lr, hr, usm, records in loader:
        assert lr.dtype == torch.uint8 and lr.shape[1:] == (3, 90, 90) and hr.shape[1:] == (3, 360, 360)
        assert usm.shape == hr.shape and len(records) == lr.shape[0] <= 3
        ids += [r["patch_id"] for r in records]
    assert len(ids) == len(set(ids)) == 7


def test_local_source_matches_the_server(make_server, photo_dir, service_cfg_file):
    from client import DegradeClient
    from client.local import LocalSource
    from server.degradation.config import DegradationConfig

    _, address = make_server()
    local = LocalSource(photo_dir, cfg=DegradationConfig.from_file(service_cfg_file), workers=0)
    try:
        mine = next(iter(local.epoch(5, 1, indices=[2])))
    finally:
        local.close()
    with DegradeClient(address) as client:
        theirs = next(iter(client.epoch(5, 1, indices=[2])))
    assert mine.patch_ids == theirs.patch_ids
    assert np.array_equal(mine.lr, theirs.lr) and np.array_equal(mine.hr_usm, theirs.hr_usm)


def test_degrade_client_command(make_server, tmp_path, capsys):
    from client.cli import main

    _, address = make_server(token="tok")
    (tmp_path / "token").write_text("tok\n")
    sheet = tmp_path / "sheet.png"
    assert main(["--server", address, "--token-file", str(tmp_path / "token"), "--pairs", "5", "--out", str(sheet),
                 "--preview-pairs", "4"]) == 0
    out = capsys.readouterr().out
    assert "pairs/s" in out and "MB/s" in out and sheet.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(sheet).size[0] > 400
    assert main(["--server", address, "--pairs", "5"]) == 1  # no token: a clear error, not a traceback
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_ordered_epoch_from_two_servers_is_in_index_order(make_server):
    from client import DegradeClient

    _, a = make_server()
    _, b = make_server()
    with DegradeClient([a, b], group_size=1, streams_per_server=2) as client:
        n = client.num_batches(SEED_ORDER, 0)
        got = [vb.index for vb in client.epoch(SEED_ORDER, 0, ordered=True)]
    assert got == list(range(n))


SEED_ORDER = 11


def test_training_stream_resumes_exactly_from_its_state(photo_dir, service_cfg_file):
    from client.local import LocalSource
    from model.data import TrainingStream
    from server.degradation.config import DegradationConfig

    cfg = DegradationConfig.from_file(service_cfg_file)
    src = LocalSource(photo_dir, cfg=cfg, workers=0)
    try:
        a = TrainingStream(src, seed=4, batch_size=3, pool_size=5)
        it = iter(a)
        head = [next(it) for _ in range(4)]  # crosses into epoch 1 (7 patches per epoch)
        state = a.state_dict()
        tail = [next(it) for _ in range(3)]
        b = TrainingStream(src, seed=4, batch_size=3, pool_size=5)
        b.load_state_dict(state)
        again = [tb for tb, _ in zip(iter(b), range(3))]
    finally:
        src.close()
    assert state["epoch"] >= 1 and len(state["buffer"]["residents"]) == 5  # a pixel-free state
    for x, y in zip(tail, again):
        assert [r["patch_id"] for r in x.records] == [r["patch_id"] for r in y.records]
        assert np.array_equal(x.lr, y.lr) and np.array_equal(x.hr_usm, y.hr_usm)
    ids = [r["patch_id"] for tb in head + tail for r in tb.records]
    assert len(ids) == len(set(ids))  # nothing twice


def test_closing_the_client_mid_run_ends_the_run_with_a_clear_error(make_server):
    """``close()`` while streams run (a trainer shutting down from another thread): the streams
    end, and the iterator either finishes or raises DegradeError - no thread dies on a closed
    channel, nothing hangs."""
    import threading
    import time

    from client import DegradeClient, DegradeError

    _, address = make_server(workers=1)
    died = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)
    try:
        client = DegradeClient([address], group_size=1, streams_per_server=2, unreachable_timeout=20,
                               health_interval=0.2)  # the health monitor probes the closed channel too
        run = client.epochs(5)
        next(run)
        client.close()
        time.sleep(1.0)
        with pytest.raises(DegradeError, match="client was closed while"):
            for _ in range(200):  # endless epochs: only an error ends this loop
                next(run)
        run.close()
    finally:
        threading.excepthook = old_hook
    assert died == []
