"""Trainer-side library of the degradation service.

``DegradeClient`` pulls video batches from one or many ``degrade-server``s,
``client.wire`` makes here what a lean wire mode leaves out (HR cut from a
local dataset copy, the sharpened HR), ``ShuffleBuffer`` turns them into
training batches, ``DegradeDataset`` wraps both as a torch
``IterableDataset``; ``client.errors`` holds the errors they raise;
``client.protocol`` is the generated gRPC code of
``proto/degrade/v1/degrade.proto``.
"""

from .client import ClientStats, DegradeClient, VideoBatch
from .connection import TLS
from .errors import DatasetMismatchError, DegradeError, LocalError
from .shuffle import ShuffleBuffer, TrainingBatch

__all__ = ["ClientStats", "DatasetMismatchError", "DegradeClient", "DegradeError", "LocalError", "ShuffleBuffer", "TLS",
           "TrainingBatch", "VideoBatch"]
