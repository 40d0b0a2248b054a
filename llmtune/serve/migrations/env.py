"""Alembic environment for the gateway's store. llmtune runs it (llmtune/serve/store.py:migrate)
with an open connection; there is no alembic.ini.

New revision after changing the models in store.py (from the repository root):

    python -c "from llmtune.serve.store import new_revision; new_revision('what changed')"
"""

from alembic import context

from llmtune.serve.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations through llmtune: `llmtune store migrate` (or open_store())")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
