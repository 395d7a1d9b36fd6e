"""The relay server: sans-I/O hub, SQLite store, WebSocket and HTTP I/O."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import RelayConfig

if TYPE_CHECKING:
    from .server import Relay

__all__ = ["Relay", "RelayConfig"]


def __getattr__(name: str) -> object:
    """``Relay`` on first use: the command line reads the settings without loading the server."""
    if name == "Relay":
        from .server import Relay

        return Relay
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
