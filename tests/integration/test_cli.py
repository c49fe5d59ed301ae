"""The quickstart's main job and the inspection commands, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import free_port, tenantflow

pytestmark = pytest.mark.slow


def test_demo_then_inspect_runs(tmp_path: Path) -> None:
    demo = tenantflow("demo", "--orders", "6", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    for tenant in ("acme", "globex"):
        assert tenant in demo.stdout
        assert (tmp_path / ".tenantflow" / "tenants" / f"{tenant}.db").exists()
    assert "retries" in demo.stdout

    listing = tenantflow("runs", "list", "--tenant", "acme", "--status", "completed", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    run_ids = [line.split()[1] for line in listing.stdout.splitlines() if "fulfil_order" in line]
    assert len(run_ids) == 6

    shown = tenantflow("runs", "show", run_ids[0], "--tenant", "acme", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for part in ("completed", "reserve_stock", "charge_card", "sleep", "ship", "tracking"):
        assert part in shown.stdout

    # The other tenant cannot see this run: its database does not hold it.
    other = tenantflow("runs", "show", run_ids[0], "--tenant", "globex", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr == f"error: no run {run_ids[0]} in tenant globex\n"

    missing = tenantflow("runs", "list", "--tenant", "nobody", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == "error: no tenant 'nobody'\n"


def test_demo_runs_unchanged_on_postgresql_and_redis(tmp_path: Path) -> None:
    from tests.conftest import cleanup_production, production_settings, settings_env

    settings = production_settings(tmp_path)
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")},
            **settings_env(settings),
            "COLUMNS": "200",
        }
        demo = subprocess.run(
            [sys.executable, "-m", "tenantflow", "demo", "--orders", "5"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stderr
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "tenantflow",
                "runs",
                "list",
                "--tenant",
                "globex",
                "--status",
                "completed",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.stdout.count("fulfil_order") == 5, listing.stdout
        assert not (tmp_path / ".tenantflow" / "tenants").exists()  # nothing went to SQLite
    finally:
        cleanup_production(settings)


def start_dev(tmp_path: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    """``tenantflow dev`` in the background, serving; returns it and its first lines."""
    import time

    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tenantflow",
            "dev",
            "--app",
            "tests.apps.api:app",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while not any(line.startswith("API on") for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, lines
        lines.append(proc.stdout.readline().rstrip("\n"))
    while True:  # the server may still be binding
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc, lines
        except httpx.ConnectError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, lines
        time.sleep(0.1)


def stop_dev(proc: subprocess.Popen[str]) -> int:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def test_dev_serves_the_api_and_a_worker(tmp_path: Path) -> None:
    import httpx

    port = free_port()
    proc, lines = start_dev(tmp_path, port)
    try:
        keys = {line.split()[3]: line.split()[-1] for line in lines if "API key of" in line}
        assert set(keys) == {"acme", "globex"}
        base = f"http://127.0.0.1:{port}"
        grant = {"grant_type": "api_key", "api_key": keys["acme"]}
        access = httpx.post(f"{base}/platform/v1/token", json=grant).json()["access_token"]
        headers = {"Authorization": f"Bearer {access}"}
        started = httpx.post(
            f"{base}/v1/runs", json={"workflow": "greet", "args": ["dev"]}, headers=headers
        )
        assert started.status_code == 202, started.text
        location = started.headers["location"]
        with httpx.stream("GET", f"{base}{location}/stream", headers=headers) as stream:
            text = "".join(stream.iter_text())
        assert '"status":"completed"' in text and '"result":"hello dev"' in text
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        assert stop_dev(proc) == 0  # drained and closed, then a normal exit
    # A second start keeps the tenants and credentials, and shows no secret again.
    proc, lines = start_dev(tmp_path, port)
    assert stop_dev(proc) == 0
    assert not any("API key of" in line for line in lines)
    assert any("printed on the first start" in line for line in lines)


def run_example(module: str) -> str:
    """Run ``python -m tenantflow.examples.<module>`` as a user would; its output."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", f"tenantflow.examples.{module}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_saga_example_runs() -> None:
    out = run_example("trip")
    assert "oslo: compensated" in out
    assert "still booked: ['rome:car', 'rome:flight', 'rome:hotel']" in out


def test_the_resilience_example_runs() -> None:
    out = run_example("outage")
    assert "charged: 12 of 12" in out
    assert "most charges at once: 2 (bulkhead: 2)" in out
    assert "breaker now: closed" in out
    down = int(out.split(" while it was down")[0].rsplit("(", 1)[1])
    assert 4 <= down <= 8  # four opened it, then one failed probe per half second


def test_status_shows_each_tenant(tmp_path: Path) -> None:
    assert tenantflow("demo", "--orders", "2", cwd=tmp_path).returncode == 0
    shown = tenantflow("status", cwd=tmp_path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = [line for line in shown.stdout.splitlines() if "acme" in line or "globex" in line]
    assert len(rows) == 2 and all(" 0 " in row for row in rows), shown.stdout
