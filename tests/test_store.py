"""SqlStore under concurrency, on SQLite and on a real PostgreSQL server (tests/postgres.py).

SQLite's write lock serialises writers, which hides races that PostgreSQL shows: every test runs on
both. Each thread gets a SqlStore of its own (as separate workers would), all threads wait at a
barrier, and then make the same call at once.
"""

from __future__ import annotations

import threading
from collections import Counter
from decimal import Decimal

import pytest

from sdxl_lora_client import Charge, ClipPrompt, LedgerError, LoraApplicator, SqlStore
from sdxl_lora_client.testing import ScriptedBackend
from tests.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures

THREADS = 20
STAGE, API = "lora_application", "sdxl_lora_preprocessing"


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    """make_store() -> a new SqlStore (its own engine) over this test's database."""
    url = f"sqlite:///{tmp_path / 'video.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    made: list[SqlStore] = []

    def make() -> SqlStore:
        made.append(SqlStore(url))
        return made[-1]

    yield make
    for store in made:
        store.engine.dispose()


def race(make_store, call):
    """call(store, i) in THREADS threads released together; (results, errors) by thread index."""
    stores = [make_store() for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS, timeout=60)
    results: list = [None] * THREADS
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(stores[i], i)
        except BaseException as exc:  # noqa: BLE001 - every error is a failure to report
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def report(errors: list[BaseException]) -> str:
    return f"{len(errors)} of {THREADS} threads raised, first: {errors[0]!r}" if errors else ""


def assert_costs_consistent(store: SqlStore, job_id: str) -> list[dict]:
    rows = store.job_costs(job_id)
    assert store.total_cost(job_id) == sum(r["cost"] for r in rows), "Decimal: exactly"
    return rows


def test_concurrent_create_job_on_one_id_never_raises(make_store):
    _, errors = race(make_store, lambda store, i: store.create_job("job-2"))
    assert not errors, report(errors)
    store = make_store()
    assert store.total_cost("job-2") == 0 and store.job_costs("job-2") == []
    store.create_job("job-2")  # and again, later: still nothing to raise
    assert_costs_consistent(store, "job-2")


def test_concurrent_put_lora_on_one_id_never_raises_and_one_write_wins_whole(make_store):
    loras = ["lora-1", "lora-2", "lora-3"]  # three first writes to collide on, one after the other

    def put(store: SqlStore, i: int) -> None:
        for lora_id in loras:
            store.put_lora(lora_id, status=f"status-{i}", url=f"https://cdn.example/{i}.safetensors", trigger=f"<s{i}>",
                           sha256=f"{i:064d}", direct_weights={"wan22": f"https://cdn.example/{i}/wan.safetensors"})

    _, errors = race(make_store, put)
    assert not errors, report(errors)
    for lora_id in loras:
        record = make_store().get_lora(lora_id)
        i = int(record.status.removeprefix("status-"))
        assert 0 <= i < THREADS
        assert (record.url, record.trigger, record.sha256, record.direct_weights) == (
            f"https://cdn.example/{i}.safetensors", f"<s{i}>", f"{i:064d}",
            {"wan22": f"https://cdn.example/{i}/wan.safetensors"})


def test_put_lora_replaces_every_field(make_store):
    store = make_store()
    store.put_lora("lora-1", status="training", url="https://a", trigger="<a>", direct_weights={"wan22": "https://w"})
    store.put_lora("lora-1", status="completed", url="https://b")
    record = store.get_lora("lora-1")
    assert (record.status, record.url, record.trigger, record.sha256, record.direct_weights) == (
        "completed", "https://b", None, None, {})
    assert store.get_lora("other") is None


def test_concurrent_identical_charges_land_once(make_store):
    make_store().create_job("job")
    results, errors = race(make_store, lambda store, i: store.charge("job", "c1", STAGE, API, 0.005, {"thread": i}))
    assert not errors, report(errors)
    assert Counter(results) == {True: 1, False: THREADS - 1}
    store = make_store()
    [row] = assert_costs_consistent(store, "job")
    assert row["cost"] == Decimal("0.005") and store.total_cost("job") == Decimal("0.005")


def test_concurrent_distinct_charges_all_land_and_replays_are_refused(make_store):
    make_store().create_job("job")

    def cost(i: int, j: int) -> Decimal:
        return Decimal(i * 5 + j + 1) / 10_000

    def charge(store: SqlStore, i: int) -> list[bool]:
        landed = [store.charge("job", f"clip-{i}-{j}", STAGE, API, cost(i, j)) for j in range(5)]
        return landed + [store.charge("job", f"clip-{i}-0", STAGE, API, cost(i, 0))]  # a replay

    results, errors = race(make_store, charge)
    assert not errors, report(errors)
    assert all(r == [True] * 5 + [False] for r in results)
    store = make_store()
    rows = assert_costs_consistent(store, "job")
    assert len(rows) == THREADS * 5
    assert store.total_cost("job") == sum(cost(i, j) for i in range(THREADS) for j in range(5))


def test_a_charge_for_a_missing_job_raises_and_writes_nothing(make_store):
    store = make_store()
    store.create_job("other")
    with pytest.raises(LedgerError, match="no job 'missing'"):
        store.charge("missing", "c1", STAGE, API, 0.005)
    assert store.job_costs("missing") == []
    with pytest.raises(LedgerError):
        store.total_cost("missing")
    assert store.job_costs("other") == [] and store.total_cost("other") == 0
    store.create_job("missing")  # nothing was written: the same charge now lands, once
    assert store.charge("missing", "c1", STAGE, API, 0.005) is True
    assert store.charge("missing", "c1", STAGE, API, 0.005) is False
    assert len(assert_costs_consistent(store, "missing")) == 1


def test_concurrent_charges_for_a_missing_job_all_raise_ledger_error(make_store):
    _, errors = race(make_store, lambda store, i: store.charge("missing", f"c{i}", STAGE, API, 0.005))
    assert len(errors) == THREADS and all(isinstance(e, LedgerError) and not e.retryable for e in errors), errors[:3]
    assert make_store().job_costs("missing") == []


def test_concurrent_apply_on_one_job_never_raises_and_charges_each_clip_once(make_store):
    make_store().put_lora("char", status="completed", url="https://bucket.example/char.safetensors", trigger="<s0>")
    clips = [ClipPrompt("c1", "walks in", ["https://cdn.example/face.png"], []),
             ClipPrompt("c2", "a wide shot", [], ["https://cdn.example/scene.png"]),
             ClipPrompt("c3", "turns around", ["https://cdn.example/face2.png"], [])]

    at_create = threading.Barrier(THREADS, timeout=60)

    def apply(store: SqlStore, i: int):
        create_job = store.create_job  # the jobs' first writes, released together
        store.create_job = lambda job_id: (at_create.wait(), create_job(job_id))[1]
        with LoraApplicator(store=store, preprocessing=ScriptedBackend(), sleep=lambda s: None) as applicator:
            return applicator.apply("job-3", clips, "kling_v21", "char")

    results, errors = race(make_store, apply)
    assert not errors, report(errors)
    assert {r.path for r in results} == {"preprocessed"}
    store = make_store()
    rows = assert_costs_consistent(store, "job-3")
    assert sorted(r["clip_id"] for r in rows) == ["c1", "c3"]
    assert {r["api_name"] for r in rows} == {API} and store.total_cost("job-3") == Decimal("0.01")


def test_without_on_conflict_the_savepoint_fallback_is_race_free_too(make_store, monkeypatch):
    """Databases other than PostgreSQL and SQLite: insert in a savepoint, a clash on the key is no error."""
    import sdxl_lora_client.store as store_module

    monkeypatch.setattr(store_module, "_ON_CONFLICT_INSERT", {})
    _, errors = race(make_store, lambda store, i: store.create_job("job"))
    assert not errors, report(errors)
    _, errors = race(make_store, lambda store, i: store.put_lora("lora-1", status=f"status-{i}", url=f"https://{i}"))
    assert not errors, report(errors)
    record = make_store().get_lora("lora-1")
    assert record.url == "https://" + record.status.removeprefix("status-")
    results, errors = race(make_store, lambda store, i: store.charge("job", "c1", STAGE, API, 0.005))
    assert not errors, report(errors)
    assert Counter(results) == {True: 1, False: THREADS - 1}
    with pytest.raises(LedgerError):
        make_store().charge("missing", "c1", STAGE, API, 0.005)
    assert len(assert_costs_consistent(make_store(), "job")) == 1


def test_recorded_charges_replay_once_each_creating_their_job(make_store):
    charges = [Charge("job-r", f"c{i}", STAGE, API, Decimal("0.005"), {"i": i}) for i in range(3)]
    store = make_store()
    assert store.record_charges(charges) == 3, "the job did not exist: it is created"
    assert store.record_charges(charges) == 0, "a second replay writes nothing"
    results, errors = race(make_store, lambda store, i: store.record_charges(charges))
    assert not errors, report(errors)
    assert sum(results) == 0
    rows = assert_costs_consistent(store, "job-r")
    assert [(r["clip_id"], r["cost"]) for r in rows] == [(f"c{i}", Decimal("0.005")) for i in range(3)]


def test_money_is_decimal_to_the_millionth(make_store):
    store = make_store()
    store.create_job("job")
    for i, cost in enumerate(["0.1", 0.2, Decimal("0.0000004"), Decimal("0.0000006")]):
        store.charge("job", f"c{i}", STAGE, API, cost)
    assert store.total_cost("job") == Decimal("0.300001") and isinstance(store.total_cost("job"), Decimal)
    assert [r["cost"] for r in store.job_costs("job")] == [
        Decimal("0.1"), Decimal("0.2"), Decimal("0"), Decimal("0.000001")], "rounded half-even to 6 places"
