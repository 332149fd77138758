"""The benchmark driver runs end to end (speed itself is never asserted in tests)."""

import json

from server.cli import main


def test_bench_smoke_writes_all_figures(photo_dir, tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text("video_batch_size = 3\nfirst_batch_range = [1, 1]\nv2_prob = 1.0\n")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--images", str(photo_dir), "--config", str(cfg), "--runs", "1", "--batches", "2",
               "--workers", "0", "--skip-naive", "--clients", "2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("engine", "engine_no_usm", "codec_limit", "delivered_1", "delivered_n"):
        assert res[key]["median"] > 0 and res[key]["min"] <= res[key]["median"] <= res[key]["max"]
    assert res["naive"] is None
    assert res["delivered_n"]["clients"] == 2 and res["delivered_1"]["bytes_per_s"] > 0
    assert set(res["stages_s_per_batch"]) >= {"load", "blur1", "jpeg1", "codec"}
    # fed from the folder's pixel store (the default), and from the folder itself in the same run
    assert res["workload"]["fed_from"] == "store" and res["from_folder"]["engine"]["median"] > 0
    assert set(res["from_folder"]["stages_s_per_batch"]) == set(res["stages_s_per_batch"])
    assert res["engine"]["peak_pss_gib"] > 0 and res["from_folder"]["engine"]["peak_pss_gib"] > 0
    assert res["machine"]["cores"] >= 1 and res["workload"]["video_batch"] == 3
    assert all(c in ("mpeg2video", "mpeg4", "libx264", "libx265") for c in res["codec_mix"])


def test_batch_hashes_agree_across_pipelines_and_change_with_the_seed(photo_dir, tmp_path, capsys):
    from benchmarks.batch_hashes import main as hashes_main

    out = tmp_path / "h.json"
    assert hashes_main(["--images", str(photo_dir), "--batches", "1", "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert sorted(first) == ["v1/batch", "v1/split", "vcisr/batch", "vcisr/split"]
    assert first["vcisr/batch"] == first["vcisr/split"] != first["v1/batch"] == first["v1/split"]
    assert "batch and split agree" in capsys.readouterr().out
    hashes_main(["--images", str(photo_dir), "--batches", "1", "--seed", "8", "--json", str(out)])
    assert json.loads(out.read_text())["vcisr/batch"] != first["vcisr/batch"]
