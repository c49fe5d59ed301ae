"""A loopback TCP proxy that injects network faults between tenantflow and a server.

Modes: ``pass`` (forward), ``latency`` (each chunk delayed by ``delay`` seconds, both ways),
``blackhole`` (connections stay open, nothing is forwarded either way: the server seems hung),
``reset`` (every open connection is reset, RST, and new ones are reset at once). It runs on
its own event loop in a thread, so the test's loop and the processes under test see it as a
server like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Literal

from tests.servers import free_port

Mode = Literal["pass", "latency", "blackhole", "reset"]
CHUNK = 65536


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode: Mode = "pass"
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._conns: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-proxy")
        self._server: asyncio.Server | None = None

    @property
    def url_netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        assert self._ready.wait(10), "the fault proxy did not start"
        return self

    def set(self, mode: Mode, *, delay: float = 0.0) -> None:
        """Switch mode; ``reset`` also resets every connection open now."""

        def apply() -> None:
            self.mode, self.delay = mode, delay
            if mode == "reset":
                for writer in list(self._conns):
                    _reset(writer)

        self._loop.call_soon_threadsafe(apply)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._conns):
                _reset(writer)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(client_w)  # the server is down: the client sees a refused-like reset
            return
        self._conns.update((client_w, server_w))
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w),
                self._pipe(server_r, client_w),
                return_exceptions=True,
            )
        finally:
            for writer in (client_w, server_w):
                self._conns.discard(writer)
                with contextlib.suppress(Exception):
                    writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            while self.mode == "blackhole":  # hold the bytes; the peer waits
                await asyncio.sleep(0.05)
            if self.mode == "reset":
                _reset(writer)
                return
            if self.mode == "latency" and self.delay:
                await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: the peer sees "connection reset by peer"."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
