"""A tracking server for a team: MLflow on 127.0.0.1 with its runs in PostgreSQL 15 (Debian's package) and
its artifacts served from a folder under the cache.

The database cluster is made on first use (``initdb``), owned by a non-root user as PostgreSQL requires (the
caller, or ``postgres`` when the caller is root), with a role and a database named ``harness``. It listens on
a Unix socket only, in a folder only its owner can enter, so ``trust`` authentication admits its owner (and
root) and nobody else. Root's home is closed to other users, so for root the cluster lives in the
``postgres`` user's home, in a folder named after the cache it belongs to.

A server killed outright (SIGKILL to its process group) leaves nothing that blocks the next one: the MLflow
server dies with it (``PR_SET_PDEATHSIG``), what is left of its process group (recorded in
``server/tracking.pgid`` under the cache) is killed when the next server starts, and the PostgreSQL
postmaster, which runs in a session of its own, is adopted by the next server and stopped by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.cache import cache_dir
from harness.errors import HarnessError
from harness.liveness import die_with_parent, sigterm_as_interrupt, stop_group
from harness.tracking import is_server_process, server_command, wait_until_serving

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "harness"  # the role and the database
HOST = "127.0.0.1"
STALE_GRACE_S = 10  # for an earlier server's killed processes to be gone


class ServerError(HarnessError, RuntimeError):
    """The server cannot start (PostgreSQL missing, the port taken): said in one line."""


@dataclass(frozen=True)
class Cluster:
    data: Path
    socket_dir: Path
    user: str  # the OS user that owns and runs the cluster

    @classmethod
    def for_cache(cls, cache: Path) -> Cluster:
        digest = hashlib.sha256(str(cache.resolve()).encode()).hexdigest()[:12]
        if os.geteuid() == 0:
            user = "postgres"
            data = Path(pwd.getpwnam(user).pw_dir) / "harness" / digest
        else:
            user, data = pwd.getpwuid(os.geteuid()).pw_name, cache / "server" / "postgres"
        return cls(data, Path("/tmp") / f"harness-pg-{digest}", user)  # a socket path must be short

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{DATABASE}@/{DATABASE}?host={self.socket_dir}"

    def _as_owner(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *command], check=check, capture_output=True, text=True)

    def _make_owned(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(folder, self.user, self.user)

    def initialise(self) -> None:
        """``initdb`` once; an interrupted one (no PG_VERSION) is started again from scratch."""
        if (self.data / "PG_VERSION").is_file():
            return
        shutil.rmtree(self.data, ignore_errors=True)
        self._make_owned(self.data.parent)
        self._make_owned(self.data)
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "--auth=trust", "--encoding=UTF8"]
        self._as_owner(*initdb, "--username", self.user, "--no-instructions")

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The cluster running until the block ends; one left running by a server that was killed (its
        ``postmaster.pid`` names a live postmaster) is adopted, and stopped at the end like a started one."""
        self._make_owned(self.socket_dir)
        options = f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}'"
        log = self.data / "server.log"
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(self.data)]
        if self._as_owner(*pg_ctl, "status", check=False).returncode:  # 0: it runs
            started = self._as_owner(*pg_ctl, "-l", str(log), "-o", options, "-w", "start", check=False)
            if started.returncode != 0:
                raise ServerError(f"PostgreSQL did not start: {_tail(log) or started.stderr.strip()}")
        try:
            self._ensure_database()
            yield
        finally:
            self._as_owner(*pg_ctl, "-m", "fast", "-w", "stop", check=False)

    def _ensure_database(self) -> None:
        psql = [str(PG_BIN / "psql"), "-h", str(self.socket_dir), "-U", self.user, "-d", "postgres", "-tAc"]

        def exists(query: str) -> bool:
            return bool(self._as_owner(*psql, query).stdout.strip())

        if not exists(f"SELECT 1 FROM pg_roles WHERE rolname = '{DATABASE}'"):
            self._as_owner(*psql, f"CREATE ROLE {DATABASE} LOGIN")
        if not exists(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
            self._as_owner(*psql, f"CREATE DATABASE {DATABASE} OWNER {DATABASE}")


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = log.read_text().strip().splitlines()
        return lines[-1] if lines else ""
    return ""


def serve(port: int) -> int:
    """Run the tracking server until Ctrl-C (or SIGTERM); the database stops with it."""

    if not (PG_BIN / "initdb").is_file():
        raise ServerError(f"PostgreSQL 15 is not installed ({PG_BIN}): `make server` installs it")
    cluster = Cluster.for_cache(cache_dir())
    cluster.initialise()
    uri = f"http://{HOST}:{port}"
    artifacts = cache_dir() / "server" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    pid_file = cache_dir() / "server" / "tracking.pgid"
    stop_stale_group(pid_file)
    with sigterm_as_interrupt(), cluster.running():
        process = subprocess.Popen(
            server_command(cluster.uri, artifacts, HOST, port),
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        pid_file.write_text(str(process.pid))  # its group: the server and the workers it starts
        try:
            wait_until_serving(uri, process)
            print(f"{uri}\nruns in PostgreSQL at {cluster.data}; Ctrl-C to stop", flush=True)
            process.wait()
        except KeyboardInterrupt:
            return 0
        except RuntimeError as exc:  # it exited (the port taken?) or did not answer
            raise ServerError(str(exc)) from None
        finally:
            stop_group(process)
            pid_file.unlink(missing_ok=True)
    return process.returncode


def stop_stale_group(pid_file: Path) -> None:
    """Kill what an earlier server that was itself killed left of its MLflow process group (its uvicorn and
    job workers outlive the group's leader), so that the port and the store are free again."""
    with contextlib.suppress(OSError, ValueError):
        group = int(pid_file.read_text())
        members = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _group_of(int(p.name)) == group]
        if any(is_server_process((member / "cmdline").read_bytes()) for member in members):
            os.killpg(group, signal.SIGKILL)
            deadline = time.monotonic() + STALE_GRACE_S
            while any(_group_of(int(member.name)) == group for member in members):
                if time.monotonic() > deadline:
                    raise ServerError(f"processes of an earlier server (group {group}) survive SIGKILL")
                time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
