"""The CLI as a script or an operator uses it: setting up from nothing, acting on runs, and
the one-line errors of bad input and unreachable backends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main

from tenantflow.cli import cli
from tests.commands import ROOT, as_json, free_port, ok, tenantflow

pytestmark = pytest.mark.slow
ADMIN_PASSWORD = "correct-horse-battery"


def in_background(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """The command running on, as a user starts a server; its output read at the end."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    base.update(COLUMNS="200", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(
        [sys.executable, "-m", "tenantflow", *args],
        cwd=cwd,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_every_option_and_argument_has_help() -> None:
    root = typer.main.get_command(cli)
    missing = []

    def visit(command: Any, path: str) -> None:
        for param in command.params:
            if param.name != "help" and not getattr(param, "help", None):
                missing.append(f"{path} {param.name}")
        for name, sub in getattr(command, "commands", {}).items():
            assert sub.help, f"{path} {name} has no help"
            visit(sub, f"{path} {name}")

    visit(root, "tenantflow")
    assert missing == []


def test_every_command_is_in_the_docs() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    leaves = []

    def visit(command: Any, path: str) -> None:
        subs = getattr(command, "commands", {})
        if not subs:
            leaves.append(path)
        for name, sub in subs.items():
            visit(sub, f"{path} {name}")

    visit(typer.main.get_command(cli), "tenantflow")
    assert len(leaves) >= 20
    assert [path for path in leaves if f"`{path}" not in doc] == []


def test_a_production_installation_from_nothing(tmp_path: Path) -> None:
    """The platform admin, a tenant, a key, the key exchanged over HTTP, revoked, a lost
    password reset: all without `tenantflow dev`."""
    made = tenantflow(
        "admin",
        "create",
        "ops@example.com",
        cwd=tmp_path,
        env={"TENANTFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    assert ADMIN_PASSWORD not in ok(made) + made.stderr
    assert made.stdout.startswith("created platform administrator ops@example.com")
    # The same email again, and a short password from standard input: one line each.
    again = tenantflow("admin", "create", "ops@example.com", cwd=tmp_path, stdin=ADMIN_PASSWORD)
    assert (again.returncode, again.stderr) == (2, "error: a user with this email exists\n")
    short = tenantflow("admin", "create", "dev@example.com", cwd=tmp_path, stdin="short\n")
    assert short.returncode == 2
    assert short.stderr.startswith("error: the password needs at least 8 characters")
    assert [
        a["email"] for a in as_json(tenantflow("admin", "list", "--json", cwd=tmp_path))["admins"]
    ] == ["ops@example.com"]

    assert as_json(tenantflow("tenants", "create", "acme", "--json", cwd=tmp_path))["id"] == "acme"
    key = as_json(
        tenantflow("keys", "create", "--tenant", "acme", "--name", "ci", "--json", cwd=tmp_path)
    )
    assert key["role"] == "operator" and key["secret"].startswith(f"tfk_{key['id']}_")
    listed = as_json(tenantflow("keys", "list", "--tenant", "acme", "--json", cwd=tmp_path))
    assert [k["id"] for k in listed["keys"]] == [key["id"]]
    assert all(k["secret"] is None for k in listed["keys"])  # never shown again

    port = free_port()
    with serving(tmp_path, port) as base:
        grant = {"grant_type": "api_key", "api_key": key["secret"]}
        assert httpx.post(f"{base}/platform/v1/token", json=grant).status_code == 200
        ok(tenantflow("keys", "revoke", key["id"], "--tenant", "acme", cwd=tmp_path))
        refused = httpx.post(f"{base}/platform/v1/token", json=grant)
        assert refused.status_code == 401
        password = {"grant_type": "password", "email": "ops@example.com"}
        assert (
            httpx.post(
                f"{base}/platform/v1/token", json={**password, "password": ADMIN_PASSWORD}
            ).status_code
            == 200
        )
        reset = tenantflow(
            "admin", "reset-password", "ops@example.com", cwd=tmp_path, stdin="a-new-secret-1\n"
        )
        assert ok(reset) == "password of ops@example.com reset\n"
        assert (
            httpx.post(
                f"{base}/platform/v1/token", json={**password, "password": ADMIN_PASSWORD}
            ).status_code
            == 401
        )
        assert (
            httpx.post(
                f"{base}/platform/v1/token", json={**password, "password": "a-new-secret-1"}
            ).status_code
            == 200
        )
        new = {**password, "password": "a-new-secret-1"}
        assert ok(tenantflow("admin", "disable", "ops@example.com", cwd=tmp_path)) == (
            "ops@example.com disabled\n"
        )
        assert httpx.post(f"{base}/platform/v1/token", json=new).status_code == 401
        ok(tenantflow("admin", "enable", "ops@example.com", cwd=tmp_path))
        assert httpx.post(f"{base}/platform/v1/token", json=new).status_code == 200
    nobody = tenantflow(
        "admin", "reset-password", "nobody@example.com", cwd=tmp_path, stdin="a-new-secret-1"
    )
    assert (nobody.returncode, nobody.stderr) == (2, "error: no user with this email\n")
    audit = tenantflow("keys", "revoke", key["id"], "--tenant", "globex", cwd=tmp_path)
    assert (audit.returncode, audit.stderr) == (2, "error: no such API key\n")


class serving:
    """``tenantflow api`` and ``tenantflow worker`` as two processes, the way production
    runs them (``worker=False``: the API alone); stopped with SIGTERM at the end of the
    block."""

    def __init__(
        self,
        home: Path,
        port: int,
        app: str = "tests.apps.api:app",
        env: dict[str, str] | None = None,
        *,
        worker: bool = True,
    ) -> None:
        self.home, self.port, self.app, self.env = home, port, app, env or {}
        self.commands = [["api", "--port", str(port)], *([["worker"]] if worker else [])]
        self.procs: list[subprocess.Popen[str]] = []
        self.output: list[str] = []

    def __enter__(self) -> str:
        for command in self.commands:
            self.procs.append(
                in_background(*command, "--app", self.app, cwd=self.home, env=self.env)
            )
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    return base
            except httpx.ConnectError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"not serving: {self._stop()}")
            time.sleep(0.1)

    def _stop(self) -> list[tuple[list[str], int | None, str]]:
        """Stop every process; each one's command, exit code and output."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        found = []
        for command, proc in zip(self.commands, self.procs, strict=True):
            out, _ = proc.communicate(timeout=30)
            found.append((command, proc.returncode, out))
        return found

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            out, _ = proc.communicate(timeout=30)
            self.output.append(out)
            assert proc.returncode == 0, out


def test_a_worker_stopped_while_it_waits_for_its_backends_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM while the worker waits for a queue that does not answer yet (a rollout that
    stops a pod still starting) is a request to stop: exit 0, not death by signal."""
    env = {"TENANTFLOW_QUEUE_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = in_background("worker", "--app", "tests.apps.api:app", cwd=tmp_path, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # the worker's first line: it loaded the app, and now waits
        if line.startswith("worker:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_api_and_worker_say_what_they_serve(tmp_path: Path) -> None:
    port = free_port()
    server = serving(tmp_path, port)
    with server:
        pass
    api, worker = server.output
    home = Path(".tenantflow")  # as the settings have it: relative to where it runs
    assert api.splitlines()[0] == (
        f"api on http://127.0.0.1:{port}: app 'api-tests' "
        "(workflows: approval, fulfil_order, greet, slow); "
        f"platform database sqlite:///{home / 'platform.db'}; queue sqlite:///{home / 'queue.db'}"
    )
    assert worker.splitlines()[0].startswith("worker: app 'api-tests' (workflows: approval,")
    assert worker.splitlines()[0].endswith("; concurrency 64")


def test_runs_started_signalled_and_cancelled_from_the_cli(tmp_path: Path) -> None:
    ok(tenantflow("tenants", "create", "acme", cwd=tmp_path))
    app = ["--app", "tests.apps.api:app"]
    with serving(tmp_path, free_port()):
        started = as_json(
            tenantflow(
                "runs",
                "start",
                "greet",
                "-t",
                "acme",
                "--args",
                '["cli"]',
                "--wait",
                "30",
                "--json",
                *app,
                cwd=tmp_path,
            )
        )
        assert (started["status"], started["result"]) == ("completed", "hello cli")
        keyed = ["runs", "start", "approval", "-t", "acme", "--args", "[7]"]
        keyed += ["--idempotency-key", "o-7", *app]
        run_id = ok(tenantflow(*keyed, cwd=tmp_path)).split()[0]
        same = tenantflow(*keyed, cwd=tmp_path)
        assert ok(same).split()[0] == run_id  # the same key: the same run
        wait_status(tmp_path, run_id, "waiting")
        ok(
            tenantflow(
                "runs",
                "event",
                run_id,
                "decision",
                "-t",
                "acme",
                "--payload",
                '"yes"',
                cwd=tmp_path,
            )
        )
        done = wait_status(tmp_path, run_id, "completed")
        assert done["result"] == {"order": 7, "decision": "yes"}

        slow = ok(
            tenantflow(
                "runs", "start", "approval", "-t", "acme", "--args", "[8]", *app, cwd=tmp_path
            )
        )
        wait_status(tmp_path, slow.split()[0], "waiting")
        cancelled = as_json(
            tenantflow("runs", "cancel", slow.split()[0], "-t", "acme", "--json", cwd=tmp_path)
        )
        assert cancelled["cancel_requested"] is True
        assert wait_status(tmp_path, slow.split()[0], "cancelled")["status"] == "cancelled"

    listed = as_json(tenantflow("runs", "list", "-t", "acme", "--json", cwd=tmp_path))
    assert {r["status"] for r in listed["runs"]} == {"completed", "cancelled"}
    assert listed["next_cursor"] is None
    audit = as_json(tenantflow("status", "--json", cwd=tmp_path))
    assert audit["tenants"][0]["tenant_id"] == "acme"


def test_a_run_no_worker_knows_is_dead_lettered_with_its_reason(tmp_path: Path) -> None:
    ok(tenantflow("tenants", "create", "acme", cwd=tmp_path))
    with serving(tmp_path, free_port(), env={"TENANTFLOW_MAX_DELIVERIES": "2"}):
        # Submitted with an app that has the workflow; served by workers whose app has not.
        start = ["runs", "start", "many_steps", "-t", "acme", "--args", "[1]"]
        run_id = ok(tenantflow(*start, "--app", "tests.apps.durable:app", cwd=tmp_path)).split()[0]
        deadline = time.monotonic() + 60
        while not (
            letters := as_json(
                tenantflow("dead-letters", "list", "-t", "acme", "--json", cwd=tmp_path)
            )["dead_letters"]
        ):
            assert time.monotonic() < deadline, "no dead letter"
            time.sleep(0.5)
    reason = "workflow 'many_steps' is not registered in this worker's app 'api-tests'"
    assert [(d["run_id"], d["reason"], d["parked"]) for d in letters] == [(run_id, reason, True)]
    table = ok(tenantflow("dead-letters", "list", "-t", "acme", cwd=tmp_path))
    assert reason in table
    shown = as_json(tenantflow("runs", "show", run_id, "-t", "acme", "--json", cwd=tmp_path))
    assert (shown["status"], shown["stuck_reason"]) == (
        "queued",
        f"{reason}; dead-lettered after 2 deliveries: replay the dead letter once a worker has "
        "the workflow",
    )
    ok(tenantflow("dead-letters", "replay", letters[0]["id"], "-t", "acme", cwd=tmp_path))
    after = as_json(tenantflow("dead-letters", "list", "-t", "acme", "--json", cwd=tmp_path))
    assert after["dead_letters"] == []


def wait_status(home: Path, run_id: str, status: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        found = as_json(tenantflow("runs", "show", run_id, "-t", "acme", "--json", cwd=home))
        if found["status"] == status:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


@pytest.fixture(scope="module")
def acme_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An installation with one tenant, shared by tests that change nothing in it."""
    home = tmp_path_factory.mktemp("acme")
    ok(tenantflow("tenants", "create", "acme", cwd=home))
    return home


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["runs", "start", "greet", "-t", "acme", "--args", "{no"], "--args is not valid JSON"),
        (
            ["runs", "start", "greet", "-t", "acme", "--args", '{"a": 1}'],
            "--args must be a JSON array",
        ),
        (
            ["runs", "start", "nope", "-t", "acme"],
            "no workflow 'nope' is registered in app 'api-tests'",
        ),
        (["runs", "start", "greet", "-t", "nobody", "--args", '["x"]'], "no tenant 'nobody'"),
        (
            ["runs", "event", "r1", "e", "-t", "acme", "--payload", "{"],
            "--payload is not valid JSON",
        ),
        (
            ["runs", "start", "slow", "-t", "acme", "--args", "[NaN]"],
            "--args is not valid JSON: NaN, Infinity and numbers beyond a double's range are not "
            "JSON: line 1 column 2 (char 1)",
        ),
        (
            ["runs", "event", "r1", "e", "-t", "acme", "--payload", '{"x": -Infinity}'],
            "--payload is not valid JSON: NaN, Infinity",
        ),
        (
            ["plans", "create", "gold", "--requests-per-second", "inf"],
            "--requests-per-second: Input should be a finite number",
        ),
        (
            ["plans", "create", "gold", "--runs-per-month", str(2**70)],
            "--runs-per-month: Input should be less than or equal to 2147483647",
        ),
        (["runs", "cancel", "r1", "-t", "acme"], "no run r1 in this tenant"),
        (["dead-letters", "replay", "17", "-t", "acme"], "no dead letter 17 in this tenant"),
        (["dead-letters", "list", "-t", "nobody"], "no tenant 'nobody'"),
        (
            ["plans", "create", "gold", "--dispatch-weight", "0"],
            "--dispatch-weight: Input should be greater than or equal to 1",
        ),
        (
            ["plans", "create", "gold", "--dispatch-weight", "101"],
            "--dispatch-weight: Input should be less than or equal to 100",
        ),
        (["plans", "create", "Gold"], "PLAN_ID: String should match pattern"),
        (["plans", "create", "gold", "--seats", "-1"], "--seats: Input should be greater than"),
        (
            ["worker", "--app", "no_such_module:app"],
            "--app 'no_such_module:app': importing no_such_module failed: "
            "ModuleNotFoundError: No module named 'no_such_module'",
        ),
        (["worker", "--app", "missing.py:app"], "--app 'missing.py:app': no file missing.py"),
        (
            ["worker", "--app", "justamodule"],
            "--app 'justamodule': expected module:attribute or path/to/file.py:attribute, "
            "e.g. myproject.workflows:app",
        ),
        (
            ["worker", "--app", "tests.apps.api:nothing"],
            "--app 'tests.apps.api:nothing': tests.apps.api has no attribute 'nothing'",
        ),
        (
            ["worker", "--app", "tests.apps.api:asyncio"],
            "--app 'tests.apps.api:asyncio': asyncio is a module, not a tenantflow App",
        ),
    ],
)
def test_bad_input_is_one_line(acme_home: Path, args: list[str], error: str) -> None:
    if "greet" in args or "nope" in args or "slow" in args:
        args = [*args, "--app", "tests.apps.api:app"]
    done = tenantflow(*args, cwd=acme_home)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {error}") and done.stderr.count("\n") == 1


def test_plans_with_a_dispatch_weight(tmp_path: Path) -> None:
    gold = ["gold", "--dispatch-weight", "3", "--concurrent-runs", "8", "--json"]
    made = as_json(tenantflow("plans", "create", *gold, cwd=tmp_path))
    assert made["quotas"] == {
        "runs_per_month": None,
        "concurrent_runs": 8,
        "seats": None,
        "requests_per_second": None,
        "dispatch_weight": 3,
    }
    assert ok(tenantflow("plans", "create", "basic", cwd=tmp_path)) == (
        "created plan basic (dispatch weight 1)\n"
    )
    listed = as_json(tenantflow("plans", "list", "--json", cwd=tmp_path))["plans"]
    assert {p["id"]: p["quotas"]["dispatch_weight"] for p in listed} == {"basic": 1, "gold": 3}
    table = ok(tenantflow("plans", "list", cwd=tmp_path))
    assert "weight" in table and "gold" in table
    tenant = as_json(
        tenantflow("tenants", "create", "acme", "--plan", "gold", "--json", cwd=tmp_path)
    )
    assert tenant["plan"] == "gold"
    # Not a whole number: the option's own error, exit status 2, and no plan.
    half = tenantflow("plans", "create", "half", "--dispatch-weight", "2.5", cwd=tmp_path)
    assert half.returncode == 2 and "Invalid value for '--dispatch-weight'" in half.stderr
    assert len(as_json(tenantflow("plans", "list", "--json", cwd=tmp_path))["plans"]) == 2


def test_an_app_file_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "flows.py").write_text("import not_installed_anywhere\n")
    done = tenantflow("worker", "--app", "flows.py:app", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (
        2,
        "error: --app 'flows.py:app': importing flows.py failed: "
        "ModuleNotFoundError: No module named 'not_installed_anywhere'\n",
    )
    (tmp_path / "flows.py").write_text(
        "from tenantflow import App, WorkflowContext\napp = App('mine')\n\n"
        "@app.workflow\nasync def hello(ctx: WorkflowContext) -> str:\n    return 'hi'\n"
    )
    ok(tenantflow("tenants", "create", "acme", cwd=tmp_path))
    started = tenantflow(
        "runs", "start", "hello", "-t", "acme", "--app", "flows.py:app", cwd=tmp_path
    )
    assert ok(started).split()[1:] == ["hello", "queued"]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a server that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "command", [["status"], ["demo", "--orders", "1"], ["runs", "list", "-t", "acme"]]
)
def test_a_database_that_does_not_answer_fails_within_the_timeout(
    tmp_path: Path, silent_port: int, command: list[str]
) -> None:
    url = f"postgresql://tf:s3cret@127.0.0.1:{silent_port}/platform"
    started = time.monotonic()
    done = tenantflow(
        *command,
        cwd=tmp_path,
        env={"TENANTFLOW_DATABASE_URL": url, "TENANTFLOW_DATABASE_TIMEOUT_SECONDS": "1"},
    )
    assert time.monotonic() - started < 15
    assert (done.returncode, done.stderr) == (
        2,
        f"error: cannot reach PostgreSQL at 127.0.0.1:{silent_port}: no answer in time "
        f"(TENANTFLOW_DATABASE_URL=postgresql://tf@127.0.0.1:{silent_port}/platform)\n",
    )


@pytest.mark.parametrize("command", [["status"], ["demo", "--orders", "1"]])
def test_a_redis_that_does_not_answer_fails_within_the_timeout(
    tmp_path: Path, silent_port: int, command: list[str]
) -> None:
    closed = free_port()
    for port, why in ((silent_port, "no answer in time"), (closed, "connection refused")):
        started = time.monotonic()
        done = tenantflow(
            *command,
            cwd=tmp_path,
            env={
                "TENANTFLOW_QUEUE_URL": f"redis://:s3cret@127.0.0.1:{port}/0",
                "TENANTFLOW_REDIS_TIMEOUT_SECONDS": "1",
            },
        )
        assert time.monotonic() - started < 15
        assert (done.returncode, done.stderr) == (
            2,
            f"error: cannot reach Redis at 127.0.0.1:{port}: {why} "
            f"(TENANTFLOW_QUEUE_URL=redis://127.0.0.1:{port}/0)\n",
        )


def test_a_worker_keeps_retrying_with_one_line_per_back_off(tmp_path: Path) -> None:
    closed = free_port()
    proc = in_background(
        "worker",
        cwd=tmp_path,
        env={
            "TENANTFLOW_QUEUE_URL": f"redis://127.0.0.1:{closed}/0",
            "TENANTFLOW_RECONCILE_INTERVAL": "0.5",
        },
    )
    time.sleep(5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    retries = [line for line in out.splitlines() if "dequeue failed; retrying" in line]
    assert len(retries) >= 5, out
    assert all("backend=redis" in line and "error='connection refused'" in line for line in retries)
    sweeps = [line for line in out.splitlines() if "maintenance failed" in line]
    assert sweeps and all("error='connection refused'" in line for line in sweeps), out


def test_a_worker_started_before_its_database_waits_for_it(tmp_path: Path) -> None:
    closed = free_port()
    url = f"postgresql://tf:s3cret@127.0.0.1:{closed}/platform"
    proc = in_background("worker", cwd=tmp_path, env={"TENANTFLOW_DATABASE_URL": url})
    time.sleep(3)
    assert proc.poll() is None  # still waiting, not exited
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out and "s3cret" not in out
    waits = [line for line in out.splitlines() if "backend unavailable; retrying" in line]
    assert len(waits) >= 2, out
    assert all("backend=postgresql" in line and "connection refused" in line for line in waits)
