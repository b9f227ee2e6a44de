"""A throwaway PostgreSQL server for tests and benchmarks: initdb in a temporary directory, pg_ctl start on a
free loopback port, stop and remove.

    server = PgServer.start(fsync=False)     # the contract tests' setting; durability tests keep fsync on
    url = server.create_database()            # postgresql://memsvc@127.0.0.1:PORT/db_1, a fresh database
    ...
    server.stop(remove=False)                  # stops it, keeping its directory (server.start_again())
    server.stop()                              # stops it and removes its directory
    server.kill(); server.start_again()        # a crash of PostgreSQL (SIGKILL), then its crash recovery
    standby = server.start_standby()           # a synchronous streaming-replication standby; standby.promote()

PostgreSQL refuses to run as root: run as root (CI, containers), the server runs as a dedicated system
user (`memsvc-pg`, created with useradd if missing) that owns the temporary directory; run as anyone else, as
that user. The binaries are PostgreSQL 15's (/usr/lib/postgresql/15/bin, or initdb on PATH); when there are
none and we are root on Debian, `apt-get install -y postgresql-15` installs them (said on stderr).
Connections are trusted from loopback only (the database superuser is `memsvc`, no password); the unix
socket lives in the temporary directory. Port 0 cannot be given to postgres: a port is picked by binding a
socket and closing it, and another is tried if the server then fails to bind it.

Knows processes and files; knows nothing about memsvc's schema.
"""
from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

OS_USER = "memsvc-pg"
DB_USER = "memsvc"
_VERSIONS = ("15", "16", "17", "14")

SETPRIV = shutil.which("setpriv")  # util-linux: run a command as another user


def find_bindir(install: bool = True) -> Path:
    """The directory holding initdb, pg_ctl and postgres (installing PostgreSQL 15 if there is none)."""
    for version in _VERSIONS:
        d = Path(f"/usr/lib/postgresql/{version}/bin")
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("pgserver: no PostgreSQL binaries found: installing the Debian package postgresql-15",
              file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql-15"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return find_bindir(install=False)
    raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found: install PostgreSQL 15 "
                       "(Debian: apt-get install postgresql-15)")


def _os_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (creating the user if needed); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               OS_USER], capture_output=True, text=True)
        if done.returncode not in (0, 9):  # 9: it exists (made meanwhile by another process)
            raise RuntimeError(f"cannot create the system user {OS_USER}: {done.stderr.strip()}")
        entry = pwd.getpwnam(OS_USER)
    return entry.pw_uid, entry.pw_gid


def _new_root(owner: tuple[int, int] | None) -> Path:
    """A new temporary directory for one server, owned by the user it runs as."""
    root = Path(tempfile.mkdtemp(prefix="memsvc-pg-"))
    if owner is not None:
        os.chown(root, *owner)
    return root


def _alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (it may be taken before postgres binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    """A running server: its directory (data/, the socket, server.log), port and binaries."""

    root: Path
    port: int
    bindir: Path
    owner: tuple[int, int] | None  # (uid, gid) it runs as; None: as the current user
    fsync: bool
    startup_seconds: float = 0.0
    args: str = ""  # the postgres options it was started with (port included), for start_again
    options: dict[str, str] = field(default_factory=dict)  # its -c options (port aside), for a standby's
    _names: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def start(cls, *, fsync: bool = True, settings: dict[str, str] | None = None, attempts: int = 5) -> "PgServer":
        """initdb and start a server. fsync False also turns off synchronous_commit and full_page_writes:
        fast, and fine while nothing asks what survives a crash: a COMMIT then returns before its WAL is
        written, so even a SIGKILL of postgres loses the last moments' commits (whole: nothing is torn), and an
        OS crash may lose more. Tests of durability keep fsync on. settings: more `-c name=value` options."""
        t0 = time.monotonic()
        bindir = find_bindir()
        owner = _os_user()
        root = _new_root(owner)
        try:
            server = cls(root, 0, bindir, owner, fsync)
            init = [str(bindir / "initdb"), "-D", str(server.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                    "--no-locale", "--no-instructions"] + ([] if fsync else ["--no-sync"])
            server._run(init)
            options = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(root),
                       "max_connections": "200", "shared_buffers": "64MB", "log_min_messages": "warning",
                       **({} if fsync else {"fsync": "off", "synchronous_commit": "off",
                                             "full_page_writes": "off"}),
                       **(settings or {})}
            server.options = options
            server._listen(options, attempts)
            server.startup_seconds = time.monotonic() - t0
            return server
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    def _listen(self, options: dict[str, str], attempts: int) -> None:
        """pg_ctl start with `options` on a free port (another one if it is taken meanwhile)."""
        for attempt in range(attempts):
            self.port = free_port()
            self.args = " ".join([f"-p {self.port}"] + [f"-c {k}={v}" for k, v in options.items()])
            done = self._pg_ctl_start(check=False)
            if done.returncode == 0:
                return
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "could not bind" not in log and "already in use" not in log or attempt == attempts - 1:
                raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                                   f"{log[-2000:]}")

    def _pg_ctl_start(self, check: bool) -> subprocess.CompletedProcess:
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", self.args, "start"], check=check)

    def start_again(self) -> None:
        """Start a server stopped with stop(remove=False), or killed with kill(), again: same directory, port and
        settings (after kill(), postgres first recovers from its WAL)."""
        self._pg_ctl_start(check=True)

    def kill(self, wait: float = 30.0) -> None:
        """SIGKILL the postmaster, as a crash of PostgreSQL would (no shutdown, no checkpoint, nothing flushed
        that was not), then wait until it and its children (backends, WAL writer, WAL senders, ...: they exit
        when they find it gone) are dead."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError(f"the server in {self.root} is not running")
        procs = [pid] + _children(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while any(_alive(p) for p in procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the processes of the killed server in {self.root} still run after {wait:g} s")
            time.sleep(0.02)
        # Its lock files name its pid, which postgres checks with kill(pid, 0): until init reaps the dead
        # postmaster (seconds on some machines, never where PID 1 does not reap), that pid still answers and
        # start_again would be refused. Every process of the server is dead: the files guard nothing now.
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        (self.root / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def start_standby(self, name: str = "standby", *, synchronous: bool = True, attempts: int = 5) -> "PgServer":
        """A streaming-replication standby of this server, started on a port of its own: pg_basebackup -R copies
        the data directory and has the copy stream this server's WAL as application_name `name`; it answers
        read-only queries (hot standby) until promote(). synchronous: this server's synchronous_standby_names
        becomes `name`, so that each commit here returns only once the standby has flushed its WAL (with
        synchronous_commit on; this waits until the standby is in sync). Its settings are this server's."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"a standby name is a lower-case identifier, got {name!r}")
        t0 = time.monotonic()
        root = _new_root(self.owner)
        try:
            standby = PgServer(root, 0, self.bindir, self.owner, self.fsync,
                               options={**self.options, "unix_socket_directories": str(root)})
            source = f"host=127.0.0.1 port={self.port} user={DB_USER} application_name={name}"
            standby._run([str(self.bindir / "pg_basebackup"), "-D", str(standby.data), "-d", source, "-R",
                          "-X", "stream", "-c", "fast"] + ([] if self.fsync else ["--no-sync"]))
            standby._listen(standby.options, attempts)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        if synchronous:
            self.admin(f"ALTER SYSTEM SET synchronous_standby_names = '{name}'")
            self.admin("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 60
            while self.admin(f"SELECT 1 FROM pg_stat_replication WHERE application_name = '{name}' AND "
                             f"sync_state = 'sync'") == []:
                if time.monotonic() > deadline:
                    standby.stop()
                    raise RuntimeError(f"the standby {name!r} did not become synchronous within 60 s")
                time.sleep(0.05)
        standby.startup_seconds = time.monotonic() - t0
        return standby

    def promote(self) -> None:
        """Make a standby a primary (pg_ctl promote, waiting until it accepts writes)."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote"])

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self.owner is not None and SETPRIV:
            # setpriv switches user in the child after exec: Python then spawns it with vfork, which runs no
            # fork handlers; asked to switch user itself it forks, and a fork handler (gRPC's, in a test process
            # full of threads) can crash the child before exec
            cmd = [SETPRIV, f"--reuid={self.owner[0]}", f"--regid={self.owner[1]}", "--clear-groups", "--"] + cmd
        elif self.owner is not None:
            kw = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
        for _ in range(3):
            done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, **kw)
            # A child killed by a signal with no output died between fork and exec (seen once: SIGSEGV in the
            # forked child of a test process full of threads), before the command ran: run it again.
            if done.returncode >= 0 or done.stdout or done.stderr:
                break
        if check and done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> list[tuple]:
        """Run one statement as the superuser in the postgres database (autocommit: CREATE DATABASE may); its
        rows ([] for a statement that returns none)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str | None = None, template: str = "template1") -> str:
        """A new database (a copy of `template`); returns its URL."""
        name = name or f"db_{next(self._names)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pid(self) -> int | None:
        """The postmaster's process id (None when it is not running)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def stop(self, remove: bool = True) -> None:
        """Stop the server (fast shutdown: open connections are closed) and remove its directory."""
        if self.pid() is not None:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                      check=False)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":  # python tools/pgserver.py: start one, print its URL, stop on Enter
    srv = PgServer.start(fsync="--fsync" in sys.argv)
    print(f"{srv.url()}  (started in {srv.startup_seconds:.2f} s, directory {srv.root}); Enter stops it",
          flush=True)
    try:
        input()
    finally:
        srv.stop()
