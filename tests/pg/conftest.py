from __future__ import annotations

import pytest

from tests.support.postgres import PgServer


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """One PostgreSQL server for the session (a database per test: ``pg_server.fresh_db()``)."""
    server = PgServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.remove()
