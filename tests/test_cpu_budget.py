"""The CPU budget: affinity, cgroup quota (v1 and v2, read from fake cgroup trees) and an explicit
limit; what sizes itself from it; and that a batch's bytes do not depend on it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from server.degradation.cpu_budget import CpuBudget, budget_threads, cgroup_quota, cpu_budget, parse_cpus
from server.degradation.images import ImageFolder
from server.pipeline.batch import BatchProducer
from server.pipeline.split import SplitProducer

V2_ONLY = "0::/system.slice/degrade.service\n"
V1_CPU = ("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n1:name=systemd:/docker/abc\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- reading the quota -----------------------------------------------------------------------------
def test_v2_quota_of_the_process_cgroup(tmp_path):
    _write(tmp_path / "system.slice/degrade.service/cpu.max", "150000 100000\n")
    assert cgroup_quota(V2_ONLY, tmp_path) == pytest.approx(1.5)


def test_v2_the_smallest_quota_along_the_ancestors_holds(tmp_path):
    _write(tmp_path / "system.slice/cpu.max", "200000 100000\n")  # the slice: 2 CPUs
    _write(tmp_path / "system.slice/degrade.service/cpu.max", "max 100000\n")  # the unit itself: no limit
    assert cgroup_quota(V2_ONLY, tmp_path) == pytest.approx(2.0)
    _write(tmp_path / "system.slice/degrade.service/cpu.max", "50000 100000\n")
    assert cgroup_quota(V2_ONLY, tmp_path) == pytest.approx(0.5)


def test_v2_inside_a_container_namespace(tmp_path):
    """In a container's cgroup namespace the path is '/' and the mount root is the container's cgroup."""
    _write(tmp_path / "cpu.max", "400000 100000\n")
    assert cgroup_quota("0::/\n", tmp_path) == pytest.approx(4.0)


def test_v2_without_a_quota(tmp_path):
    _write(tmp_path / "system.slice/degrade.service/cpu.max", "max 100000\n")
    assert cgroup_quota(V2_ONLY, tmp_path) is None
    assert cgroup_quota(V2_ONLY, tmp_path / "nowhere") is None
    assert cgroup_quota("", tmp_path) is None


def test_v1_cfs_quota(tmp_path):
    base = tmp_path / "cpu,cpuacct/docker/abc"
    _write(base / "cpu.cfs_quota_us", "300000\n")
    _write(base / "cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(V1_CPU, tmp_path) == pytest.approx(3.0)
    _write(base / "cpu.cfs_quota_us", "-1\n")  # none
    assert cgroup_quota(V1_CPU, tmp_path) is None


def test_v1_with_the_host_path_not_visible_uses_the_mount_root(tmp_path):
    """A v1 container often shows the host's cgroup path while its mount is the container's own cgroup."""
    _write(tmp_path / "cpu/cpu.cfs_quota_us", "250000\n")
    _write(tmp_path / "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota("4:cpu:/docker/abc\n", tmp_path) == pytest.approx(2.5)


@pytest.mark.parametrize("text", ["garbage\n", "abc 100000\n", "100000 0\n", "0 100000\n", ""])
def test_unreadable_quota_files_mean_no_quota(tmp_path, text):
    _write(tmp_path / "cpu.max", text)
    assert cgroup_quota("0::/\n", tmp_path) is None


def test_this_machine_reads_without_error():
    q = cgroup_quota()
    assert q is None or q > 0


# --- the budget ------------------------------------------------------------------------------------
def test_budget_is_the_smallest_limit_rounded_up(tmp_path):
    _write(tmp_path / "cpu.max", "400000 100000\n")
    quota = dict(proc_cgroup="0::/\n", root=tmp_path, environ={})
    b = cpu_budget(affinity=64, **quota)
    assert (b.cores, b.source, b.quota, b.affinity) == (4, "cgroup quota", 4.0, 64)
    assert b.describe().startswith("CPU budget: 4 of ")
    assert "(cgroup quota" in b.describe()
    assert cpu_budget(affinity=2, **quota).cores == 2  # affinity smaller than the quota
    assert cpu_budget(affinity=2, **quota).source == "affinity"
    b = cpu_budget("1", affinity=64, **quota)
    assert (b.cores, b.source, b.explicit) == (1, "--cpus", 1.0)
    _write(tmp_path / "cpu.max", "150000 100000\n")
    b = cpu_budget(affinity=64, **quota)
    assert (b.cores, b.limit) == (2, 1.5)
    assert "1.5 CPUs, rounded up" in b.describe()
    assert cpu_budget(0.2, affinity=8, proc_cgroup="", environ={}).cores == 1  # never below one core


def test_budget_from_the_environment_and_the_flag_wins(tmp_path):
    env = {"DEGRADE_CPUS": "3"}
    b = cpu_budget(affinity=16, proc_cgroup="", root=tmp_path, environ=env)
    assert (b.cores, b.source) == (3, "$DEGRADE_CPUS")
    b = cpu_budget(2, affinity=16, proc_cgroup="", root=tmp_path, environ=env)
    assert (b.cores, b.source) == (2, "--cpus")
    b = cpu_budget(affinity=16, proc_cgroup="", root=tmp_path, environ={})
    assert (b.cores, b.source, b.explicit) == (16, "affinity", None)


@pytest.mark.parametrize("bad", ["x", "-1", "nan", "inf"])
def test_a_bad_limit_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="positive number of CPUs"):
        parse_cpus(bad)
    with pytest.raises(ValueError, match=r"\$DEGRADE_CPUS must be"):
        cpu_budget(environ={"DEGRADE_CPUS": bad})


@pytest.mark.parametrize("none", [None, "", "auto", "0", 0])
def test_no_limit(none):
    assert parse_cpus(none) is None


def test_helper_pools_follow_the_budget(monkeypatch):
    monkeypatch.setenv("DEGRADE_CPUS", "1")
    assert budget_threads(8) == 1
    monkeypatch.setenv("DEGRADE_CPUS", "64")
    assert budget_threads(8) == min(8, cpu_budget().affinity)


# --- what sizes itself from it ---------------------------------------------------------------------
def test_pools_size_to_the_budget(photo_dir, small_cfg, monkeypatch, caplog):
    folder = ImageFolder(photo_dir, small_cfg.patch_size)
    assert BatchProducer(folder, small_cfg, cpus=3).workers == 3
    assert SplitProducer(folder, small_cfg, cpus=3).workers == 2  # one core is the device stage's
    assert SplitProducer(folder, small_cfg, cpus=1).workers == 1
    monkeypatch.setenv("DEGRADE_CPUS", "1")
    assert BatchProducer(folder, small_cfg).workers == 1  # the default follows $DEGRADE_CPUS
    with caplog.at_level(logging.WARNING, logger="server.pipeline.batch"):
        assert BatchProducer(folder, small_cfg, workers=4, cpus=1).workers == 4  # asked for: kept, with a warning
    assert "4 worker processes on a CPU budget of 1 core" in caplog.text


def test_worker_processes_compute_on_one_thread(photo_dir, small_cfg):
    """Parallelism across processes: a worker never runs OpenMP threads that could spin on a share it
    does not get, whatever the budget and however few workers there are."""
    folder = ImageFolder(photo_dir, small_cfg.patch_size)
    with BatchProducer(folder, small_cfg, workers=1, cpus=2) as producer:
        pool, _ = producer._ensure_pool()
        assert pool.submit(torch.get_num_threads).result(timeout=120) == 1


def _digest(producer: BatchProducer, jobs) -> str:
    h = hashlib.sha256()
    for res in producer.produce_jobs(0, jobs):
        for arr in (res.lr, res.hr, res.hr_usm):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def test_batch_bytes_do_not_depend_on_the_budget(photo_dir, small_cfg):
    folder = ImageFolder(photo_dir, small_cfg.patch_size)
    jobs = [(0, 0), (0, 1), (1, 0)]
    digests = set()
    for cpus, workers in ((1, None), (2, None), (2, 1)):
        with BatchProducer(folder, small_cfg, workers=workers, cpus=cpus) as producer:
            digests.add(_digest(producer, jobs))
    assert len(digests) == 1


def test_the_server_reports_its_budget(make_server):
    from client import DegradeClient

    srv, address = make_server(cpus=1.5)
    assert isinstance(srv.service.cpu_budget, CpuBudget)
    assert srv.service.producer.workers == 1  # make_server asks for one worker
    with DegradeClient(address) as client:
        info = client.info()
    assert info.cpu_budget_cores == 2  # 1.5 rounded up
    assert info.cpu_budget.startswith("CPU budget: 2 of ") and "1.5 CPUs, rounded up" in info.cpu_budget
    assert srv.metrics.registry.get_sample_value("degrade_cpu_budget_cores") == 2


def test_degrade_server_cpus_1_sizes_itself_to_one_core_and_says_so(photo_dir, service_cfg_file):
    """The command as a user (or a container's entry point) runs it: the budget is logged at start-up."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, DEGRADE_CPUS="7")  # the flag wins over the environment
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--images", str(photo_dir), "--config",
                             str(service_cfg_file), "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
                             "--cpus", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "listening on port" in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    log = "".join(lines)
    assert "listening on port" in log, log
    assert "CPU budget: 1 of " in log and "(--cpus" in log, log
    assert "batch pipeline: 1 worker process(es)" in log, log


def test_degrade_server_rejects_a_bad_cpus_flag(capsys):
    from server.service.serve import main

    assert main(["--cpus", "lots"]) == 2
    assert "--cpus must be a positive number of CPUs" in capsys.readouterr().err
