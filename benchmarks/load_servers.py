"""The load test's servers: one `memsvc serve` over an LMDB data dir, or N replicas over one PostgreSQL database.

`Fleet.start("lmdb", 1, ...)` starts one server on a fresh LMDB data dir; `Fleet.start("postgresql", N, ...)`
starts a throwaway PostgreSQL server (tools/pgserver.py, fsync on: the setting a deployment keeps), creates one
database, and starts N `memsvc serve --store URL --lease-seconds S` processes over it, one after the other (the
first applies the schema). Each replica logs to replica-K.log in the run's temporary directory. `db_snapshot()`
reads the database's own counters (commits, rows written, WAL bytes, size), so a run can say what it cost the
database; `stored_bytes()` is the data dir's or the database's size.

Knows the command line and the database's statistics views; imports neither torch nor the model.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from load_stats import dir_bytes
from served import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
STORES = ("lmdb", "postgresql")


class Server(ServeProcess):
    """`memsvc serve` over `store` (a data dir or a URL) with the load test's budget; stderr goes to log."""

    def __init__(self, store: str, log: Path, budget: int, model: str | None, lease_seconds: float | None = None,
                 start_timeout: float = 600, flags: tuple[str, ...] = ()):
        args = ["--store", store, "--resident-budget", str(budget), "--no-log-rpcs", *flags]
        if lease_seconds is not None:
            args += ["--lease-seconds", str(lease_seconds)]
        if model:
            args += ["--model", model]
        super().__init__(args, log, start_timeout=start_timeout)


def _pg_server_class():
    """tools/pgserver.py's PgServer (tools/ is a folder of the checkout, not an installed package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tools.pgserver import PgServer

    return PgServer


@dataclass
class Fleet:
    """The servers of one run: their processes, the store they share, and the run's temporary directory."""

    store: str  # "lmdb" or "postgresql"
    tmp: Path
    servers: list[Server] = field(default_factory=list)
    pg: object = None  # tools.pgserver.PgServer, for "postgresql"
    url: str | None = None  # the database's URL, for "postgresql"
    codes: list[int | None] = field(default_factory=list)  # exit codes, once stopped

    @classmethod
    def start(cls, store: str, replicas: int, budget: int, model: str | None, lease_seconds: float,
              flags: tuple[str, ...] = ()) -> "Fleet":
        """flags: more `memsvc serve` flags for every server."""
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {store!r}")
        if replicas < 1 or (store == "lmdb" and replicas != 1):
            raise ValueError(f"an LMDB data dir is served by exactly one process; replicas {replicas} needs "
                             f"--store postgresql")
        fleet = cls(store, Path(tempfile.mkdtemp(prefix="memsvc-load-")))
        try:
            if store == "lmdb":
                fleet.servers.append(Server(str(fleet.tmp / "data"), fleet.tmp / "server.log", budget, model,
                                            flags=flags))
                return fleet
            fleet.pg = _pg_server_class().start(fsync=True)
            fleet.url = fleet.pg.create_database("load")
            for k in range(replicas):
                fleet.servers.append(Server(fleet.url, fleet.tmp / f"replica-{k}.log", budget, model,
                                            lease_seconds=lease_seconds, flags=flags))
            return fleet
        except BaseException:
            fleet.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers]

    def where(self) -> str:
        if self.store == "lmdb":
            return f"data {self.tmp / 'data'}"
        return f"PostgreSQL {self.pg.url('load')} (fsync on, started in {self.pg.startup_seconds:.1f} s)"

    def db_snapshot(self) -> dict | None:
        """The database's counters now (None for LMDB): transactions committed (an autocommit read counts as
        one) and rolled back, rows inserted/updated/deleted, the WAL position in bytes (server-wide: this server
        holds only the load test's database), the database's size."""
        if self.url is None:
            return None
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, "
                "pg_database_size(current_database()) FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0]
        keys = ("commits", "rollbacks", "rows_inserted", "rows_updated", "rows_deleted", "database_bytes")
        return {**dict(zip(keys, (int(v) for v in row))), "wal_bytes": int(wal)}

    def stored_bytes(self) -> int:
        """The data dir's bytes (LMDB) or the database's (PostgreSQL); call before stop()."""
        if self.store == "lmdb":
            return dir_bytes(self.tmp / "data")
        return self.db_snapshot()["database_bytes"]

    def log_tails(self, n: int = 4000) -> str:
        return "\n".join(f"--- {s.log_path.name}\n{s.log_tail(n)}" for s in self.servers)

    def stop(self) -> list[int | None]:
        """Stop every replica (SIGTERM), then the database; returns the replicas' exit codes. Keeps the logs
        until remove()."""
        if not self.codes:
            self.codes = [s.stop() for s in self.servers]
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        return self.codes

    def remove(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
