"""The ``degrade bench`` harness: the standard workload of ``shared/spec/BENCH.md``.

* ``workload``     - :func:`run_bench`, every figure from one run: the engine, delivery,
  the codec limit and the naive baseline on the same video batches, and the table;
* ``delivered``    - a ``degrade-server`` subprocess and client processes pulling from it
  (figure 2: pairs/s delivered over gRPC on loopback);
* ``codec_limit``  - the codec round trips alone on all cores (figure 3), and the naive
  baseline on the same batches (figure 4);
* ``naive_ffmpeg`` - the reference way of the video round trip: PNG files and the ffmpeg CLI.

The top layer beside ``server.service``: it uses ``server.pipeline``, ``server.codecs`` and
``server.degradation``, runs the service as a subprocess (never imports it) and pulls with
``client``; nothing in ``server`` but the ``degrade`` command imports it.  The standalone
measurements (``python -m benchmarks.*``) live in the top-level ``benchmarks/`` folder.
"""

from server import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "run_bench": ".workload",
    "deliver": ".delivered", "server_process": ".delivered",
    "codec_limit": ".codec_limit", "naive_limit": ".codec_limit",
    "ffmpeg_available": ".naive_ffmpeg", "naive_roundtrip": ".naive_ffmpeg",
})
