"""The ASGI middleware in front of the API: the API key (401) and the request body limit (413)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import APIError


class Gate:
    """ASGI middleware run before the app reads a request: the API key on /v1/* (401), then the body
    size (413, in OpenAI's shape): a declared Content-Length over the limit is refused at once, and a
    chunked body as soon as the bytes read pass it."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.key = None if api_key is None else api_key.encode()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        # the scheme is case-blind (RFC 9110); the key is compared in constant time
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body ({size} bytes) is larger than this server's limit of "
                             f"{self.max_body_bytes} bytes (--max-request-body-bytes); send a smaller request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.key is not None and scope["path"].startswith("/v1/") \
                and not self._authorized(headers.get("authorization", "")):
            err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "authentication_error", "invalid_api_key")
            return await err.response()(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(declared).response()(scope, receive, send)
        read = 0

        async def limited() -> dict[str, Any]:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_body_bytes:  # FastAPI hands an HTTPException raised while reading to its handler
                raise HTTPException(413, self._too_large(f"at least {read}").message)
            return message

        await self.app(scope, limited, send)
