"""Trainer-side library of the degradation service.

``DegradeClient`` pulls video batches from one or many ``degrade-server``s,
``ShuffleBuffer`` turns them into training batches, ``DegradeDataset`` wraps
both as a torch ``IterableDataset``; ``client.protocol`` is the generated gRPC
code of ``proto/degrade/v1/degrade.proto``.
"""

from .client import ClientStats, DegradeClient, DegradeError, VideoBatch
from .connection import TLS
from .shuffle import ShuffleBuffer, TrainingBatch

__all__ = ["ClientStats", "DegradeClient", "DegradeError", "ShuffleBuffer", "TLS", "TrainingBatch", "VideoBatch"]
