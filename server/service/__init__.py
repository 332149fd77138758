"""The gRPC service (``shared/spec/SERVICE.md``): how a request becomes chunks.

* ``serve``        - :class:`ServerConfig`, :func:`create_server` and ``degrade-server``;
* ``degrader``     - :class:`DegradeService`, the ``degrade.v1.Degrader`` servicer:
  GetInfo, and StreamBatches turning produced batches into chunks;
* ``requests``     - validation of a request and its config overrides;
* ``fairness``     - round-robin production across streams;
* ``auth``, ``metrics``, ``health_probe`` - the bearer token, Prometheus counters
  and ``degrade-health``.

The top layer: it uses ``server.pipeline`` (and the degradation config); nothing
below imports it.
"""

from server import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ServerConfig": ".serve", "create_server": ".serve", "main": ".serve",
    "DegradeService": ".degrader", "SERVICE_NAME": ".degrader",
})
