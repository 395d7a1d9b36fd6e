"""Debian's Chromium, as every browser test starts it: headless, no sandbox (root in CI), no
network of its own (this machine has none, and its connection attempts only add noise)."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the dashboard tests need Chromium: apt-get install -y chromium")
    return path
