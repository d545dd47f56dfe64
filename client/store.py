"""The video generator's records the client reads and writes: LoRAs, jobs and their costs.

SQLAlchemy Core over any URL (SQLite by default). A charge inserts its `job_costs` row and raises
the job's `total_cost` in one transaction, and is idempotent per (job, clip, stage, api_name), so
a replayed job never pays twice.
"""

from __future__ import annotations

import json
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import (
    JSON, Column, DateTime, ForeignKey, Integer, MetaData, Numeric, String, Table, UniqueConstraint, create_engine,
    event, insert, select, update,
)
from sqlalchemy.exc import IntegrityError

metadata = MetaData()

lora_models = Table(
    "lora_models", metadata,
    Column("id", String(200), primary_key=True),
    Column("status", String(32), nullable=False),
    Column("url", String(4096)),
    Column("sha256", String(64)),
    Column("trigger", String(200)),
    Column("direct_weights", JSON, nullable=False, default=dict),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

jobs = Table(
    "jobs", metadata,
    Column("id", String(200), primary_key=True),
    Column("total_cost", Numeric(14, 6), nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

job_costs = Table(
    "job_costs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(200), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("clip_id", String(200), nullable=False, default=""),
    Column("stage", String(64), nullable=False),
    Column("api_name", String(64), nullable=False),
    Column("cost", Numeric(14, 6), nullable=False),
    Column("details", JSON),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("job_id", "clip_id", "stage", "api_name", name="uq_job_costs_charge"),
)


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
    def __init__(self, url: str = "sqlite:///video.db"):
        is_sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {})
        if is_sqlite:
            _sqlite_begin_immediate(self.engine)
        # SQLite serializes writers anyway; one lock per store avoids "database is locked" churn.
        self._write_lock = threading.Lock() if is_sqlite else None
        metadata.create_all(self.engine)

    # -- LoRA records --------------------------------------------------------------------------

    def put_lora(self, lora_id: str, status: str, url: str | None = None, trigger: str | None = None,
                 sha256: str | None = None, direct_weights: dict[str, str] | None = None) -> None:
        values = dict(status=status, url=url, trigger=trigger, sha256=sha256,
                      direct_weights=direct_weights or {}, updated_at=_now())
        with self._writing(), self.engine.begin() as conn:
            if conn.execute(update(lora_models).where(lora_models.c.id == lora_id).values(**values)).rowcount == 0:
                conn.execute(insert(lora_models).values(id=lora_id, **values))

    def get_lora(self, lora_id: str) -> LoraRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(lora_models).where(lora_models.c.id == lora_id)).mappings().first()
        if row is None:
            return None
        return LoraRecord(id=row["id"], status=row["status"], url=row["url"], sha256=row["sha256"],
                          trigger=row["trigger"], direct_weights=dict(row["direct_weights"] or {}))

    # -- jobs and costs ------------------------------------------------------------------------

    def create_job(self, job_id: str) -> None:
        with self._writing(), self.engine.begin() as conn:
            if conn.execute(select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
                conn.execute(insert(jobs).values(id=job_id, total_cost=0, created_at=_now()))

    def charge(self, job_id: str, clip_id: str, stage: str, api_name: str, cost: float | Decimal,
               details: dict | None = None) -> bool:
        """Record one charge; False (and nothing written) when this charge was already recorded."""
        amount = Decimal(str(cost)).quantize(Decimal("0.000001"))
        try:
            with self._writing(), self.engine.begin() as conn:
                conn.execute(insert(job_costs).values(
                    job_id=job_id, clip_id=clip_id or "", stage=stage, api_name=api_name, cost=amount,
                    details=json.loads(json.dumps(details or {}, default=str)), created_at=_now()))
                raised = conn.execute(update(jobs).where(jobs.c.id == job_id)
                                      .values(total_cost=jobs.c.total_cost + amount)).rowcount
                if raised != 1:
                    raise KeyError(f"no job {job_id!r}: create_job first")
        except IntegrityError:
            return False
        return True

    def job_costs(self, job_id: str) -> list[dict]:
        query = (select(job_costs.c.stage, job_costs.c.api_name, job_costs.c.cost, job_costs.c.clip_id,
                        job_costs.c.details, job_costs.c.created_at)
                 .where(job_costs.c.job_id == job_id).order_by(job_costs.c.id))
        with self.engine.connect() as conn:
            return [{**row, "cost": float(row["cost"])} for row in conn.execute(query).mappings()]

    def total_cost(self, job_id: str) -> float:
        with self.engine.connect() as conn:
            value = conn.execute(select(jobs.c.total_cost).where(jobs.c.id == job_id)).scalar_one_or_none()
        if value is None:
            raise KeyError(f"no job {job_id!r}")
        return float(value)

    def _writing(self):
        return self._write_lock if self._write_lock is not None else nullcontext()


def _sqlite_begin_immediate(engine) -> None:
    """pysqlite defers BEGIN; take the write lock at the start of each transaction instead
    (SQLAlchemy's documented recipe), so concurrent processes queue rather than deadlock."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
