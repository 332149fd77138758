"""The degradation server, in five parts (dependencies point downward only):

* ``server.service``     - the gRPC service: requests, auth, fairness, metrics, health;
* ``server.bench``       - the ``degrade bench`` harness: the standard workload of BENCH.md
  (beside the service: it runs a server as a subprocess, never imports it);
* ``server.pipeline``    - how batches are produced: the worker pool, the split
  (device stage + codec pool) pipeline, shared-memory slots, files on disk;
* ``server.degradation`` - the VCISR degradation model as a library: config,
  parameters, kernels, filters, noise, JPEG, epoch plan, images, the engine;
* ``server.codecs``      - the codec backends that run the video block.

``server.cli`` is the ``degrade`` command.  The subpackages export their few
public names lazily (:func:`lazy_exports`), so importing one module (a health
probe, a codec worker) does not import torch or gRPC it does not use.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str,
                 exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``: ``exports`` maps a public
    name to the submodule (relative, e.g. ``".engine"``) that defines it, imported on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
