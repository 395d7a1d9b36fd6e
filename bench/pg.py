"""The bench's own PostgreSQL server, for the ``fedrelay-pg`` and ``fedrelay-pg3`` relays.

The tests' server (``tests/support/postgres.py``: Debian's binaries, a throwaway data directory,
a free port, never the machine's server), with PostgreSQL's default durability (``fsync`` and
``synchronous_commit`` on) unless ``--pg-set`` says otherwise: what a platform team runs.
"""

from __future__ import annotations

import sys

from relays import REPO_DIR

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from tests.support.postgres import PgServer, pg_bin

DEFAULTS = {"fsync": "on", "max_connections": "300", "shared_buffers": "256MB"}
"""Relays keep a few connections each; 256 MB so a 100,000-event run is read from memory."""

__all__ = ["DEFAULTS", "PgServer", "pg_bin", "start_pg"]


def start_pg(overrides: dict[str, str]) -> PgServer:
    """Start the server with the bench's settings and ``overrides``; the caller removes it."""
    return PgServer(settings={**DEFAULTS, **overrides}).start()
