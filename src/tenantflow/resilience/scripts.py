"""A Lua script called by its SHA, sent again in full when the server does not have it (a
restart, a flushed script cache): one place for that dance, for the breakers and bulkheads."""

from __future__ import annotations

import hashlib
from typing import Any

# now_ms(): the Redis server's clock in ms. Every lease and wait of a script is measured on it,
# never on a client's, so processes whose clocks disagree still agree on when a lease ends.
NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis: Any, keys: tuple[str, ...], *args: Any) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(self.source, len(keys), *keys, *args)
