"""The names the wire accepts, without the models: event types and the run-id alphabet.

Kept out of ``schemas`` (whose pydantic models take ~100 ms to import) because emitters check
them in every process, and under Flower's Deployment Engine every message is a new process.
``schemas.events`` re-exports them; ``tests/test_cli.py`` checks them against the models.
"""

from __future__ import annotations

import re

RUN_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
"""Run ids and producer names: safe in URLs, file names and log lines."""

RUN_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
"""Use with ``fullmatch``: ``$`` would let a trailing newline through."""

EVENT_TYPES: frozenset[str] = frozenset(
    (
        "training_start",
        "round_start",
        "client_progress",
        "client_complete",
        "round_end",
        "epoch_start",
        "epoch_end",
        "early_stopping",
        "training_end",
        "status",
        "error",
        "log",
    )
)
