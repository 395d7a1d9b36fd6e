"""Node scripts in ``tests/node`` (their ``ws`` package installed by ``make test``: ``npm ci``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def node_command(script: str, *args: str, needs_ws: bool = True) -> list[str]:
    """``node tests/node/SCRIPT ARGS``; fails (never skips) when Node or ``ws`` is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("these tests need Node.js: make test installs it (apt-get install nodejs npm)")
    if needs_ws and not (NODE_DIR / "node_modules" / "ws").is_dir():
        pytest.fail(f"the npm package ws is not installed: npm ci --prefix {NODE_DIR} (make test does it)")
    return [node, str(NODE_DIR / script), *args]
