"""The client library's errors: what a trainer catches from ``DegradeClient`` and the wire modes.

``DegradeError``: no server can serve the request (bad request, wrong token) or none is reachable;
``LocalError``: the failure is on this side (the dataset copy, local sharpening), so no other server
can help; ``DatasetMismatchError``: the local dataset copy differs from the server's.
"""

from __future__ import annotations

from typing import Sequence

import grpc


class DegradeError(RuntimeError):
    """A request no server can serve (bad request, wrong token) or no server reachable."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class LocalError(DegradeError):
    """A failure on the client's side (its dataset copy, local sharpening): no other server can help."""


class DatasetMismatchError(LocalError):
    """The local copy of the dataset differs from the server's (``files`` names the files that differ)."""

    def __init__(self, message: str, files: Sequence[str] = ()):
        super().__init__(message)
        self.files = list(files)
