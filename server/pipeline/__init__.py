"""How batches are produced: the machinery around the degradation engine.

* ``batch``        - :class:`BatchProducer`: worker processes that each make whole
  batches (the CPU default, ``--pipeline batch``);
* ``split``        - :class:`SplitProducer`: one device stage owns the GPU (USM, first
  and second order, the ending up to the codec boundary), a pool of processes
  decodes HR and runs the video block (``--pipeline split``, the default on a GPU);
* ``shared_slots`` - the preallocated shared-memory slots the split pipeline
  moves HR patches and frames in;
* ``registry``     - the pipelines by name, ``--pipeline`` and :func:`make_producer`;
* ``dali_loader``  - an optional HR decoder on NVIDIA DALI (not wired in);
* ``png``, ``preview`` - what ``degrade generate`` / ``preview`` write: PNG files
  and contact sheets.

Uses ``server.degradation`` and ``server.codecs``; knows nothing of the service.
"""

from server import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "BatchProducer": ".batch", "default_workers": ".batch",
    "SplitProducer": ".split",
    "PIPELINES": ".registry", "resolve_pipeline": ".registry", "make_producer": ".registry",
    "add_pipeline_argument": ".registry",
})
