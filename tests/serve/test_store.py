"""The key and audit store on SQLite and a real PostgreSQL: migrations (from empty and from the
previous revision), the old keys.json import, lookups, retention and erasure; rate-limit windows."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text, update

from llmtune.serve.config import RateLimit, ServeConfig
from llmtune.serve.keys import AgeVerification, KeyError_, hash_key
from llmtune.serve.ratelimit import KeyRateLimiter, window_for
from llmtune.serve.store import AuditRecord, Base, Store, head_revision, migrate, open_store
from tests.conftest import run_cli

VERIFIED = AgeVerification("id-document", "test operator", "2026-11-25")


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "llmtune.db")
    return request.getfixturevalue("postgres").new_database()


class Allowed:
    allowed, categories, layer = True, [], "none"


def test_migrations_from_empty_reach_a_schema_equal_to_the_models(location):
    store = Store(location, migrate_schema=False)
    assert migrate(store.engine) == (None, head_revision())
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []  # no model change lacks a migration
    assert {"api_keys", "audit", "alembic_version"} <= set(inspect(store.engine).get_table_names())
    assert migrate(store.engine) == (head_revision(), head_revision())  # a second run is a no-op


def test_migration_from_the_previous_revision_keeps_keys_and_audit(location):
    store = Store(location, migrate_schema=False)
    migrate(store.engine, "0001")
    key = "lt-written-under-0001"
    digest = hash_key(key)
    with store.engine.begin() as conn:  # rows as revision 0001 wrote them (no limit or reason columns yet)
        conn.execute(text("INSERT INTO api_keys (id, name, sha256, lookup, created, av_method, av_verifier, av_date) "
                          "VALUES ('k1', 'old', :h, :l, :t, 'id-document', 'ops', '2026-01-02')"),
                     {"h": digest, "l": digest[:16], "t": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)})
        conn.execute(text("INSERT INTO audit (time, key_id, route, stage, allowed, categories, layer, sha256) "
                          "VALUES (:t, 'k1', '/v1/chat/completions', 'input', :a, :c, 'none', :h)"),
                     {"t": dt.datetime.now(dt.timezone.utc), "a": True, "c": "[]", "h": "0" * 64})
    assert "requests_per_minute" not in {c["name"] for c in inspect(store.engine).get_columns("api_keys")}
    assert migrate(store.engine) == ("0001", head_revision())
    store = open_store(location)
    record = store.lookup(key)
    assert record.id == "k1" and record.age_verification == AgeVerification("id-document", "ops", "2026-01-02")
    assert record.requests_per_minute is None and record.revoke_reason is None
    assert [r["key_id"] for r in store.audit_rows()] == ["k1"]
    store.set_limit("old", 30, 3)
    assert store.lookup(key).burst == 3


def test_replicas_starting_together_migrate_once(location):
    errors: list[BaseException] = []

    def start():
        try:
            open_store(location).close()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Store(location, migrate_schema=False).lookup("lt-none") is None


def test_keys_add_lookup_revoke_and_limits(location):
    store = open_store(location)
    key, record = store.add("alice", VERIFIED)
    assert key.startswith("lt-") and record.sha256 == hash_key(key) and key not in json.dumps(record.__dict__, default=str)
    assert store.lookup(key).id == record.id and store.lookup(key + "x") is None and store.lookup("") is None
    with pytest.raises(KeyError_, match="live key named `alice` exists"):
        store.add("alice", VERIFIED)
    with pytest.raises(KeyError_, match="both"):
        store.add("bob", VERIFIED, requests_per_minute=5)
    store.set_limit("alice", 120, 4)
    assert (store.lookup(key).requests_per_minute, store.lookup(key).burst) == (120, 4)
    revoked = store.revoke(record.id, "verification withdrawn")
    assert revoked.revoked and revoked.revoke_reason == "verification withdrawn" and store.lookup(key) is None
    with pytest.raises(KeyError_, match="no live key"):
        store.revoke("alice")
    new_key, _ = store.add("alice", VERIFIED)  # a name may get a new key once the old one is revoked
    assert store.lookup(new_key) and [r.revoked for r in store.records] == [True, False]


@pytest.mark.slow
def test_import_of_an_old_keys_json_is_lossless_and_idempotent(tmp_path, location):
    live, gone = "lt-live-key-from-json", "lt-revoked-key-from-json"
    old = {"keys": [
        {"id": "aa11bb22", "name": "carol", "sha256": hash_key(live), "created": "2026-10-01T12:00:00+00:00",
         "revoked": False, "age_verification": {"method": "credit-card", "verifier": "ops", "date": "2026-10-01"}},
        {"id": "cc33dd44", "name": "dave", "sha256": hash_key(gone), "created": "2026-10-02T12:00:00+00:00",
         "revoked": True, "age_verification": None},
    ]}
    (tmp_path / "keys.json").write_text(json.dumps(old))
    done = run_cli("keys", "import", str(tmp_path / "keys.json"), "--store", location)
    assert done.returncode == 0 and "imported 2 keys" in done.stderr, done.stderr
    again = run_cli("keys", "import", str(tmp_path / "keys.json"), "--store", location)
    assert "imported 0 keys" in again.stderr and "2 were already there" in again.stderr
    store = open_store(location)
    carol = store.lookup(live)
    assert carol.id == "aa11bb22" and carol.created == "2026-10-01T12:00:00+00:00"
    assert carol.age_verification == AgeVerification("credit-card", "ops", "2026-10-01")
    assert store.lookup(gone) is None and [r.revoked for r in store.records] == [False, True]


@pytest.mark.slow
def test_retention_purge_and_erasure_of_one_key_trail(tmp_path, location):
    store = open_store(location)
    from llmtune.serve.store import AuditLog

    _, alice = store.add("alice", VERIFIED)
    _, bob = store.add("bob", VERIFIED)
    audit = AuditLog(store, with_content=False)
    for who in (alice, alice, bob):
        audit.record(who, "/v1/chat/completions", "input", "a tavern scene between two adults", Allowed)
    assert all("content" not in r for r in store.audit_rows())  # content only when the operator opts in
    with store.engine.begin() as conn:  # age bob's row past a 30-day retention
        conn.execute(update(AuditRecord).where(AuditRecord.key_id == bob.id)
                     .values(time=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=31)))
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"store: {location}\naudit_retention_days: 30\n")
    purged = run_cli("audit", "purge", "--config", str(cfg))
    assert purged.returncode == 0 and "deleted 1 audit rows older than 30 days" in purged.stderr, purged.stderr
    assert [r["key_id"] for r in store.audit_rows()] == [alice.id, alice.id]
    erased = run_cli("audit", "erase", "alice", "--store", location)
    assert erased.returncode == 0 and "erased 2 audit rows" in erased.stderr, erased.stderr
    assert store.audit_rows() == [] and len(store.records) == 2  # the key records stay
    assert run_cli("audit", "erase", "nobody", "--store", location).returncode == 2


def test_config_names_what_replaced_keys_file_and_audit_log():
    with pytest.raises(ValueError, match="llmtune keys import serve/keys.json"):
        ServeConfig(keys_file="serve/keys.json")
    with pytest.raises(ValueError, match="audit table"):
        ServeConfig(audit_log="serve/audit.jsonl")


@pytest.mark.parametrize(("rpm", "burst", "amount", "seconds"), [
    (60, 10, 10, 10),  # the default: 10 at once, 1 a second over time
    (1, 2, 2, 120),
    (240, 20, 20, 5),
    (120, 1, 2, 1),  # a window shorter than a second: rounded up, amount raised to keep the rate
    (7, 3, 3, 26),
])
def test_rate_limit_window_keeps_burst_and_never_exceeds_the_rate(rpm, burst, amount, seconds):
    item = window_for(RateLimit(requests_per_minute=rpm, burst=burst))
    assert (item.amount, item.get_expiry()) == (amount, seconds)
    assert item.amount >= burst and item.amount * 60 / item.get_expiry() <= rpm


def test_rate_limiter_in_memory_and_redis_counts_one_key_across_limiter_instances(redis_server, tmp_path):
    store = open_store(str(tmp_path / "llmtune.db"))
    _, own = store.add("own", VERIFIED, requests_per_minute=1, burst=3)
    _, named = store.add("named", VERIFIED)
    redis_server.flush()
    replicas = [KeyRateLimiter(redis_server.url, RateLimit(), {"named": RateLimit(requests_per_minute=1, burst=2)})
                for _ in range(2)]
    assert [replicas[i % 2].allow(own) for i in range(5)] == [True] * 3 + [False] * 2
    assert [replicas[i % 2].allow(named) for i in range(4)] == [True] * 2 + [False] * 2
    separate = [KeyRateLimiter("memory://", RateLimit(requests_per_minute=1, burst=2)) for _ in range(2)]
    assert [separate[i % 2].allow(named) for i in range(6)] == [True] * 4 + [False] * 2  # memory:// is per process


@pytest.mark.slow
def test_keys_cli_add_list_limit_against_either_store(location, tmp_path):
    added = run_cli("keys", "add", "erin", "--age-verified-by", "id-document", "--verifier", "ops", "--date", "2026-11-01",
                    "--store", location)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("lt-") and "not shown again" in added.stderr
    assert run_cli("keys", "limit", "erin", "--requests-per-minute", "240", "--burst", "20", "--store", location).returncode == 0
    listed = [json.loads(line) for line in run_cli("keys", "list", "--json", "--store", location).stdout.splitlines()]
    assert listed == [{**listed[0], "name": "erin", "revoked": False, "requests_per_minute": 240, "burst": 20,
                       "age_verification": {"method": "id-document", "verifier": "ops", "date": "2026-11-01"}}]
    assert "sha256" not in listed[0] and open_store(location).lookup(key).id == listed[0]["id"]
    old = tmp_path / "old.yaml"
    old.write_text("keys_file: serve/keys.json\n")
    refused = run_cli("keys", "list", "--config", str(old))
    assert refused.returncode == 2 and "llmtune keys import serve/keys.json" in refused.stderr
