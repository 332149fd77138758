"""``python -m benchmarks.send_path`` runs and writes its figures (the replaying service: seconds, no workers)."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_send_path_replay_writes_every_figure(tmp_path, photo_dir, capsys):
    from benchmarks.send_path import main

    out = tmp_path / "send.json"
    assert main(["--pipelines", "replay", "--modes", "full,lr", "--replay-pairs", "24", "--video-batch", "4",
                 "--idle-seconds", "0", "--images", str(photo_dir), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["wire"], r["delivery"]) for r in res["runs"]] == [("full", "bytes"), ("full", "shared"),
                                                                 ("lr", "bytes"), ("lr", "shared")]
    full, full_shared, lr, lr_shared = res["runs"]
    assert full["shared_batches"] == lr["shared_batches"] == 0
    assert full_shared["shared_batches"] == lr_shared["shared_batches"] == 6  # every batch, through a slot
    assert full_shared["wire_bytes"] / 24 < 2048 and lr_shared["wire_bytes"] / 24 < 2048
    for r in res["runs"]:
        assert r["pairs"] == 24 and r["server_main_cpu_s"] >= 0 and r["client_cpu_s"] >= 0  # ticks: may be 0
        assert r["server_net_ms_per_pair"] <= r["server_ms_per_pair"] and r["send_ceiling_pairs_per_s"] > 0
    hr, lrb = 360 * 360 * 3, 90 * 90 * 3  # what each mode carries per pair, plus the record
    assert 2 * hr + lrb < full["wire_bytes"] / 24 < 2 * hr + lrb + 2000
    assert lrb < lr["wire_bytes"] / 24 < lrb + 2000
    printed = capsys.readouterr().out
    assert "| replay | full | bytes |" in printed and "| replay | full | shared |" in printed
