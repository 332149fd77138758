"""Bearer-token authentication for every RPC but the health service."""

from __future__ import annotations

import hmac
from typing import Callable

import grpc

#: Methods that answer without a token (load balancers and orchestrators probe them).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny(handler: grpc.RpcMethodHandler, message: str, on_deny: Callable[[], None]) -> grpc.RpcMethodHandler:
    def abort(request, context):
        on_deny()
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires the metadata ``authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, token: str, on_deny: Callable[[], None] = lambda: None):
        if not token:
            raise ValueError("an empty token would let everyone in; pass no token to disable authentication")
        self._expected = f"Bearer {token}".encode()
        self._on_deny = on_deny

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        values = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == "authorization"]
        if not values:
            return _deny(handler, "this server needs a token: send the metadata 'authorization: Bearer <token>'",
                         self._on_deny)
        given = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        if len(values) > 1 or not hmac.compare_digest(given, self._expected):
            return _deny(handler, "wrong token in the 'authorization' metadata", self._on_deny)
        return handler
