"""The whole degradation engine on real photographs: shapes, records, determinism, robustness."""

import numpy as np
import pytest
from codec_fakes import BrokenBackend

from server.codecs import VideoRoundTrip
from server.degradation.config import DegradationConfig
from server.degradation.engine import Engine
from server.degradation.epoch_plan import make_epoch_plan
from server.degradation.images import ImageFolder
from server.pipeline.batch import BatchProducer

RECORD_KEYS = {
    "patch_id", "image", "x", "y", "epoch", "batch_index", "ending", "codec", "crf", "bitrate_kbps", "preset",
    "fps", "aspect_ratio", "backend", "kernel1", "kernel2", "resize1", "resize2", "noise1", "noise2",
    "jpeg1_quality",
}


@pytest.fixture(scope="module")
def folder(photo_dir):
    return ImageFolder(photo_dir, 360)


def run_epoch(engine, folder, cfg, seed=0, epoch=0):
    plan = make_epoch_plan(folder.images, cfg, seed, epoch)
    return plan, [engine.make_batch(folder, plan, k) for k in range(plan.num_batches)]


def test_small_epoch_shapes_records_and_every_patch_once(folder, small_cfg, device):
    engine = Engine(small_cfg, device=device, codec=VideoRoundTrip())
    plan, results = run_epoch(engine, folder, small_cfg)
    ids = [r["patch_id"] for res in results for r in res.records]
    assert len(ids) == plan.num_patches == len(set(ids)) == 7
    for res in results:
        n = len(res)
        assert res.lr.shape == (n, 90, 90, 3) and res.lr.dtype == np.uint8
        assert res.hr.shape == (n, 360, 360, 3) and res.hr.dtype == np.uint8
        assert res.hr_usm.shape == res.hr.shape and res.hr_usm.dtype == np.uint8
        assert res.lr.flags["C_CONTIGUOUS"]
        for i, rec in enumerate(res.records):
            assert RECORD_KEYS <= set(rec)
            img = folder.load(rec["image"])
            assert np.array_equal(res.hr[i], img[rec["y"]:rec["y"] + 360, rec["x"]:rec["x"] + 360])
            assert rec["batch_index"] == res.batch_index and rec["epoch"] == 0
            assert rec["kernel1"]["type"] in ("iso", "aniso", "generalized_iso", "generalized_aniso",
                                              "plateau_iso", "plateau_aniso", "sinc")
            assert 30 <= rec["jpeg1_quality"] <= 95
            if rec["ending"] == "v2":
                assert rec["codec"] in ("mpeg2video", "mpeg4", "libx264", "libx265")
                assert rec["backend"] == "software"
                assert (rec["crf"] is None) != (rec["bitrate_kbps"] is None)
            else:
                assert rec["codec"] is None and "jpeg2_quality" in rec
        # the LR is a degraded version of the HR: related, not identical to a plain downscale
        hr_small = res.hr.reshape(n, 90, 4, 90, 4, 3).mean(axis=(2, 4))
        diff = np.abs(hr_small - res.lr.astype(float)).mean()
        assert 0.5 < diff < 60
        # sharpened target: same image, more local contrast, not identical
        assert not np.array_equal(res.hr_usm, res.hr)
        assert np.abs(res.hr_usm.astype(int) - res.hr.astype(int)).mean() < 12


def test_same_seed_same_bytes_different_seed_different(folder, small_cfg, device):
    engine = Engine(small_cfg, device=device, codec=VideoRoundTrip())
    plan = make_epoch_plan(folder.images, small_cfg, 11, 2)
    a = engine.make_batch(folder, plan, 1)
    b = Engine(small_cfg, device=device, codec=VideoRoundTrip()).make_batch(folder, plan, 1)
    assert a.lr.tobytes() == b.lr.tobytes() and a.records == b.records
    other = make_epoch_plan(folder.images, small_cfg, 12, 2)
    c = engine.make_batch_from_refs(folder, 12, 2, 1, plan.batch(1))  # same patches, other seed
    assert c.lr.tobytes() != a.lr.tobytes()
    assert other.seed == 12


def test_worker_pool_matches_inline(folder, small_cfg):
    inline = BatchProducer(folder, small_cfg, workers=0)
    with BatchProducer(folder, small_cfg, workers=2) as pooled:
        got = list(pooled.produce(3, 1, [0, 1]))
    want = list(inline.produce(3, 1, [0, 1]))
    assert [r.batch_index for r in got] == [0, 1]
    for g, w in zip(got, want):
        assert g.lr.tobytes() == w.lr.tobytes() and g.records == w.records
        assert g.hr_usm.tobytes() == w.hr_usm.tobytes()


def test_v1_ending_and_vcisr_code_profile(folder, device):
    cfg = DegradationConfig(video_batch_size=4, first_batch_range=(4, 4), v2_prob=0.0)
    plan = make_epoch_plan(folder.images, cfg, 0, 0)
    res = Engine(cfg, device=device, codec=VideoRoundTrip()).make_batch(folder, plan, 0, want_usm=False)
    assert res.hr_usm is None and res.lr.shape == (4, 90, 90, 3)
    assert all(r["ending"] == "v1" and r["codec"] is None and 30 <= r["jpeg2_quality"] <= 95 for r in res.records)
    code = DegradationConfig.for_profile("vcisr-code", video_batch_size=4, first_batch_range=(4, 4))
    code_plan = make_epoch_plan(folder.images, code, 0, 0)
    res = Engine(code, device=device, codec=VideoRoundTrip()).make_batch(folder, code_plan, 0)
    assert res.lr.shape == (4, 90, 90, 3)
    assert len({str(r["kernel1"]) for r in res.records}) == 1  # one kernel per video batch


def test_codec_failure_falls_back_and_is_recorded(folder):
    cfg = DegradationConfig(video_batch_size=4, first_batch_range=(4, 4), v2_prob=1.0)
    plan = make_epoch_plan(folder.images, cfg, 0, 0)
    res = Engine(cfg, codec=VideoRoundTrip(BrokenBackend())).make_batch(folder, plan, 0)
    assert len(res) == 4 and res.lr.shape == (4, 90, 90, 3)  # nothing lost
    assert res.codec_failures == 1
    for r in res.records:
        assert r["codec_failure"] and "encoder refused" in r["codec_failure"]
        assert r["codec"] is not None


def test_bad_batch_index_is_an_error(folder, small_cfg):
    producer = BatchProducer(folder, small_cfg, workers=0)
    with pytest.raises(IndexError, match="out of range"):
        list(producer.produce(0, 0, [999]))


@pytest.mark.parametrize("profile", ["vcisr", "vcisr-code"])
@pytest.mark.parametrize("s1, s2", [(0.15, 0.3), (0.5, 1.2), (1.0, 1.0), (1.5, 0.77)])
def test_resize_sizes_follow_the_spec(photo_patches, profile, s1, s2):
    """First resize relative to the HR size; second relative to the TARGET size (Real-ESRGAN),
    or to the current size under the vcisr-code quirk."""
    from server.degradation.params import ResizeDraw, sample_batch_params
    from server.degradation.seeding import make_generator

    cfg = DegradationConfig.for_profile(profile)
    p = sample_batch_params(cfg, 2, make_generator(0, 0, 0, "params"))
    p.resize1, p.resize2 = ResizeDraw(s1, "bicubic"), ResizeDraw(s2, "area")
    hr = torch_from(photo_patches[:2])
    out = Engine(cfg).degrade_orders(hr, p, make_generator(0, 0, 0, "noise"))
    first = int(360 * s1)
    want = int(first * s2) if profile == "vcisr-code" else int(90 * s2)
    assert tuple(out.shape) == (2, 3, want, want)


def torch_from(nhwc):
    import torch

    return torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255
