"""The gateway's state: API keys and the audit trail in one SQL database (SQLAlchemy 2.0).

`open_store(location)` opens a SQLite file (the default, `serve/llmtune.db`: no setup) or a
server named by URL (`postgresql+psycopg://user:password@host/db`, for several gateway
replicas), and brings its schema to the newest Alembic revision first (the migrations ship in
llmtune/serve/migrations/; no alembic.ini to find). What the gateway calls, per request:

- `Store.lookup(key)`: one query, no cache, so a key revoked by any process is refused on the
  very next request to every replica;
- `AuditLog.write(...)`: one row per moderation decision, committed before the gateway sends
  what the decision allowed, so a process killed mid-request loses no row of a request it answered.

Keys are stored as SHA-256 hashes. The database finds a key by the first 16 hex digits of its
hash (an index that reveals nothing usable); the full hash is then compared in constant time
(`hmac.compare_digest`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Integer, MetaData, String, Text, create_engine, delete, event,
                        or_, select, text)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from llmtune.errors import LlmtuneError
from llmtune.serve.keys import AgeVerification, KeyError_, KeyRecord, hash_key, new_key, new_key_id

MIGRATIONS = Path(__file__).parent / "migrations"
LOOKUP_CHARS = 16  # hex digits of the hash the database indexes
_PG_MIGRATION_LOCK = 0x6C6D74756E65  # pg_advisory_xact_lock id: one replica migrates, the others wait


class StoreUnavailable(LlmtuneError):
    """The key and audit database cannot be reached (the gateway answers 503)."""


class Base(DeclarativeBase):
    # Deterministic constraint names, so migrations name the same things on SQLite and PostgreSQL.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s", "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    })


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # public, safe to log
    name: Mapped[str] = mapped_column(String(200), index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    lookup: Mapped[str] = mapped_column(String(LOOKUP_CHARS), index=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    av_method: Mapped[str | None] = mapped_column(String(200))
    av_verifier: Mapped[str | None] = mapped_column(String(200))
    av_date: Mapped[str | None] = mapped_column(String(32))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoke_reason: Mapped[str | None] = mapped_column(String(500))
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    burst: Mapped[int | None] = mapped_column(Integer)


class AuditRecord(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    key_id: Mapped[str | None] = mapped_column(String(16), index=True)
    route: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16))
    allowed: Mapped[bool] = mapped_column(Boolean)
    categories: Mapped[list] = mapped_column(JSON)
    layer: Mapped[str | None] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[str | None] = mapped_column(Text)  # only with audit_content: true


class DeploymentSecret(Base):
    """Secrets of the deployment itself (the watermark key): made at first use, shared by every replica."""

    __tablename__ = "deployment_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).isoformat(timespec="seconds")


def store_url(location: str) -> str:
    """A SQLAlchemy URL: URLs pass (plain postgresql:// gets the psycopg 3 driver); a path is a SQLite file."""
    if "://" not in location:
        return f"sqlite:///{Path(location).expanduser().resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if location.startswith(plain):
            return "postgresql+psycopg://" + location[len(plain):]
    return location


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            # WAL: readers never block the writer; NORMAL: a commit survives the process being
            # killed (SIGKILL), though not a power cut (use PostgreSQL for that).
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True, connect_args={"connect_timeout": 5}
                         if url.startswith("postgresql") else {})


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _sqlite_lock(engine: Engine):
    """Processes on one SQLite file migrate one at a time (held until the migration has committed)."""
    if engine.dialect.name != "sqlite":
        yield
        return
    with open(f"{engine.url.database}.migrate-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def migrate(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the schema to `revision` (default: the newest); returns (before, after)."""
    from alembic import command

    before = current_revision(engine)
    if revision == "head" and before == head_revision():
        return before, before
    with _sqlite_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # replicas that start together: one migrates, the others wait
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        command.upgrade(_alembic_config(conn), revision)
    return before, current_revision(engine)


class Store:
    """Keys and audit rows in one database; every method is one short transaction."""

    def __init__(self, location: str, *, migrate_schema: bool = True):
        self.url = store_url(location)
        self.engine = _engine(self.url)
        self.display = self.engine.url.render_as_string(hide_password=True)
        if migrate_schema:
            try:
                migrate(self.engine)
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
                raise StoreUnavailable(f"cannot open the key and audit store {self.display}: {exc.orig}; "
                                       "check `store` in the serve config (or $LLMTUNE_STORE)") from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self):
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise StoreUnavailable(f"the key and audit store {self.display} cannot be reached: {exc.orig}") from exc

    # -- keys ---------------------------------------------------------------------------------

    @staticmethod
    def _record(row: ApiKey) -> KeyRecord:
        av = AgeVerification(row.av_method, row.av_verifier or "", row.av_date or "") if row.av_method else None
        return KeyRecord(id=row.id, name=row.name, sha256=row.sha256, created=_iso(row.created),
                         revoked=row.revoked_at is not None, age_verification=av,
                         requests_per_minute=row.requests_per_minute, burst=row.burst,
                         revoked_at=_iso(row.revoked_at), revoke_reason=row.revoke_reason)

    @property
    def records(self) -> list[KeyRecord]:
        with self.session() as s:
            return [self._record(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.created, ApiKey.id))]

    def add(self, name: str, verification: AgeVerification | None, requests_per_minute: int | None = None,
            burst: int | None = None) -> tuple[str, KeyRecord]:
        """A new key for `name`; returns the key (shown once) and its record."""
        if (requests_per_minute is None) != (burst is None):
            raise KeyError_("give both --requests-per-minute and --burst for a key's own limit, or neither")
        key = new_key()
        digest = hash_key(key)
        with self.session() as s:
            if s.scalar(select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))):
                raise KeyError_(f"a live key named `{name}` exists; revoke it first (llmtune keys revoke {name})")
            row = ApiKey(id=new_key_id(), name=name, sha256=digest, lookup=digest[:LOOKUP_CHARS], created=_now(),
                         av_method=verification.method if verification else None,
                         av_verifier=verification.verifier if verification else None,
                         av_date=verification.date if verification else None,
                         requests_per_minute=requests_per_minute, burst=burst)
            s.add(row)
        return key, self._record(row)

    def _find(self, s: Session, name_or_id: str, live_only: bool) -> ApiKey:
        query = select(ApiKey).where(or_(ApiKey.name == name_or_id, ApiKey.id == name_or_id))
        if live_only:
            query = query.where(ApiKey.revoked_at.is_(None))
        row = s.scalars(query.order_by(ApiKey.created.desc())).first()
        if row is None:
            raise KeyError_(f"no {'live ' if live_only else ''}key named or with id `{name_or_id}` in {self.display} "
                            "(llmtune keys list)")
        return row

    def revoke(self, name_or_id: str, reason: str | None = None) -> KeyRecord:
        """Revoke the live key of that name or id: every replica refuses it from its next request on."""
        with self.session() as s:
            row = self._find(s, name_or_id, live_only=True)
            row.revoked_at, row.revoke_reason = _now(), reason
        return self._record(row)

    def set_limit(self, name_or_id: str, requests_per_minute: int | None, burst: int | None) -> KeyRecord:
        if (requests_per_minute is None) != (burst is None):
            raise KeyError_("give both --requests-per-minute and --burst, or --default to use the config's limit")
        with self.session() as s:
            row = self._find(s, name_or_id, live_only=True)
            row.requests_per_minute, row.burst = requests_per_minute, burst
        return self._record(row)

    def import_records(self, records: list[KeyRecord]) -> tuple[int, int]:
        """Add keys read from an old keys.json (hashes, ids, verification, revocation); returns (added, already there)."""
        added = present = 0
        with self.session() as s:
            for r in records:
                if s.scalar(select(ApiKey.id).where(or_(ApiKey.sha256 == r.sha256, ApiKey.id == r.id))):
                    present += 1
                    continue
                created = dt.datetime.fromisoformat(r.created) if r.created else _now()
                av = r.age_verification
                s.add(ApiKey(id=r.id, name=r.name, sha256=r.sha256, lookup=r.sha256[:LOOKUP_CHARS], created=created,
                             av_method=av.method if av else None, av_verifier=av.verifier if av else None,
                             av_date=av.date if av else None, revoked_at=_now() if r.revoked else None,
                             revoke_reason="revoked before the import" if r.revoked else None))
                s.flush()
                added += 1
        return added, present

    def lookup(self, key: str) -> KeyRecord | None:
        """The live record of this key, or None (unknown or revoked). Read from the database every time."""
        digest = hash_key(key)
        with self.session() as s:
            rows = s.scalars(select(ApiKey).where(ApiKey.lookup == digest[:LOOKUP_CHARS])).all()
        match = None
        for row in rows:  # all candidates are compared, so the time does not say which one matched
            if hmac.compare_digest(row.sha256.encode(), digest.encode()):
                match = row
        return None if match is None or match.revoked_at is not None else self._record(match)

    # -- deployment secrets -------------------------------------------------------------------

    def deployment_secret(self, name: str, create: bool = True) -> str | None:
        """The secret called `name`; made (64 random hex digits) the first time it is asked for.
        Replicas that ask at once agree: one insert wins, the others read it."""
        import secrets

        with self.session() as s:
            row = s.get(DeploymentSecret, name)
        if row is not None or not create:
            return row.value if row is not None else None
        try:
            with self.session() as s:
                s.add(DeploymentSecret(name=name, value=secrets.token_hex(32), created=_now()))
        except sa_exc.IntegrityError:
            pass  # another replica made it first
        with self.session() as s:
            return s.get(DeploymentSecret, name).value

    # -- audit --------------------------------------------------------------------------------

    def add_audit(self, row: dict) -> None:
        with self.session() as s:
            s.add(AuditRecord(time=_now(), **row))

    def audit_rows(self, key_id: str | None = None) -> list[dict]:
        query = select(AuditRecord).order_by(AuditRecord.id)
        if key_id is not None:
            query = query.where(AuditRecord.key_id == key_id)
        with self.session() as s:
            return [{"id": r.id, "time": _iso(r.time), "key_id": r.key_id, "route": r.route, "stage": r.stage,
                     "allowed": r.allowed, "categories": r.categories, "layer": r.layer, "sha256": r.sha256,
                     **({"content": r.content} if r.content is not None else {})} for r in s.scalars(query)]

    def purge_audit(self, older_than_days: int) -> int:
        """Delete audit rows older than that many days; returns how many."""
        cutoff = _now() - dt.timedelta(days=older_than_days)
        with self.session() as s:
            return s.execute(delete(AuditRecord).where(AuditRecord.time < cutoff)).rowcount

    def erase_audit(self, name_or_id: str) -> tuple[list[str], int]:
        """Delete every audit row of the keys with that name (all of them, revoked ones too) or id."""
        with self.session() as s:
            ids = list(s.scalars(select(ApiKey.id).where(or_(ApiKey.name == name_or_id, ApiKey.id == name_or_id))))
            count = s.execute(delete(AuditRecord).where(AuditRecord.key_id.in_(ids or [name_or_id]))).rowcount
        if not ids and not count:
            raise KeyError_(f"no key named or with id `{name_or_id}` and no audit rows for it in {self.display}")
        return ids or [name_or_id], count


def open_store(location: str) -> Store:
    return Store(location)


class AuditLog:
    """One row per moderation decision. Content only when the operator opts in.

    `write` returns once the row is committed, so callers write before they release what the
    decision allowed; it runs in its own threads to keep the event loop free.
    """

    def __init__(self, store: Store, with_content: bool, threads: int = 4):
        self.store = store
        self.with_content = with_content
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="audit")

    def record(self, key: KeyRecord | None, route: str, stage: str, text: str, decision) -> None:
        self.store.add_audit({
            "key_id": key.id if key else None, "route": route, "stage": stage, "allowed": bool(decision.allowed),
            "categories": list(decision.categories or []), "layer": decision.layer,
            "sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(), "content": text if self.with_content else None,
        })

    async def write(self, key: KeyRecord | None, route: str, stage: str, text: str, decision) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.record, key, route, stage, text, decision)



def new_revision(message: str) -> None:
    """Developers: write the next migration from the models' difference to the newest revision."""
    import tempfile

    from alembic import command
    from alembic.script import ScriptDirectory

    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(store_url(f"{tmp}/head.db"))
        migrate(engine)
        with engine.begin() as conn:
            command.revision(_alembic_config(conn), message, autogenerate=True,
                             rev_id=f"{len(list(ScriptDirectory.from_config(_alembic_config(None)).walk_revisions())) + 1:04d}")
        engine.dispose()
