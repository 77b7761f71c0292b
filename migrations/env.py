"""Alembic environment. Run from code (quantselect.db.engine passes a Connection in
config.attributes["connection"]) or from the ``alembic`` CLI (URL from alembic.ini or QUANTSELECT_DB_URL)."""

from __future__ import annotations

from alembic import context

from quantselect.db.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kw) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kw)


def _url() -> str:
    from quantselect.db.engine import normalize_url
    from quantselect.settings import get_settings

    return normalize_url(config.get_main_option("sqlalchemy.url") or get_settings().db_url)


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)  # the caller owns the connection and its transaction
        return
    from quantselect.db.engine import make_engine

    if config.config_file_name:
        from logging.config import fileConfig

        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":  # as quantselect.db.engine._locked: a batch migration's
                # table rebuild (DROP) would cascade and delete every candidate and item result
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
