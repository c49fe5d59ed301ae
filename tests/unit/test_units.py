"""Pieces without a database server: serialization, retry policy, registration, migrations,
license claims, the queue's shares."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from tenantflow import App, ConfigError, RetryPolicy, SerializationError, WorkflowContext
from tenantflow.client import new_run_id
from tenantflow.platform.licensing import LicenseClaims, Quotas
from tenantflow.queue.fairness import Turn, shares
from tenantflow.serde import TypedCodec, dumps, loads
from tenantflow.store.migrate import migrate_sqlite, script_head
from tenantflow.store.schema import HEAD_REVISION, metadata


class Model(BaseModel):
    name: str
    when: dt.datetime


@dataclasses.dataclass
class Data:
    id: uuid.UUID
    models: list[Model]


def typed(data: Data, n: int, *rest: Model) -> Data:
    return data


def test_models_and_dataclasses_round_trip_through_type_hints() -> None:
    value = Data(
        id=uuid.uuid4(), models=[Model(name="a", when=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))]
    )
    codec = TypedCodec(typed)
    assert codec.decode_return(loads(dumps(value))) == value
    args, kwargs = codec.decode_args(loads(dumps([value, 3, value.models[0]])), {"n": 1})
    assert args == [value, 3, value.models[0]] and kwargs == {"n": 1}


@pytest.mark.parametrize("bad", [{1, 2}, b"bytes", object(), {"nested": [frozenset()]}])
def test_values_without_a_json_form_are_refused(bad: object) -> None:
    with pytest.raises(SerializationError, match="the input"):
        dumps(bad, what="the input")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_json_values_round_trip(value: object) -> None:
    assert loads(dumps(value)) == value


def test_retry_policy_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(
        max_attempts=10, initial_interval=1, backoff_coefficient=2, max_interval=5, jitter=0.2
    )
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 5), (8, 5)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert max(delays) - min(delays) > 0  # jitter spreads them
    assert policy.should_retry(ValueError(), 9)
    assert not policy.should_retry(ValueError(), 10)
    narrow = RetryPolicy(retry_on=(ConnectionError,), non_retryable=(ConnectionResetError,))
    assert narrow.should_retry(ConnectionError(), 1)
    assert not narrow.should_retry(ConnectionResetError(), 1)
    assert not narrow.should_retry(ValueError(), 1)
    assert not narrow.should_retry(SerializationError(), 1)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"jitter": 2}, {"backoff_coefficient": 0.5}, {"initial_interval": -1}],
)
def test_bad_retry_policies_are_config_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_registration_rules() -> None:
    app = App("t")

    @app.workflow(name="w")
    async def w(ctx: WorkflowContext) -> None: ...

    with pytest.raises(ConfigError, match="registered twice"):
        app.workflow(name="w")(w.fn)
    with pytest.raises(ConfigError, match="must be an async function"):
        app.workflow(lambda ctx: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError):
        app.step(timeout=-1)


def test_run_ids_are_time_ordered_and_unique() -> None:
    ids = [new_run_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_schema_head_matches_the_migrations() -> None:
    assert script_head() == HEAD_REVISION


def test_a_migrated_database_matches_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "tenant.db"
    assert migrate_sqlite(path) is True
    assert migrate_sqlite(path) is False  # already at head: nothing to do
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_platform_migrations_match_the_schema_and_give_old_plans_weight_1(
    tmp_path: Path,
) -> None:
    from alembic import command

    from tenantflow.platform.database import PLATFORM_MIGRATIONS, migrate_platform
    from tenantflow.platform.schema import PLATFORM_HEAD
    from tenantflow.platform.schema import metadata as platform_metadata
    from tenantflow.store.migrate import alembic_config

    assert script_head(PLATFORM_MIGRATIONS) == PLATFORM_HEAD
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'platform.db'}")
    try:
        with engine.begin() as conn:  # a plan made before plans had a dispatch weight
            config = alembic_config(PLATFORM_MIGRATIONS)
            config.attributes["connection"] = conn
            command.upgrade(config, "p0002")
            conn.execute(
                sa.text(
                    "INSERT INTO plans (id, name, entitlements, created_at) "
                    """VALUES ('old', 'Old', '["*"]', 0)"""
                )
            )
        migrate_platform(engine)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), platform_metadata) == []
            weights = conn.execute(sa.text("SELECT id, dispatch_weight FROM plans")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in weights] == [("old", 1)]


def test_a_license_signed_before_dispatch_weights_means_weight_1() -> None:
    old = {"runs_per_month": None, "concurrent_runs": 2, "seats": None, "requests_per_second": None}
    claims = {"jti": "l", "tid": "acme", "plan": "p", "quotas": old, "iat": 0, "exp": 60}
    assert LicenseClaims.from_claims(claims).quotas == Quotas(concurrent_runs=2, dispatch_weight=1)


@given(
    budget=st.integers(1, 300),
    turns=st.lists(
        st.tuples(st.integers(1, 100), st.floats(0, 1000, allow_nan=False)), min_size=1, max_size=40
    ),
)
def test_shares_add_up_to_the_budget_by_weight(budget: int, turns: list[tuple[int, float]]) -> None:
    given_turns = [Turn(f"t{i}", w, p) for i, (w, p) in enumerate(turns)]
    got = shares(budget, given_turns)
    assert sum(got.values()) == budget
    total = sum(w for w, _ in turns)
    for turn in given_turns:  # its weight's part, rounded down, and at most one more
        assert 0 <= got[turn.tenant] - budget * turn.weight // total <= 1


def test_logs_mask_fields_named_like_secrets() -> None:
    from tenantflow.telemetry.logging import MASK, mask_secrets

    event = {"event": "login", "password": "hunter2", "token": "eyJ...", "tenant": "acme"}
    assert mask_secrets(None, "info", event) == {
        "event": "login",
        "password": MASK,
        "token": MASK,
        "tenant": "acme",
    }


@pytest.mark.parametrize(
    ("message", "redacted"),
    [
        (
            'connection failed: connection to server at "10.1.2.3", port 6432 failed: FATAL:  '
            'database "tf_tenant_acme" does not exist',
            'connection failed: connection to server at "…", port … failed: FATAL:  '
            'database "…" does not exist',
        ),
        (
            'connection to server at "db.internal" (::1), port 5432 failed: FATAL:  password '
            'authentication failed for user "acme_owner"',
            'connection to server at "…" (…), port … failed: FATAL:  password '
            'authentication failed for user "…"',
        ),
        (
            "invalid dsn: host=db.internal port=5433 dbname=tf_x user=u password=hunter2",
            "invalid dsn: host=… port=… dbname=… user=… password=…",
        ),
        ("no answer from postgresql://u:hunter2@db:5432/tf_x?x=1", "no answer from …://…"),
        (
            "Error 111 connecting to 10.0.0.9:6379. Connection refused.",
            "Error 111 connecting to …. Connection refused.",
        ),
        (
            "Error -2 connecting to redis.internal:6379. Name or service not known.",
            "Error -2 connecting to …. Name or service not known.",
        ),
    ],
)
def test_driver_messages_are_redacted(message: str, redacted: str) -> None:
    from tenantflow.backends import redact

    assert redact(message) == redacted


def test_logs_redact_driver_messages_not_the_code() -> None:
    from tenantflow.telemetry.logging import redact_servers

    traceback = (
        "Traceback (most recent call last):\n"
        '  File "/srv/app.py", line 3, in f\n'
        '    connect("sslmode=x")\n'
        'psycopg.OperationalError: FATAL:  database "tf_tenant_acme" does not exist\n'
    )
    event = {
        "event": 'the "event" is ours',
        "error": 'role "acme" does not exist',
        "exception": traceback,
    }
    assert redact_servers(None, "error", event) == {
        "event": 'the "event" is ours',
        "error": 'role "…" does not exist',
        "exception": traceback.replace('"tf_tenant_acme"', '"…"'),
    }


def test_a_served_process_keeps_what_it_loaded_out_of_full_collections(tmp_path: Path) -> None:
    """``tenantflow worker``/``api``/``dev`` freeze the heap they start with: a full pass of
    the garbage collector over every module's objects stalled a busy worker for ~50 ms."""
    import asyncio
    import gc

    from tenantflow.cli.serve import run_loop
    from tenantflow.settings import Settings

    seen: list[int] = []

    async def main() -> None:
        seen.append(gc.get_freeze_count())
        await asyncio.sleep(0)

    gc.unfreeze()
    try:
        run_loop(main, Settings(home=tmp_path, event_loop="asyncio"))
    finally:
        gc.unfreeze()
    assert seen and seen[0] > 10_000, seen  # the modules loaded by now, at least
