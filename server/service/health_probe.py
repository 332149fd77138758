"""``degrade-health``: exit 0 when a server's gRPC health service says SERVING.

Used by the container HEALTHCHECK and by people; needs no token (health is open).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, *, service: str = "", timeout: float = 3.0, tls_ca: Path | None = None) -> str:
    """The health status name of ``service`` at ``address`` (e.g. "SERVING"), or an error text."""
    if tls_ca is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="degrade-health", description=__doc__)
    p.add_argument("--address", default="127.0.0.1:50051", help="server address (default %(default)s)")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default %(default)s)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA certificate when the server uses TLS")
    args = p.parse_args(argv)
    status = check(args.address, service=args.service, timeout=args.timeout, tls_ca=args.tls_ca)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
