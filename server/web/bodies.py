"""Reading a request body with a size limit, before it is all in memory (uvicorn sets no limit of its own)."""

from __future__ import annotations

from fastapi import Request


async def capped_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to be larger than ``limit`` bytes: from its Content-Length when
    it says so, else while it streams in (at most ``limit`` bytes and one more part are ever held)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            return None
    return body
