"""Stand-ins for the hardware probe's subprocess body (``probe_hardware(target=...)``).

A module of its own, importable by name from ``tests/`` (pytest puts it on
``sys.path``, and a spawned child inherits that), so the child loads only
this and not a whole test module.  Each function has the probe's signature
``f(gpu_id, trial_encode) -> dict`` and misbehaves the way a broken driver
or PyNvVideoCodec can.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def exits_hard(gpu_id, trial_encode):
    """What PyNvVideoCodec's ``exit()`` on a CUDA driver error looks like from outside."""
    os._exit(3)


def segfaults(gpu_id, trial_encode):
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def raises(gpu_id, trial_encode):
    raise RuntimeError("cuCtxCreate failed\n  CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected")


def calls_sys_exit(gpu_id, trial_encode):
    sys.exit(2)


def hangs(gpu_id, trial_encode):
    time.sleep(3600)


def answers_nonsense(gpu_id, trial_encode):
    return {"available": True}  # no reason, no limits


def answers_h100(gpu_id, trial_encode):
    """A plain dict as the real probe sends it: NVDEC everywhere, no NVENC."""
    lim = {"min_width": 48, "min_height": 16, "max_width": 4096, "max_height": 4096, "engines": 7}
    return {
        "available": True, "reason": "NVENC: none; NVDEC: libx264", "device": "NVIDIA H100",
        "library": "PyNvVideoCodec 2.2.4", "gpu_id": gpu_id if gpu_id is not None else 0,
        "encode": {}, "decode": {"libx264": lim},
        "notes": {"encode:libx264": f"no NVENC (trial_encode={trial_encode})"},
    }
