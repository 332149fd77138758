"""Codec backends that misbehave on purpose, for the engine and pipeline tests.

They live in a module of their own so that worker processes can unpickle them.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.codecs import CodecError, SoftwareBackend


class BrokenBackend(SoftwareBackend):
    """A real backend whose every round trip fails, as a crashed hardware encoder would."""

    name = "broken"

    def roundtrip(self, frames, params):
        raise CodecError(f"{params.codec}: encoder refused to open")


class KillOnceBackend(SoftwareBackend):
    """The software codecs, except that the first round trip kills its worker process
    (a segfault in a codec library, an OOM kill); a marker file remembers it happened.
    ``always``: every round trip kills its worker."""

    def __init__(self, marker: str, always: bool = False):
        super().__init__()
        self.marker, self.always = marker, always

    def roundtrip(self, frames, params):
        if self.always or not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(9)
        return super().roundtrip(frames, params)


class HangingBackend(SoftwareBackend):
    """A codec that never returns (a wedged encoder); a marker file says a worker is stuck in it."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def roundtrip(self, frames, params):
        import time

        Path(self.marker).write_text(str(os.getpid()))
        while True:
            time.sleep(60)


class DiesMidSendBackend(SoftwareBackend):
    """A worker that starts sending its result and never finishes, as one killed halfway through sending
    a large batch: the result pipe holds a message header and a few bytes, then nothing.  (The worker
    writes them itself, into the pool's result pipe.)  Then it waits to be terminated, or with ``die``
    it dies at once (an OOM kill) - the first time only: later round trips are the software codecs'."""

    def __init__(self, marker: str, die: bool = False):
        super().__init__()
        self.marker, self.die = marker, die

    def roundtrip(self, frames, params):
        import struct
        import sys
        import time

        if os.path.exists(self.marker):
            return super().roundtrip(frames, params)
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != "_process_worker":
            frame = frame.f_back
        results = frame.f_locals["result_queue"]  # concurrent.futures' worker loop: where results go
        os.write(results._writer.fileno(), struct.pack("!i", 1 << 20) + b"\x80\x04partial")
        Path(self.marker).write_text(str(os.getpid()))
        if self.die:
            os._exit(9)
        while True:
            time.sleep(60)
