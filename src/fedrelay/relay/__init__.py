"""The relay server: sans-I/O hub, SQLite store, WebSocket and HTTP I/O."""

from .config import RelayConfig
from .server import Relay

__all__ = ["Relay", "RelayConfig"]
