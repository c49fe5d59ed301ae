"""What the per-request access check costs (issue 14: under 5 % of a ``GET /v1/runs/{id}``).

    python -m bench.auth [--rounds 5] [--n 2000]

On the embedded default, in one process: ``GET /v1/runs/{id}`` through the whole HTTP app
(ASGI, no network: the app's own cost, which is what the check adds to), ``n`` sequential
requests with one operator's token, in two modes, rounds interleaved:

- ``checked``: as shipped, the token's grant checked against the platform's current state
  (``platform.access``; a cached grant on all but the first request of a round);
- ``claims``: the check replaced by the token's claims alone (what a JWT-only API does).

Reports each mode's median request time per round, the ratio checked/claims, and the check
alone on a cached grant (microseconds per ``AccessGuard.admit``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PASSWORD = "correct horse battery"


async def main(rounds: int, n: int) -> None:
    import httpx

    from tenantflow import App, Runtime, Settings, WorkflowContext
    from tenantflow.api.app import create_api
    from tenantflow.client import Client
    from tenantflow.platform.access import principal_from_claims
    from tenantflow.platform.identity import Role
    from tenantflow.telemetry.logging import configure_logging

    app = App("bench-auth")

    @app.workflow
    async def hello(ctx: WorkflowContext) -> str:
        return "hi"

    configure_logging("WARNING")
    folder = Path(tempfile.mkdtemp(prefix="tf-bench-auth-"))
    runtime = Runtime(Settings(home=folder / ".tenantflow", log_level="WARNING"))
    await asyncio.to_thread(runtime.registry.create, "acme")
    platform = runtime.platform
    user = await asyncio.to_thread(platform.create_user, "system", "op@acme.test", PASSWORD)
    await asyncio.to_thread(platform.set_membership, "system", user.id, "acme", Role.OPERATOR)
    run_id = (await Client(app, runtime=runtime).tenant("acme").start(hello)).run_id
    api = create_api(app, runtime=runtime)
    guard = runtime.access
    admit = guard.admit

    async def by_claims(claims: dict[str, Any], kid: str | None) -> Any:
        return principal_from_claims(claims)

    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        grant = {
            "grant_type": "password",
            "email": "op@acme.test",
            "password": PASSWORD,
            "tenant": "acme",
        }
        token = (await http.post("/platform/v1/token", json=grant)).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        async def measure() -> float:
            times = []
            for _ in range(n):
                began = time.perf_counter()
                reply = await http.get(f"/v1/runs/{run_id}", headers=headers)
                times.append(time.perf_counter() - began)
                assert reply.status_code == 200, reply.text
            return statistics.median(times)

        medians: dict[str, list[float]] = {"checked": [], "claims": []}
        await measure()  # warm-up: imports, caches, the first grant read
        for _ in range(rounds):
            for mode in ("checked", "claims"):
                guard.admit = admit if mode == "checked" else by_claims  # type: ignore[method-assign]
                medians[mode].append(await measure())
        guard.admit = admit  # type: ignore[method-assign]

        import jwt

        claims = jwt.decode(token, options={"verify_signature": False})
        kid = jwt.get_unverified_header(token).get("kid")
        calls = 20_000
        began = time.perf_counter()
        for _ in range(calls):
            await guard.admit(claims, kid)
        alone = (time.perf_counter() - began) / calls

    await runtime.close()
    ratios = [c / b for c, b in zip(medians["checked"], medians["claims"], strict=True)]
    for i, (c, b) in enumerate(zip(medians["checked"], medians["claims"], strict=True)):
        print(f"round {i + 1}: checked {c * 1e6:.0f} µs, claims {b * 1e6:.0f} µs, {c / b:.3f}")
    print(
        f"median request: checked {statistics.median(medians['checked']) * 1e6:.0f} µs, "
        f"claims {statistics.median(medians['claims']) * 1e6:.0f} µs; "
        f"ratio median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(f"the check alone, on a cached grant: {alone * 1e6:.2f} µs per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.n))
