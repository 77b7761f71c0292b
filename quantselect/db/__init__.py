"""Persistence: SQLAlchemy 2 models, engine factory, Alembic migrations run from code, the repository.

Nothing here is imported by ``import quantselect``; the service layer imports it when it needs the DB.
"""

from quantselect.db.engine import current_revision, ensure_schema, make_engine, upgrade
from quantselect.db.repository import Repository

__all__ = ["Repository", "current_revision", "ensure_schema", "make_engine", "upgrade"]
