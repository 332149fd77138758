"""Channels to degradation servers: TLS, token metadata and client-side balancing.

An address is anything gRPC resolves: ``host:port``, or ``dns:///name:port``
where one DNS name has many records (compose ``--scale``, a Kubernetes
headless Service); the channel's ``round_robin`` policy then spreads calls
over every resolved server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

#: Largest message the client accepts; servers keep chunks below 4 MiB.
MAX_RECEIVE_BYTES = 8 * 1024 * 1024

#: Channel options, each for a reason.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    # spread calls over every address a name resolves to (the default, pick_first, would use one)
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    # keepalive tells a dead server (crashed host, SIGSTOP, network gone: no FIN ever comes) from a slow one:
    # ping every 20 s while calls are open and close the connection when a ping is not answered within
    # 10 s, so its streams fail UNAVAILABLE and are asked for again, instead of hanging until the TCP
    # timeout (~15 min). A server that is only slow answers pings (gRPC's core does, whatever Python is
    # doing), so its streams stay open. The server accepts pings down to every 10 s (server/service/serve.py).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # keep pinging through a stream on which the server sends nothing for minutes (an overloaded pool):
    # by default a client stops after 2 pings without sending data itself
    ("grpc.http2.max_pings_without_data", 0),
    # reconnect quickly after a server restarts (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # re-resolve DNS promptly when the set of servers behind a name changes
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
]


@dataclass(frozen=True)
class TLS:
    """TLS settings: ``ca`` = PEM file of the CA to trust (None: the system roots)."""

    ca: Path | None = None
    server_name: str | None = None  # override the name checked in the certificate


def make_channel(address: str, tls: TLS | bool | str | Path | None = None) -> grpc.Channel:
    """A channel to ``address``; ``tls`` is None/False (plaintext), True (system roots), a CA path or :class:`TLS`."""
    if tls is None or tls is False:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if tls is True:
        tls = TLS()
    elif not isinstance(tls, TLS):
        tls = TLS(ca=Path(tls))
    root = Path(tls.ca).read_bytes() if tls.ca is not None else None
    options = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token of a client command: ``--token``, else ``--token-file``, else ``$DEGRADE_TOKEN``."""
    return token or (token_file.read_text().strip() if token_file else os.environ.get("DEGRADE_TOKEN"))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying the bearer token (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
