"""The C allocator tuned for the send path: large buffers are reused, not mapped afresh for each chunk.

Every chunk the service sends is a few MB: the ``bytes`` it is written into
(server/service/chunks.py) and gRPC's own copy of it.  glibc serves blocks that
large with a fresh ``mmap`` (its threshold starts at 128 kB and only grows as
such blocks are freed) and hands freed heap tops back to the kernel, so each
chunk costs page faults and the zeroing of fresh pages in the kernel: on the
2-core development machine about a third of the main process's CPU per pair at
full wire.  Raising both thresholds keeps those blocks in the heap for reuse;
the price is up to ``TRIM_THRESHOLD`` of freed memory held by the process.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: blocks below this come from the heap (glibc's largest allowed value on 64-bit systems)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free heap memory kept for reuse before any is given back to the kernel
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Set glibc's thresholds for this process (see module doc); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    except (OSError, AttributeError):  # musl and others: their own allocator, left as it is
        return False
    if not ok:
        log.info("the C allocator refused the send path's thresholds; left as it is")
    return ok
