"""A real, throwaway PostgreSQL server for the test session, and a fresh database per test.

The server comes from the machine's own PostgreSQL binaries (Debian's `postgresql` package:
`apt-get install -y postgresql`); nothing listens anywhere but 127.0.0.1, and the data directory
is a temporary folder removed at the end. PostgreSQL refuses to run as root, so under root the
server runs as the `postgres` user that Debian's package creates.

Without the binaries (or psycopg) the tests that need the server are skipped on a developer's
machine, with the reason, and fail under CI (`CI` set), where a skip would hide a missing install.

Use it from a test module with `from tests.postgres import postgres_server, postgres_url`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install -y postgresql"
START_TIMEOUT_S = 60


def find_bindir() -> Path | None:
    """$PG_BINDIR, else the folder of `initdb` on PATH, else the newest /usr/lib/postgresql/N/bin
    (Debian keeps the server tools off PATH)."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One postgres process over a fresh cluster; `start()` then `stop()` (or use as a context manager)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="sdxl-lora-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._as_user: dict = {}
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("PostgreSQL refuses to run as root and there is no 'postgres' user "
                                   f"to run it as ({INSTALL_HINT} creates one)") from None
            self._as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._run([self.bindir / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                   "--encoding=UTF8", "--no-locale", "--no-sync"])
        for _ in range(3):  # the free port may be taken between choosing it and the bind: choose again
            self.port = _free_port()
            if self._launch():
                return
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self._log_tail()}")

    def _launch(self) -> bool:
        """The postmaster on `self.port` over the existing data directory; True once it takes connections."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.bindir / "postgres", "-D", self.data,
                 "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}", "-c", "unix_socket_directories=",
                 "-c", "max_connections=300", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                **self._as_user)
        return self._wait_ready()

    # -- faults for the chaos tests: the same server going away and coming back ----------------

    def shut_down(self) -> None:
        """`pg_ctl stop -m fast`, as an operator restarting the database would: sessions are
        terminated (AdminShutdown), the server is gone until `start_again`."""
        self._run([self.bindir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop"])
        self.process.wait(timeout=60)

    def start_again(self) -> None:
        """The same cluster on the same port after `shut_down`."""
        if not self._launch():
            raise RuntimeError(f"PostgreSQL did not start again; its log:\n{self._log_tail()}")

    def restart(self, down_s: float) -> None:
        """Shut down, stay down `down_s` seconds, start again (blocking; run it in a thread)."""
        self.shut_down()
        time.sleep(down_s)
        self.start_again()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # "immediate" shutdown: no checkpoint, the data goes anyway
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:16]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: a leaked connection can't block it

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def _wait_ready(self) -> bool:
        """True once the server takes connections; False when it exited (a port clash, say)."""
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL took over {START_TIMEOUT_S} s to start; its log:\n{self._log_tail()}")

    def _run(self, argv: list) -> None:
        done = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=self.root, text=True, **self._as_user)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}):\n{done.stdout}")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"


def _unavailable(reason: str):
    """Skip on a developer's machine; fail under CI, where the server is part of the test run."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_server():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install './client[postgres]')")
    bindir = find_bindir()
    if bindir is None:
        _unavailable(f"no PostgreSQL server binaries found (install them: {INSTALL_HINT}, or set PG_BINDIR)")
    with PostgresServer(bindir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A SQLAlchemy URL of a database of this test's own, dropped afterwards."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
