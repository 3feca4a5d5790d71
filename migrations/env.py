"""Alembic environment: URL from medcad settings (or the config's sqlalchemy.url)."""

from __future__ import annotations

from alembic import context

from app.db.base import Base
from app.db import records  # noqa: F401  (registers the tables)
from app.db.session import make_engine
from app.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def run_migrations() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=url.startswith("sqlite"),
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
