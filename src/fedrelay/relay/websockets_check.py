"""The parts of websockets below its public API that the relay uses, checked at start.

fanout.py writes one framed payload to many transports (``protocol.state``,
``protocol.extensions``, ``protocol.send_text``, ``connection.send_data``,
``connection.transport``), and connection.py bounds what a compressed connection inflates
(``recv_messages.paused`` and its ``resume`` hook, the protocol's message size limit) and
enforces the close deadline websockets sets (``close_deadline``, ``loop``). A
websockets release may change any of these without notice; pyproject.toml allows only the
majors tested here, and a relay started on another version with any of them gone refuses to
start with the version and the name of what is missing, instead of failing at delivery.
"""

from __future__ import annotations

import inspect

import websockets
from websockets.asyncio.connection import Connection
from websockets.asyncio.messages import Assembler
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State
from websockets.server import ServerProtocol

TESTED_MAJORS = (15, 16, 17)
"""websockets majors the relay's tests pass on (pyproject.toml: websockets>=15,<18)."""


def missing_internals() -> list[str]:
    """What the relay relies on and this websockets lacks (empty when all is there)."""
    missing = []
    protocol = ServerProtocol()
    for name in ("state", "extensions", "send_text"):
        if not hasattr(protocol, name):
            missing.append(f"ServerProtocol.{name}")
    if not (hasattr(protocol, "max_message_size") or hasattr(protocol, "max_size")):
        missing.append("ServerProtocol.max_message_size (max_size before 16)")
    if not hasattr(State, "OPEN"):
        missing.append("websockets.protocol.State.OPEN")
    for name in ("send_data", "data_received", "connection_made", "connection_lost", "ping", "wait_closed"):
        if not callable(getattr(ServerConnection, name, None)):
            missing.append(f"ServerConnection.{name}()")
    init = _source(Connection.__init__)
    for name in ("self.loop = ", "self.close_deadline"):
        if name not in init:
            missing.append(f"Connection: {name.strip(' =')} set in __init__()")
    for method in ("send_context", "data_received"):
        if "self.close_deadline = " not in _source(getattr(Connection, method, None)):
            missing.append(f"Connection.{method}() setting self.close_deadline")
    if "self.recv_messages = Assembler(" not in _source(Connection.connection_made):
        missing.append("Connection.recv_messages, an Assembler made in connection_made()")
    for name in ("self.paused", "self.resume = resume"):
        if name not in _source(Assembler.__init__):
            missing.append(f"Assembler: {name}")
    if "self.resume()" not in _source(getattr(Assembler, "maybe_resume", None)):
        missing.append("Assembler.maybe_resume() calling self.resume()")
    return missing


def _source(function: object) -> str:
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return ""


def check_websockets() -> None:
    """Refuse to run on a websockets whose internals the relay uses have changed."""
    missing = missing_internals()
    if missing:
        raise RuntimeError(
            f"websockets {websockets.__version__} lacks what the relay uses below its public API: "
            f"{', '.join(missing)}. The relay is tested with websockets majors "
            f"{', '.join(map(str, TESTED_MAJORS))}: install websockets>=15,<18"
        )
