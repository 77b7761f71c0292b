"""Engine factory and Alembic migrations run from code (no alembic.ini needed)."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text

from quantselect.errors import SchemaError

_PG_LOCK_ID = 0x5153_4442  # "QSDB": serializes concurrent first-use migrations on PostgreSQL


def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> ``postgresql+psycopg://`` (psycopg 3 is the one driver)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value: Any) -> str:
    """JSON columns' serializer: NaN and ±inf become null. json.dumps writes them as NaN/Infinity,
    which PostgreSQL's json refuses, so one NaN logprob would fail the whole write (and its job)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:  # rare: sanitise only then
        return json.dumps(_finite(value), allow_nan=False)


def make_engine(url: str, connect_timeout: int | None = None) -> Engine:
    """``connect_timeout``: seconds a PostgreSQL connection may take (a probe); None: the driver's own."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, json_serializer=_json,
                             connect_args={"connect_timeout": connect_timeout} if connect_timeout else {})
    if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, json_serializer=_json)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (SQLAlchemy's pysqlite recipe)
        # busy_timeout first: switching a new file to WAL waits for the lock like any write (another
        # process migrating it on first use holds it), rather than failing at once as "locked"
        for pragma in ("busy_timeout=30000", "journal_mode=WAL", "foreign_keys=ON"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front, so busy_timeout applies instead of a mid-transaction SQLITE_BUSY.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, whose transactions take the write lock at BEGIN on SQLite."""
    return engine.execution_options(immediate=True)


def migrations_dir() -> Path:
    """<repo>/migrations in a checkout (editable install), else quantselect/_migrations in the wheel."""
    pkg = Path(__file__).resolve().parents[1]
    checkout = pkg.parent / "migrations"
    if (checkout / "env.py").is_file() and (pkg.parent / "pyproject.toml").is_file():
        return checkout
    shipped = pkg / "_migrations"
    if (shipped / "env.py").is_file():
        return shipped
    raise SchemaError(f"quantselect's migration scripts are missing (looked in {checkout} and {shipped}); reinstall quantselect")


def _config(connection: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def _current(conn: Connection) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(conn).get_current_heads())


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """One transaction that no other process's schema check can interleave with."""
    with writer(engine).connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Batch migrations rebuild a SQLite table (copy, DROP, rename): with foreign keys on, the
            # DROP of jobs/candidates cascades and deletes every candidate and item result. The pragma
            # is a no-op inside a transaction, so it goes to the DBAPI connection before BEGIN;
            # _upgrade checks the keys before commit instead.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
                yield conn
        finally:
            if sqlite:
                try:
                    conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
                except Exception:  # noqa: BLE001 - never hand the pool a connection without them
                    conn.invalidate()


def _upgrade(conn: Connection, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_config(conn), revision)
    if conn.dialect.name == "sqlite":
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:  # raising rolls the whole upgrade back
            tables = ", ".join(sorted({row[0] for row in broken}))
            raise SchemaError(f"upgrading the schema would leave {len(broken)} row(s) of {tables} pointing at "
                              "rows that do not exist; the database was left as it was")


def upgrade(url: str | Engine, revision: str = "head") -> None:
    """``alembic upgrade head`` from code."""
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with _locked(engine) as conn:
            _upgrade(conn, revision)
    finally:
        if engine is not url:
            engine.dispose()


def current_revision(url: str | Engine) -> str | None:
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as conn:
            revs = _current(conn)
    finally:
        if engine is not url:
            engine.dispose()
    return ",".join(sorted(revs)) or None


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL (None: another database, or one in memory)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:" \
            or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database).expanduser()


def has_password(url: str) -> bool:
    """Whether the URL holds a password (``user:PASSWORD@host``, or ``?password=``)."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL: the database check says so
        return False
    return bool(parsed.password or parsed.query.get("password"))


def shown_url(url: str) -> str:
    """The URL with its password hidden, as it may be printed."""
    return make_url(url).render_as_string(hide_password=True)


def probe(url: str, timeout: int = 5) -> tuple[str | None, str]:
    """Ask the database at ``url`` once, giving up after ``timeout`` seconds: (its schema revision,
    None when it has none yet; this code's head revision). A SQLite file is not created here."""
    file = sqlite_file(url)
    if file is not None and not file.exists():
        raise FileNotFoundError(file)
    # a SQLite file as it is (make_engine's pragmas would turn another program's file to WAL)
    engine = create_engine(normalize_url(url)) if file is not None else make_engine(url, connect_timeout=timeout)
    try:
        return current_revision(engine), head_revision()
    finally:
        engine.dispose()


def known_revisions() -> set[str]:
    return {r.revision for r in _script().walk_revisions()}


def head_revision() -> str:
    return ",".join(sorted(_script().get_heads()))


def ensure_schema(engine: Engine) -> None:
    """Migrate an empty or older database to head; refuse one whose revision this code does not know."""
    script = _script()
    known = {r.revision for r in script.walk_revisions()}
    heads = set(script.get_heads())
    with _locked(engine) as conn:
        current = _current(conn)
        unknown = current - known
        if unknown:
            raise SchemaError(
                f"the database is at schema revision {', '.join(sorted(unknown))}, which this quantselect does not "
                f"know (it knows up to {', '.join(sorted(heads))}); upgrade quantselect, then run `quantselect db upgrade`"
            )
        if current != heads:
            _upgrade(conn)
