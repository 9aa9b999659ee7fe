"""A request's JSON body, read within a size limit, and the 4xx answer of one that cannot
be read (``BadRequest``: its status and a message naming what is wrong)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body; BadRequest 413 over ``limit`` bytes, 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"body is over the limit of {limit} bytes")
    try:
        return json.loads(bytes(body), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from None
