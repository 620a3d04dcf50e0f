"""An ASGI middleware for Serve's HTTP proxy: a request whose replica died while holding it gets a
503 with Retry-After (in the API's JSON error shape) instead of Serve's bare 500.

Serve retries a request that has not reached a replica yet, but when the replica's process dies
with the request on it, the proxy gets an ActorDiedError, sends nothing, and uvicorn answers a
plain-text `500 Internal Server Error`. The request did no harm and another replica (or the
replacement Serve starts) can take it again: that is a 503 to retry, not a bug.

Serve loads proxy middlewares from an import path in the environment of the Ray it runs on:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.proxy:middlewares

`charrnn serve` sets it (PROXY_ENV) before it starts its local Ray; on a cluster, set it where
`ray start` runs. No torch here: the proxy process stays small."""
from __future__ import annotations

import json

from starlette.middleware import Middleware

from deploy.limits import RETRY_AFTER_S
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deploy.proxy:middlewares"}


class ReplicaLostMiddleware:
    """Answers 503 + Retry-After for an HTTP request the proxy finished without any answer (the
    replica holding it died, or another failure before the answer started)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, watch)
        if not started:
            message = f"the replica serving this request stopped before answering; retry in {RETRY_AFTER_S} s"
            body = json.dumps({"error": {"message": message, "type": "unavailable_error", "param": None}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"retry-after", str(RETRY_AFTER_S).encode())]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """For RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: the proxy's extra middlewares."""
    return [Middleware(ReplicaLostMiddleware)]
