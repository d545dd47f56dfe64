"""The video generator's records the client reads and writes: LoRAs, jobs and their costs.

SQLAlchemy Core over any URL (SQLite by default). A charge inserts its `job_costs` row and raises
the job's `total_cost` in one transaction, and is unique per (job, clip, stage, api_name): a
replayed job, a retried charge whose commit went through but whose answer was lost, and a replay
of `unrecorded_charges` all land once. Money is `Decimal` (NUMERIC columns) end to end.

Safe under concurrency on any database, not just behind SQLite's write lock: creates are single
`INSERT ... ON CONFLICT` statements (PostgreSQL, SQLite), so workers racing on one id never see a
unique violation, and each charge locks its job's row first.

Every failure is a `LedgerError`, `retryable` when the database was unreachable or dropped the
connection; pooled connections are checked before use (`pool_pre_ping`), so a database that
restarted costs one failed call, not one per stale connection.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON, Column, DateTime, ForeignKey, Integer, MetaData, Numeric, String, Table, UniqueConstraint, create_engine,
    event, insert, make_url, select, update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import (
    DBAPIError, IntegrityError, InterfaceError, OperationalError, ProgrammingError, SQLAlchemyError,
)
from sqlalchemy.pool import StaticPool

from sdxl_lora_client.errors import LedgerError

__all__ = ["Charge", "LedgerError", "LoraRecord", "SqlStore", "money"]

CENT_MILLIONTHS = Decimal("0.000001")  # the ledger's precision: NUMERIC(14, 6)
# Bounds a connection attempt to a database that is down, so a retry loop sees the failure quickly.
CONNECT_TIMEOUT_S = 5


def money(amount) -> Decimal:
    """`amount` (Decimal, int, float or str) as the ledger stores it: a Decimal of 6 places."""
    return Decimal(str(amount)).quantize(CENT_MILLIONTHS)

@dataclass(frozen=True)
class Tables:
    """The client's three tables, named `{prefix}lora_models`, `{prefix}jobs`, `{prefix}job_costs`."""

    metadata: MetaData
    lora_models: Table
    jobs: Table
    job_costs: Table


def make_tables(prefix: str = "") -> Tables:
    """The tables under `prefix`, so the ledger can live beside a product's own `jobs` table."""
    metadata = MetaData()
    lora_models = Table(
        f"{prefix}lora_models", metadata,
        Column("id", String(200), primary_key=True),
        Column("status", String(32), nullable=False),
        Column("url", String(4096)),
        Column("sha256", String(64)),
        Column("trigger", String(200)),
        Column("direct_weights", JSON, nullable=False, default=dict),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    jobs = Table(
        f"{prefix}jobs", metadata,
        Column("id", String(200), primary_key=True),
        Column("total_cost", Numeric(14, 6), nullable=False, default=0),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    job_costs = Table(
        f"{prefix}job_costs", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(200), ForeignKey(jobs.c.id), nullable=False, index=True),
        Column("clip_id", String(200), nullable=False, default=""),
        Column("stage", String(64), nullable=False),
        Column("api_name", String(64), nullable=False),
        Column("cost", Numeric(14, 6), nullable=False),
        Column("details", JSON),
        Column("created_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("job_id", "clip_id", "stage", "api_name", name=f"uq_{prefix}job_costs_charge"),
    )
    return Tables(metadata, lora_models, jobs, job_costs)


_CHARGE_KEY = ("job_id", "clip_id", "stage", "api_name")


@dataclass(frozen=True)
class Charge:
    """One charge for the ledger; (job_id, clip_id, stage, api_name) is its unique key."""

    job_id: str
    clip_id: str
    stage: str
    api_name: str
    cost: Decimal
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LoraRecord:
    id: str
    status: str
    url: str | None = None
    sha256: str | None = None
    trigger: str | None = None
    direct_weights: dict[str, str] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class SqlStore:
    """The ledger and the LoRA records over any SQLAlchemy URL; tables are created if missing.

    A context manager: leaving it closes the connection pool. `engine_options` go to
    `create_engine` over the defaults (pre-ping, recycle, connect timeout for PostgreSQL).
    `table_prefix` names the tables `{prefix}lora_models`, `{prefix}jobs`, `{prefix}job_costs`.

    Building it connects to nothing: the tables are created at the first call, so a worker that
    starts while the database is down starts, and the outage is met where `apply()` handles it.
    `sqlite://` (in memory) is one database shared by every thread (SQLAlchemy's recipe: one
    connection, `StaticPool`, `check_same_thread=False`), its calls taken one at a time.
    """

    def __init__(self, url: str = "sqlite:///video.db", *, table_prefix: str = "", **engine_options: Any):
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        is_sqlite = backend == "sqlite"
        in_memory = is_sqlite and (parsed.database in (None, "", ":memory:") or "memory" in str(parsed.query))
        defaults: dict[str, Any]
        if in_memory:
            defaults = dict(connect_args={"check_same_thread": False}, poolclass=StaticPool)
        elif is_sqlite:
            defaults = dict(connect_args={"timeout": 30})
        else:
            defaults = dict(pool_pre_ping=True, pool_recycle=1800)
            if backend == "postgresql":
                defaults["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        self.engine = create_engine(url, **{**defaults, **engine_options})
        if is_sqlite:
            _sqlite_begin_immediate(self.engine)
        # SQLite serializes writers anyway: this store's threads queue on a lock rather than poll
        # SQLite's busy timeout. Other databases take row locks and need no such thing. In memory,
        # the one connection is shared: reads queue too.
        self._write_lock = threading.RLock() if is_sqlite else None
        self._read_lock = self._write_lock if in_memory else None
        self.tables = make_tables(table_prefix)
        self._tables_made = False
        self._tables_lock = threading.Lock()

    def _ensure_tables(self) -> None:
        """Create the tables if missing, once, at the first call that reaches the database."""
        if self._tables_made:
            return
        with self._tables_lock, _ledger_errors("creating the tables"), self._writing():
            if not self._tables_made:
                try:
                    self.tables.metadata.create_all(self.engine)
                except (ProgrammingError, IntegrityError):  # another worker created them meanwhile
                    self.tables.metadata.create_all(self.engine)
                self._tables_made = True

    @contextmanager
    def _begin(self, what: str) -> Iterator[Connection]:
        """A write transaction, SQLAlchemy's errors as LedgerError."""
        with _ledger_errors(what):
            self._ensure_tables()
            with self._writing(), self.engine.begin() as conn:
                yield conn

    @contextmanager
    def _connect(self, what: str) -> Iterator[Connection]:
        """A connection for reads, SQLAlchemy's errors as LedgerError."""
        with _ledger_errors(what):
            self._ensure_tables()
            with self._reading(), self.engine.connect() as conn:
                yield conn

    def close(self) -> None:
        """Close the pool's connections."""
        self.engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- LoRA records --------------------------------------------------------------------------

    def put_lora(self, lora_id: str, status: str, url: str | None = None, trigger: str | None = None,
                 sha256: str | None = None, direct_weights: dict[str, str] | None = None) -> None:
        """Create or replace the record (every field): concurrent writers never fail, the last one wins."""
        values = dict(status=status, url=url, trigger=trigger, sha256=sha256,
                      direct_weights=direct_weights or {}, updated_at=_now())
        with self._begin("put_lora") as conn:
            _upsert(conn, self.tables.lora_models, dict(id=lora_id, **values), ("id",), set_=values)

    def get_lora(self, lora_id: str) -> LoraRecord | None:
        lora_models = self.tables.lora_models
        with self._connect("get_lora") as conn:
            row = conn.execute(select(lora_models).where(lora_models.c.id == lora_id)).mappings().first()
        if row is None:
            return None
        return LoraRecord(id=row["id"], status=row["status"], url=row["url"], sha256=row["sha256"],
                          trigger=row["trigger"], direct_weights=dict(row["direct_weights"] or {}))

    # -- jobs and costs ------------------------------------------------------------------------

    def create_job(self, job_id: str) -> None:
        """Create the job unless it exists (a replay, or another worker at the same moment)."""
        with self._begin("create_job") as conn:
            _create_job(conn, self.tables, job_id)

    def charge(self, job_id: str, clip_id: str, stage: str, api_name: str, cost: Decimal | float | str,
               details: dict | None = None) -> bool:
        """Record one charge and raise the job's total_cost by it, in one transaction.

        False (and nothing written) when this (job, clip, stage, api_name) was already charged;
        LedgerError (and nothing written) when the job does not exist.
        """
        with self._begin("charge") as conn:
            charge = Charge(job_id, clip_id or "", stage, api_name, money(cost), details or {})
            return _charge(conn, self.tables, charge)

    def record_charges(self, charges: Iterable[Charge]) -> int:
        """Record charges an `apply()` could not (its `unrecorded_charges`), creating their jobs if
        needed; each lands once however often this is called. Returns how many were new."""
        written = 0
        for charge in charges:
            with self._begin("record_charges") as conn:
                _create_job(conn, self.tables, charge.job_id)
                written += _charge(conn, self.tables, charge)
        return written

    def job_costs(self, job_id: str) -> list[dict]:
        """The job's charges in the order they landed: stage, api_name, cost (Decimal), clip_id,
        details, created_at."""
        job_costs = self.tables.job_costs
        query = (select(job_costs.c.stage, job_costs.c.api_name, job_costs.c.cost, job_costs.c.clip_id,
                        job_costs.c.details, job_costs.c.created_at)
                 .where(job_costs.c.job_id == job_id).order_by(job_costs.c.id))
        with self._connect("job_costs") as conn:
            return [{**row, "cost": money(row["cost"])} for row in conn.execute(query).mappings()]

    def total_cost(self, job_id: str) -> Decimal:
        """The job's total (Decimal); LedgerError for a job that does not exist."""
        jobs = self.tables.jobs
        with self._connect("total_cost") as conn:
            value = conn.execute(select(jobs.c.total_cost).where(jobs.c.id == job_id)).scalar_one_or_none()
        if value is None:
            raise LedgerError(f"no job {job_id!r}")
        return money(value)

    def _writing(self) -> AbstractContextManager[Any]:
        return self._write_lock if self._write_lock is not None else nullcontext()

    def _reading(self) -> AbstractContextManager[Any]:
        return self._read_lock if self._read_lock is not None else nullcontext()


def _create_job(conn: Connection, tables: Tables, job_id: str) -> None:
    _upsert(conn, tables.jobs, dict(id=job_id, total_cost=0, created_at=_now()), ("id",))


def _charge(conn: Connection, tables: Tables, charge: Charge) -> bool:
    amount = money(charge.cost)
    jobs = tables.jobs
    # The job's row, locked (FOR UPDATE; SQLite holds its write lock already): a job's charges
    # queue here, and a missing job is told from a repeated charge without parsing errors.
    if conn.execute(select(jobs.c.id).where(jobs.c.id == charge.job_id).with_for_update()).first() is None:
        raise LedgerError(f"no job {charge.job_id!r}: create_job first")
    row = dict(job_id=charge.job_id, clip_id=charge.clip_id, stage=charge.stage, api_name=charge.api_name,
               cost=amount, details=json.loads(json.dumps(charge.details, default=str)), created_at=_now())
    if not _upsert(conn, tables.job_costs, row, _CHARGE_KEY):
        return False
    conn.execute(update(jobs).where(jobs.c.id == charge.job_id).values(total_cost=jobs.c.total_cost + amount))
    return True


@contextmanager
def _ledger_errors(what: str) -> Iterator[None]:
    """SQLAlchemy's errors as LedgerError: retryable when the connection failed or was lost."""
    try:
        yield
    except LedgerError:
        raise
    except (OperationalError, InterfaceError) as exc:
        raise LedgerError(f"{what}: database unavailable: {exc.orig or exc!r}", retryable=True) from exc
    except DBAPIError as exc:
        raise LedgerError(f"{what}: {exc.orig or exc!r}", retryable=exc.connection_invalidated) from exc
    except SQLAlchemyError as exc:
        raise LedgerError(f"{what}: {exc!r}") from exc


# Dialects with INSERT ... ON CONFLICT; SQLAlchemy gives both the same API.
_ON_CONFLICT_INSERT = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def _upsert(conn: Connection, table: Table, row: dict, key: tuple[str, ...],
            set_: dict | None = None) -> bool:
    """INSERT `row`; where a row with the same `key` exists, UPDATE it with `set_`, or leave it be.

    True when a row was written. One atomic statement where the database has ON CONFLICT; elsewhere
    the insert runs in a savepoint and a unique violation counts only if the key's row is there.
    """
    on_conflict_insert = _ON_CONFLICT_INSERT.get(conn.dialect.name)
    if on_conflict_insert is not None:
        statement = on_conflict_insert(table).values(**row)
        statement = (statement.on_conflict_do_update(index_elements=key, set_=set_) if set_
                     else statement.on_conflict_do_nothing(index_elements=key))
        if conn.dialect.insert_returning:  # a row back says it was written; rowcount is -1 on psycopg
            return conn.execute(statement.returning(*(table.c[k] for k in key))).first() is not None
        return conn.execute(statement).rowcount == 1  # SQLite before 3.35
    try:
        with conn.begin_nested():
            conn.execute(insert(table).values(**row))
        return True
    except IntegrityError:
        same_key = [table.c[k] == row[k] for k in key]
        if conn.execute(select(*(table.c[k] for k in key)).where(*same_key)).first() is None:
            raise  # another constraint failed, not ours
    if set_:
        conn.execute(update(table).where(*same_key).values(**set_))
        return True
    return False


def _sqlite_begin_immediate(engine) -> None:
    """pysqlite defers BEGIN; take the write lock at the start of each transaction instead
    (SQLAlchemy's documented recipe), so concurrent processes queue rather than deadlock."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
