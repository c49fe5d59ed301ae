"""The route class of every router: request bodies read as JSON is written (RFC 8259).

Python's ``json``, which FastAPI reads bodies with, takes ``NaN``, ``Infinity`` and ``1e400``
(an infinity); none of them is JSON, and none could be stored (orjson would write ``null``).
Here they are a ``JSONDecodeError``, which FastAPI answers as invalid JSON: a 422 located at
the body, before any route sees the value.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from tenantflow.serde import parse_json


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
