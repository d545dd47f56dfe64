"""The README's set-ups work as written, and the client is fair and typed (issue 30)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect

import sdxl_lora_client
from sdxl_lora_client import (
    AsyncLoraApplicator, ClientError, ClipPrompt, EnhanceOptions, LoraApplicator, OptionsError, SqlStore,
)
from sdxl_lora_client.testing import ScriptedBackend

ROOT = Path(__file__).resolve().parents[1]
REF = "https://cdn.example/face-{}.png"


def clips(count: int, job: str = "") -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [REF.format(f"{job}{i}")]) for i in range(count)]


def test_an_in_memory_sqlite_store_is_one_database_for_every_thread():
    store = SqlStore("sqlite://")
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors")
    with LoraApplicator(store=store, preprocessing=ScriptedBackend(), max_concurrent_clips=4,
                        ledger_wait_s=2) as applicator:
        result = applicator.apply("job", clips(6), "kling_v21", "char")
    assert [o.status for o in result.outcomes] == ["enhanced"] * 6, result.warnings
    assert len(store.job_costs("job")) == 6 and store.total_cost("job") == sum(o.cost for o in result.outcomes)


def test_a_store_built_while_the_database_is_down_meets_the_outage_in_apply():
    store = SqlStore("postgresql+psycopg://postgres@127.0.0.1:9/none")  # nothing listens there: no raise
    backend = ScriptedBackend()
    with LoraApplicator(store=store, preprocessing=backend, ledger_wait_s=0.5) as applicator:
        result = applicator.apply("job", clips(2), "kling_v21", "char")
    assert [(o.status, o.reason) for o in result.outcomes] == [("original", "ledger_unavailable")] * 2
    assert len(result.warnings) == 1 and backend.requests == []


@pytest.mark.parametrize("options, field", [
    (dict(num_inference_steps=150), "num_inference_steps"), (dict(strength=0.0), "strength"),
    (dict(guidance_scale=31.0), "guidance_scale"), (dict(width=100, height=100), "width"),
    (dict(width=512), "width, height"), (dict(delivery="s3"), "delivery"),
    (dict(num_inference_steps=2, strength=0.3), "num_inference_steps, strength"),
    (dict(min_identity_score=2.0), "min_identity_score"),
])
def test_enhance_options_outside_the_contract_fail_when_built_naming_the_field(options, field):
    with pytest.raises(OptionsError) as error:
        EnhanceOptions(**options)
    assert error.value.field == field and str(error.value).startswith(field)
    assert isinstance(error.value, ValueError) and isinstance(error.value, ClientError)


def test_a_table_prefix_puts_the_ledger_beside_a_products_own_jobs_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'product.db'}"
    engine = create_engine(url)
    product = MetaData()
    Table("jobs", product, Column("id", Integer, primary_key=True), Column("title", String(50)))
    product.create_all(engine)
    store = SqlStore(url, table_prefix="lora_")
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors")
    with LoraApplicator(store=store, preprocessing=ScriptedBackend()) as applicator:
        applicator.apply("job", clips(2), "kling_v21", "char")
    tables = set(inspect(engine).get_table_names())
    assert tables == {"jobs", "lora_jobs", "lora_job_costs", "lora_lora_models"}
    assert [c["name"] for c in inspect(engine).get_columns("jobs")] == ["id", "title"], "the product's, untouched"
    assert len(store.job_costs("job")) == 2
    assert {t.name for t in SqlStore("sqlite://").tables.metadata.sorted_tables} == {"lora_models", "jobs",
                                                                                   "job_costs"}, "the default names"


def test_the_library_logs_through_a_null_handler():
    handlers = logging.getLogger("sdxl_lora_client").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_mypy_strict_accepts_a_program_using_every_public_name(tmp_path):
    pytest.importorskip("mypy")
    names = ", ".join(sdxl_lora_client.__all__)
    program = tmp_path / "video_worker.py"
    program.write_text(f'''from __future__ import annotations

from decimal import Decimal

from sdxl_lora_client import ({names})


def enhance(store: SqlStore, backend: PreprocessingBackend) -> Decimal:
    with LoraApplicator(store, backend, options=EnhanceOptions(num_inference_steps=20)) as applicator:
        result: ApplyResult = applicator.apply("job", [ClipPrompt("c1", "walks", ["https://x/r.png"])],
                                               "kling_v21", "lora-1")
    outcome: ClipOutcome = result.outcomes[0]
    image: ImageOut | None = outcome.image
    return outcome.cost if image is None else Decimal(0)
''')
    # The client's modules are followed as an installed package's are (PEP 561): their types are used,
    # the program's own use of them is what is checked.
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                              str(program)],
                             env={"MYPYPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


class SerialService(ScriptedBackend):
    """One pipeline: renders one at a time, in arrival order, `render_s` each."""

    def __init__(self, render_s: float):
        super().__init__(latency_s=0.0)
        self.render_s = render_s
        self.turn: asyncio.Lock | None = None

    async def agenerate(self, request, idempotency_key=None):
        self.turn = self.turn or asyncio.Lock()
        async with self.turn:
            await asyncio.sleep(self.render_s)
            return self.generate(request, idempotency_key)


def test_jobs_sharing_an_applicator_are_served_oldest_first():
    store = SqlStore("sqlite://")
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors")

    async def main() -> tuple[list[float], float]:
        async with AsyncLoraApplicator(store=store, preprocessing=SerialService(0.02), max_in_flight=8) as applicator:
            started = time.perf_counter()

            async def job(j: int) -> float:
                await applicator.apply(f"job-{j}", clips(5, f"j{j}-"), "kling_v21", "char")
                return time.perf_counter() - started

            ended = await asyncio.gather(*(job(j) for j in range(20)))
            return list(ended), time.perf_counter() - started

    ended, wall = asyncio.run(main())
    # Which job reaches the slots first depends on which ledger read (a thread) returns first, so the
    # first job submitted is among the first few to end, not always the very first.
    assert sorted(ended).index(ended[0]) < 3, "the first job submitted finishes among the first"
    assert ended[0] < 0.2 * wall, f"the first job ended at {ended[0] / wall:.0%} of the run, not near its end"
    assert sorted(ended) == pytest.approx(ended, abs=0.1 * wall), "jobs end about in the order they came"
