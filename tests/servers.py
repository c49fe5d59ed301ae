"""Servers of a test's or a benchmark's own, on free loopback ports, stopped by process id:
for what would disturb the machine's shared servers (restarts, kills, flushes, a thousand
databases, a low ``max_connections``)."""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK_NO_DISK = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.05)


def _wait_stopped(pid: int, seconds: float = 5) -> None:
    """Until process ``pid`` has stopped (``kill`` returns before the signal has taken
    effect: a process busy on another core goes on for a moment), or is gone."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


class OwnPostgres:
    """A PostgreSQL cluster of its own (``initdb`` as the ``postgres`` user), trust auth."""

    def __init__(self, folder: Path, *, settings: dict[str, str] | None = None) -> None:
        self.folder = folder / "pgdata"
        self.port = free_port()
        # Log times in UTC: ``ready_at`` reads them.
        self.settings = {
            "max_connections": "100",
            "fsync": "off",
            "log_timezone": "UTC",
            **(settings or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._frozen: list[int] = []  # server processes stopped by freeze_all
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert found, "PostgreSQL's server binaries are needed (Debian's postgresql package)"
        self.bin = Path(found[-1])

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else [*command]

    def start(self) -> None:
        if not (self.folder / "PG_VERSION").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.folder.parent, "postgres")
                shutil.chown(self.folder, "postgres")
            subprocess.run(
                self._as_postgres(
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.folder),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        options = ["-p", str(self.port), "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1"]
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        with (self.folder.parent / "postgres.log").open("ab") as log:  # why it stopped, if
            self.proc = subprocess.Popen(
                self._as_postgres(str(self.bin / "postgres"), "-D", str(self.folder), *options),
                stdout=log,
                stderr=log,
            )
        _wait_for_port(self.port, "postgres")
        # Listening is not accepting yet ("the database system is starting up").
        deadline = time.monotonic() + 30
        ready = [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        while subprocess.run(ready, check=False).returncode != 0:
            assert time.monotonic() < deadline, "postgres did not accept connections"
            time.sleep(0.05)

    def ready_at(self) -> float:
        """When the server last said it accepts connections (its log's time, of this host's
        clock): sooner than a poll of it sees, by as long as one takes."""
        log = self.folder.parent / "postgres.log"
        last = None
        for line in log.read_text(errors="replace").splitlines():
            if "database system is ready to accept connections" in line:
                last = line
        assert last is not None, "postgres did not log that it is ready"
        stamp = datetime.datetime.strptime(last[:23], "%Y-%m-%d %H:%M:%S.%f")
        return stamp.replace(tzinfo=datetime.UTC).timestamp()

    def restart(self) -> None:
        """What ``pg_ctl restart -m fast`` does: a fast shutdown (every session ended), then a
        start on the same port, returning once the server accepts connections again."""
        self.stop(signal.SIGINT)
        self.start()

    def freeze(self) -> None:
        """Stop the postmaster (SIGSTOP): sessions open go on, a new connection is never
        answered, as with a server gone from the network."""
        os.kill(self.postmaster_pid, signal.SIGSTOP)

    def cut_off(self) -> None:
        """As a server gone from the network looks once its clients notice: every session
        ended, and a new connection never answered (the postmaster frozen; ``thaw`` ends
        it)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as admin:
            self.freeze()  # its session goes on: the postmaster only accepts connections
            # Until none is left twice running: a session that was starting as the
            # postmaster froze shows up a moment later.
            gone = 0
            while gone < 2:
                row = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
                gone = gone + 1 if row is not None and row[0] == 0 else 0
                time.sleep(0.05)

    def freeze_all(self) -> None:
        """Stop every process of the server (SIGSTOP), its sessions' too: statements sent on
        an open session are never answered, while the kernel still takes the bytes and
        answers TCP keepalives, as with a frozen host. ``thaw`` ends it.

        The postmaster first, and only once it has stopped are its children listed: a session
        it forked a moment before is among them, whereas one forked after a listing taken
        first would go on serving its client through the whole freeze."""
        postmaster = self.postmaster_pid
        self.freeze()
        _wait_stopped(postmaster)
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        self._frozen = [int(pid) for pid in children]
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for pid in self._frozen:
            _wait_stopped(pid)

    def thaw(self) -> None:
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []
        os.kill(self.postmaster_pid, signal.SIGCONT)
        if self.proc is not None:  # runuser stops itself when its child stops
            os.kill(self.proc.pid, signal.SIGCONT)

    @property
    def postmaster_pid(self) -> int:
        return int((self.folder / "postmaster.pid").read_text().split()[0])

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        """SIGINT: the fast shutdown; SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            # runuser forwards nothing: signal the postmaster itself, found by its pid file.
            exists = (self.folder / "postmaster.pid").exists()
            os.kill(self.postmaster_pid if exists else self.proc.pid, sig)
            self.proc.wait(60)
        self.proc = None

    def __enter__(self) -> OwnPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OwnRedis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--dir", str(self.folder), *LOOPBACK_NO_DISK],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, "redis-server", 10)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def __enter__(self) -> OwnRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
