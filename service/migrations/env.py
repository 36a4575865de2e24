"""Alembic environment of AdaPruner's own tables (the ``jobs`` table).

The database also holds Optuna's tables, which Optuna creates and migrates itself with its own Alembic
history in ``alembic_version``; ours is kept in ``adapruner_alembic_version`` and every comparison
looks at our tables only.
"""

from __future__ import annotations

from alembic import context

from service.db import VERSION_TABLE, Base, include_object, make_engine

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, include_object=include_object,
                      version_table=VERSION_TABLE, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      include_object=include_object, version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
