"""Sign-in that cannot be abused: failed passwords are limited per account and per client
address before any hashing (429 sign-in-throttled with Retry-After), an unknown account and a
wrong password are answered alike, lock-outs are audited, the limits hold across API processes
on Redis, and guessing does not slow other tenants down (measured over loopback)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import pytest
from argon2 import PasswordHasher

from tenantflow import Runtime, Settings
from tenantflow.api.app import create_api
from tenantflow.platform.identity import Role
from tests.apps import api as workflows
from tests.commands import free_port
from tests.conftest import cleanup_production, production_settings
from tests.integration.test_api import PASSWORD, assert_problem, bearer, member, platform_call
from tests.integration.test_cli_ops import serving
from tests.servers import OwnRedis

LIMITS = {
    "signin_account_failures": 3,
    "signin_address_failures": 8,
    "signin_lockout_max_seconds": 30.0,
}
THROTTLED = "urn:tenantflow:problem:sign-in-throttled"


class CountingHasher(PasswordHasher):
    """The identity layer's hasher, counting verifications and how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().verify(hash, password)
        finally:
            with self._lock:
                self.running -= 1


@dataclass
class Guarded:
    """The API with small sign-in limits, its hasher counting, and alice an operator of
    acme; ``http`` is a client at 127.0.0.1, ``client_at`` makes one at another address."""

    runtime: Runtime
    http: httpx.AsyncClient
    client_at: Callable[[str], httpx.AsyncClient]
    hasher: CountingHasher


@pytest.fixture
async def guarded(settings: Settings) -> AsyncIterator[Guarded]:
    runtime = Runtime(settings.model_copy(update=LIMITS))
    await platform_call(runtime.registry.create, "acme")
    hasher = runtime.platform.identity.hasher = CountingHasher()
    api = create_api(workflows.app, runtime=runtime)
    made: list[httpx.AsyncClient] = []

    def client_at(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=api, client=(address, 4000))
        made.append(httpx.AsyncClient(transport=transport, base_url="http://tf.test"))
        return made[-1]

    try:
        http = client_at("127.0.0.1")
        await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
        yield Guarded(runtime, http, client_at, hasher)
    finally:
        for client in made:
            await client.aclose()
        await runtime.close()


def grant(email: str, password: str = "wrong password") -> dict[str, str]:
    return {"grant_type": "password", "email": email, "password": password, "tenant": "acme"}


async def attempt(http: httpx.AsyncClient, email: str, password: str = "wrong password") -> Any:
    began = time.perf_counter()
    reply = await http.post("/platform/v1/token", json=grant(email, password))
    return reply, time.perf_counter() - began


async def test_failures_lock_out_the_account_before_any_hashing(
    guarded: Guarded,
) -> None:
    runtime, client_at, hasher = guarded.runtime, guarded.client_at, guarded.hasher
    bodies = {}
    # An account, and none; each from an address of its own (within the address's limit).
    for account, address in (("alice@acme.test", "10.0.2.1"), ("nobody@acme.test", "10.0.2.2")):
        client = client_at(address)
        hashed = hasher.calls
        # Three free failures, and a fourth that locks the account out for a second.
        for _ in range(4):
            reply, _ = await attempt(client, account)
            bodies[(account, "401")] = assert_problem(reply, 401, "unauthenticated")
        assert hasher.calls - hashed == 4
        locked, _ = await attempt(client, account, PASSWORD)  # even the right password
        bodies[(account, "429")] = assert_problem(locked, 429, "sign-in-throttled")
        assert locked.headers["retry-after"] == "1"
        assert hasher.calls - hashed == 4  # refused without a hash
        await asyncio.sleep(1.1)
        # The next failure doubles the lock-out.
        reply, _ = await attempt(client, account)
        assert_problem(reply, 401, "unauthenticated")
        again, _ = await attempt(client, account)
        assert again.headers["retry-after"] == "2"
        await asyncio.sleep(2.1)
    # An unknown account and a wrong password: the same answers.
    assert bodies[("alice@acme.test", "401")] == bodies[("nobody@acme.test", "401")]
    assert bodies[("alice@acme.test", "429")] == bodies[("nobody@acme.test", "429")]
    assert "alice" not in str(bodies.values()) and "nobody" not in str(bodies.values())
    # Once the lock-out is over the right password works, and forgets the failures.
    client = client_at("10.0.2.1")
    reply, _ = await attempt(client, "alice@acme.test", PASSWORD)
    assert reply.status_code == 200, reply.text
    for _ in range(3):
        assert (await attempt(client, "alice@acme.test"))[0].status_code == 401
    # Each lock-out is in the platform audit log: the user's id, or nobody for no account.
    alice = await platform_call(runtime.platform.identity.user_by_email, "alice@acme.test")
    entries = await platform_call(
        runtime.platform.audit.query,
        tenant_id=None,
        action="sign_in.locked_out",
        platform_wide=True,
    )
    assert [(e.actor, e.target, e.details["scope"], e.details["seconds"]) for e in entries] == [
        ("anonymous", alice.id, "account", 1.0),
        ("anonymous", alice.id, "account", 2.0),
        ("anonymous", None, "account", 1.0),
        ("anonymous", None, "account", 2.0),
    ]
    assert [e.details["address"] for e in entries] == ["10.0.2.1"] * 2 + ["10.0.2.2"] * 2
    assert all(e.tenant_id is None for e in entries)
    assert "nobody" not in str(entries)


async def test_an_unknown_account_takes_as_long_as_a_wrong_password(
    guarded: Guarded,
) -> None:
    http = guarded.http
    known, unknown = [], []
    for i in range(3):  # within the free failures of each account (the address has 8)
        known.append((await attempt(http, "alice@acme.test"))[1])
        unknown.append((await attempt(http, f"nobody{i}@acme.test"))[1])
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.5 < ratio < 2.0, (known, unknown)


async def test_failures_from_one_address_lock_it_out_whatever_the_account(
    guarded: Guarded,
) -> None:
    runtime, http, client_at = guarded.runtime, guarded.http, guarded.client_at
    for i in range(9):  # eight free, one that locks the address out
        reply, _ = await attempt(http, f"guess{i}@acme.test")
        assert_problem(reply, 401, "unauthenticated")
    fresh, _ = await attempt(http, "alice@acme.test", PASSWORD)
    assert_problem(fresh, 429, "sign-in-throttled")
    entries = await platform_call(
        runtime.platform.audit.query,
        tenant_id=None,
        action="sign_in.locked_out",
        platform_wide=True,
    )
    assert [(e.target, e.details["scope"]) for e in entries] == [("127.0.0.1", "address")]
    # Another address is not affected.
    reply, _ = await attempt(client_at("10.0.0.7"), "alice@acme.test", PASSWORD)
    assert reply.status_code == 200, reply.text


async def test_hashes_run_a_few_at_a_time_off_the_event_loop(
    guarded: Guarded,
) -> None:
    runtime, http, hasher = guarded.runtime, guarded.http, guarded.hasher
    hasher.most = 0
    # Eight attempts at once, from eight addresses (within every limit): two hash at a time
    # (signin_concurrency), and the event loop answers meanwhile.
    clients = [guarded.client_at(f"10.0.1.{i}") for i in range(8)]
    began = time.perf_counter()
    attempts = [
        asyncio.ensure_future(c.post("/platform/v1/token", json=grant("alice@acme.test", PASSWORD)))
        for c in clients
    ]
    pings = []
    while not all(a.done() for a in attempts):
        sent = time.perf_counter()
        assert (await http.get("/healthz")).status_code == 200
        pings.append(time.perf_counter() - sent)
        await asyncio.sleep(0.01)
    took = time.perf_counter() - began
    assert [a.result().status_code for a in attempts] == [200] * 8
    assert hasher.most == runtime.settings.signin_concurrency == 2
    assert len(pings) > 10 and max(pings) < took / 4, (pings, took)
    # From one address, one at a time: one client never holds both threads.
    hasher.most = 0
    one_address = guarded.client_at("10.0.1.9")
    together = [attempt(one_address, "alice@acme.test", PASSWORD) for _ in range(3)]
    assert [r.status_code for r, _ in await asyncio.gather(*together)] == [200] * 3
    assert hasher.most == 1


@pytest.mark.parametrize("backend", ["production"])
async def test_lockouts_hold_across_api_processes(settings: Settings) -> None:
    """Two APIs, each with its own runtime (as two processes have), on one Redis: failures
    counted by one lock the account out on the other."""
    limited = settings.model_copy(update=LIMITS)
    runtimes = [Runtime(limited), Runtime(limited)]
    await platform_call(runtimes[0].registry.create, "acme")
    apis = [create_api(workflows.app, runtime=rt) for rt in runtimes]
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://tf.test")
        for api in apis
    ]
    try:
        await member(runtimes[0], clients[0], "alice@acme.test", "acme", Role.OPERATOR)
        for i in range(4):
            reply, _ = await attempt(clients[i % 2], "alice@acme.test")
            assert_problem(reply, 401, "unauthenticated")
        for client in clients:
            locked, _ = await attempt(client, "alice@acme.test", PASSWORD)
            assert_problem(locked, 429, "sign-in-throttled")
    finally:
        for client in clients:
            await client.aclose()
        for rt in runtimes:
            await rt.close()


async def test_sign_in_goes_on_limited_while_redis_is_away(tmp_path: Path) -> None:
    """The counts are Redis's; with Redis gone, sign-in still answers, limited by this
    process's own counts."""
    with OwnRedis(tmp_path) as redis:
        settings = production_settings(tmp_path, queue_url=redis.url, **LIMITS)
        runtime = Runtime(settings)
        try:
            await platform_call(runtime.registry.create, "acme")
            transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://tf.test") as http:
                await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
                redis.stop()
                for _ in range(4):
                    reply, _ = await attempt(http, "alice@acme.test")
                    assert_problem(reply, 401, "unauthenticated")
                locked, _ = await attempt(http, "alice@acme.test", PASSWORD)
                assert_problem(locked, 429, "sign-in-throttled")
        finally:
            await runtime.close()
            if redis.proc is None:
                redis.start()  # empty: what it held went with it
            cleanup_production(settings)


# -- guessing and other tenants, over loopback ------------------------------------------------

WINDOWS = 8  # idle and attack in turn, so that the machine's own ups and downs hit both
WINDOW_SECONDS = 1.5
ATTACK_RATE = 50  # wrong passwords a second, from one client
EDGE_SECONDS = 0.1  # samples this close to a window's edge belong to neither


def _attack(base: str, emails: list[str], start: float, rate: float) -> dict[str, int]:
    """Wrong passwords at ``rate`` a second, sent on a schedule without waiting for the
    answers, in the odd windows from ``start`` on; the answers' statuses, counted. A process
    of its own, writing HTTP/1.1 by hand over keep-alive connections: the load it adds to the
    machine is the server's, hardly its own."""
    host, port = base.removeprefix("http://").split(":")

    def request(email: str) -> bytes:
        body = orjson.dumps(grant(email))
        head = f"POST /platform/v1/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
        return f"{head}application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body

    async def main() -> Counter[str]:
        outcomes: Counter[str] = Counter()
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def exchange(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, email: str
        ) -> str:
            writer.write(request(email))
            status = (await reader.readuntil(b"\r\n")).split()[1].decode()
            length = 0
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            return status

        async def one(email: str) -> None:
            while idle:  # a connection idle past the server's keep-alive is closed by it
                reader, writer = idle.pop()
                try:
                    status = await exchange(reader, writer, email)
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()
            else:
                reader, writer = await asyncio.open_connection(host, int(port))
                status = await exchange(reader, writer, email)
            outcomes[status] += 1
            idle.append((reader, writer))

        sent: list[asyncio.Task[None]] = []
        for window in range(1, WINDOWS, 2):
            begin = start + window * WINDOW_SECONDS
            for i in range(int(rate * WINDOW_SECONDS)):
                await asyncio.sleep(max(0.0, begin + i / rate - time.time()))
                sent.append(asyncio.create_task(one(random.choice(emails))))
        await asyncio.gather(*sent)
        for _, writer in idle:
            writer.close()
        return outcomes

    return dict(asyncio.run(main()))


def measure_under_guessing(home: Path, env: dict[str, str]) -> dict[str, Any]:
    """Another tenant's ``GET /v1/runs/{id}`` latencies, idle and while one client sends
    wrong passwords at ``ATTACK_RATE`` a second, against ``tenantflow api`` on loopback."""
    home.mkdir(parents=True)
    settings = Settings(home=home / "home")
    runtime = Runtime(settings)
    try:
        for tenant in ("acme", "globex"):
            runtime.registry.create(tenant)
        for email, tenant in (("alice@acme.test", "acme"), ("gus@globex.test", "globex")):
            user = runtime.platform.create_user("system", email, PASSWORD)
            runtime.platform.set_membership("system", user.id, tenant, Role.OPERATOR)
    finally:
        asyncio.run(runtime.close())
    env = {"TENANTFLOW_HOME": str(settings.home), **env}
    with serving(home, free_port(), env=env, worker=False) as base:
        with httpx.Client(base_url=base, timeout=30) as http:
            signed_in = http.post(
                "/platform/v1/token", json=grant("gus@globex.test", PASSWORD) | {"tenant": "globex"}
            )
            gus = bearer(signed_in.json()["access_token"])
            run = http.post("/v1/runs", json={"workflow": "greet", "args": ["x"]}, headers=gus)
            path = f"/v1/runs/{run.json()['id']}"
            emails = ["alice@acme.test", *(f"guess{i}@acme.test" for i in range(9))]
            start = time.time() + 2.0  # the attacker's process is up by then
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as attacker:
                attacked = attacker.submit(_attack, base, emails, start, ATTACK_RATE)
                windows: list[list[float]] = [[] for _ in range(WINDOWS)]
                while (now := time.time()) < start + WINDOWS * WINDOW_SECONDS:
                    began = time.perf_counter()
                    assert http.get(path, headers=gus).status_code == 200
                    took = time.perf_counter() - began
                    offset = now - start
                    within = offset % WINDOW_SECONDS
                    if offset > 0 and EDGE_SECONDS < within < WINDOW_SECONDS - EDGE_SECONDS:
                        windows[int(offset // WINDOW_SECONDS)].append(took)
                    time.sleep(0.01)
                outcomes = attacked.result(timeout=120)
    idle = [s for w in windows[0::2] for s in w]
    attack = [s for w in windows[1::2] for s in w]
    return {
        "idle_p50_ms": round(statistics.median(idle) * 1000, 2),
        "idle_p95_ms": round(_p95(idle) * 1000, 2),
        "attack_p50_ms": round(statistics.median(attack) * 1000, 2),
        "attack_p95_ms": round(_p95(attack) * 1000, 2),
        "samples": (len(idle), len(attack)),
        "outcomes": outcomes,
    }


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


@pytest.mark.slow
def test_guessing_passwords_does_not_slow_other_tenants(tmp_path: Path) -> None:
    """50 wrong passwords a second from one client leave another tenant's p95 within 1.5x of
    idle. The machine is shared with other work, whose bursts can land on either kind of
    window: one more measurement when the first is over the bound, never a third."""
    figures = measure_under_guessing(tmp_path / "first", {})
    if figures["attack_p95_ms"] > 1.5 * figures["idle_p95_ms"]:
        sys.stderr.write(f"sign-in under guessing, measured again after: {figures}\n")
        figures = measure_under_guessing(tmp_path / "second", {})
    sys.stderr.write(f"sign-in under guessing: {figures}\n")
    outcomes = figures["outcomes"]
    attempts = sum(outcomes.values())
    assert attempts == WINDOWS // 2 * ATTACK_RATE * WINDOW_SECONDS, figures
    # The address's 20 free failures, then one as each lock-out ends; the rest refused.
    assert outcomes.get("401", 0) <= 30 and outcomes.get("429", 0) >= 0.8 * attempts, figures
    assert figures["attack_p95_ms"] <= 1.5 * figures["idle_p95_ms"], figures
