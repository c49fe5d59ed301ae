"""The README's first command as a newcomer meets it, checked from outside over HTTP.

Usage: python3 .ci/smoke.py FOLDER

In FOLDER (a fresh clone of the checkout), runs the first command of the README's quickstart
verbatim (a new venv, the base install only, ``tenantflow dev``) on a free port, waits for
``/healthz``, exchanges the API key it printed for a token, submits a run, waits for it to
complete, imports every public module in that venv, and stops the server. Standard library
only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

START_SECONDS = 600  # the base install downloads its dependencies first
RUN_SECONDS = 120
KEY = re.compile(r"API key of acme \(operator\)\s+(tfk_\S+)")


def first_command(readme: Path) -> str:
    """The first line of the first bash block of the README: the quickstart's first command."""
    block = re.search(r"```bash\n(.+?)\n", readme.read_text(), re.DOTALL)
    if block is None:
        raise SystemExit("smoke: the README has no bash block")
    return block.group(1).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def wait_for(what: str, seconds: float, check: Any, log: Path) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = check()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            found = None
        if found:
            return found
        time.sleep(0.5)
    print(log.read_text()[-4000:], file=sys.stderr)
    raise SystemExit(f"smoke: {what} within {seconds:g} s failed")


def main(folder: Path) -> None:
    command = first_command(folder / "README.md")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = folder / "smoke-dev.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    env["TENANTFLOW_API_PORT"] = str(port)
    print(f"smoke: {command}  (in {folder}, port {port})", flush=True)
    with log.open("w") as out:
        server = subprocess.Popen(
            ["bash", "-c", command],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one below
        )
    try:

        def healthy() -> bool:
            if server.poll() is not None:
                print(log.read_text()[-4000:], file=sys.stderr)
                raise SystemExit(f"smoke: the first command exited with {server.returncode}")
            return bool(call("GET", f"{base}/healthz"))

        wait_for("/healthz", START_SECONDS, healthy, log)
        key = KEY.search(log.read_text())
        if key is None:
            raise SystemExit("smoke: no API key of acme in the first start's output")
        token = call(
            "POST", f"{base}/platform/v1/token", {"grant_type": "api_key", "api_key": key[1]}
        )["access_token"]
        order = {"order_id": "smoke-1", "sku": "mug", "quantity": 2, "amount_cents": 1800}
        run = call("POST", f"{base}/v1/runs", {"workflow": "fulfil_order", "args": [order]}, token)

        def completed() -> Any:
            found = call("GET", f"{base}/v1/runs/{run['id']}", token=token)
            if found["status"] in ("failed", "cancelled", "needs_attention", "compensated"):
                raise SystemExit(f"smoke: the run ended {found['status']}: {found['error']}")
            return found if found["status"] == "completed" else None

        done = wait_for("the run's completion", RUN_SECONDS, completed, log)
        print(f"smoke: run {done['id']} completed: {done['result']}", flush=True)
        venv_python = folder / ".venv" / "bin" / "python"
        subprocess.run(
            [str(venv_python), "tests/base_install.py", "imports"], cwd=folder, check=True
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    print(f"smoke: the server stopped (exit {server.returncode})", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
