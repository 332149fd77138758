"""benchmarks/gpu_check.sh (``make gpu-check``) on the CPU: it runs, keeps every step's exit status,
does not let one failing test file hide another, and writes few files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_reports_each_step_and_its_exit_status(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PY=sys.executable, OUT=str(out), GPU_CHECK_BUDGET_S="240", GPU_CHECK_JOBS="2",
               GPU_CHECK_TESTS="tests/test_images.py tests/test_no_such_file.py",
               GPU_CHECK_DEVICE="cuda", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    import torch

    if torch.cuda.is_available():
        env["GPU_CHECK_BENCHES"] = "none"  # the benchmarks would run for real here
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 1, res.stdout + res.stderr  # the missing file fails the run...
    lines = {ln.split()[0]: ln.split() for ln in summary.splitlines() if ln.startswith(("tests/", "bench"))}
    assert lines["tests/test_images.py"][1:3] == ["no-cuda-tests", "5"]  # ...and does not hide this one
    assert lines["tests/test_no_such_file.py"][1:3] == ["failed", "4"]  # pytest: file not found
    assert "deselected" in summary and "overall: FAILED" in summary
    if not torch.cuda.is_available():
        assert summary.count("no CUDA GPU here") >= 3  # every benchmark skipped, with the reason
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["bench.log", "results.json", "summary.txt", "tests.log"]  # the device tool returns 8 at most
    assert "===== tests/test_images.py" in (out / "tests.log").read_text()


def test_make_gpu_check_installs_nothing():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Under `make test` MAKELEVEL is set, and a nested make would print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    res = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PY=python3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "PY=python3 OUT=out/gpu bash benchmarks/gpu_check.sh"
