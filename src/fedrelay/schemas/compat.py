"""The root path ``/``: frames as hand-rolled trainers send them, as their frontends read them.

The root path exists so that a trainer and a React frontend written for a
30-line broadcast relay keep working unchanged. Such trainers never read
replies, so anything refused there is lost: the root path therefore accepts
every JSON object with a string ``type`` (known to fedrelay or not, any
``data``, any ``run_id`` or none) and checks nothing against the event schema.
What it must still fix is what a browser's ``JSON.parse`` or SQLite would
choke on: NaN, Infinity and numbers that overflow a double become ``null``,
lone surrogate escapes become U+FFFD. Root subscribers get ``type``,
``timestamp`` and ``data`` back as sent (after those two repairs).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from .events import RUN_ID_RE
from .wire import Poison, Refused, encode

ROOT_DEFAULT_RUN = "default"
"""Run of root frames that name none and cannot be tied to one (see ``relay.root_runs``)."""
VIA_ROOT = "root"
"""Value of ``via`` on events that came from the root path."""
SENT_TIMESTAMP = "sent_timestamp"
"""Stored only when a root frame's ``timestamp`` was not a string: root subscribers get it back."""

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9._:\-]")
_NAME_KEEP = 111
"""Characters of a mapped run id kept before ``-`` and 16 hex digits: 128 in all."""


def repair_values(value: Any) -> Any:
    """Replace, in place where possible, what JSON.parse, our encoder or SQLite refuse.

    Non-finite numbers (decoded as :class:`Poison` marks or as inf/nan floats)
    become ``None``; strings and keys holding lone surrogates get U+FFFD in
    their place. Iterative, so that a frame nested 700 deep costs no recursion.
    Returns the repaired value (a new object only when ``value`` itself is one
    of the replaced scalars).
    """
    top = [value]
    stack: list[list[Any] | dict[Any, Any]] = [top]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            if any(isinstance(k, str) and _LONE_SURROGATE.search(k) for k in container):
                items = list(container.items())
                container.clear()
                container.update((_text(k) if isinstance(k, str) else k, v) for k, v in items)
            keys: Any = list(container)
        else:
            keys = range(len(container))
        for key in keys:
            item = container[key]
            if isinstance(item, dict | list):
                stack.append(item)
            elif isinstance(item, Poison) or (isinstance(item, float) and not math.isfinite(item)):
                container[key] = None
            elif isinstance(item, str) and _LONE_SURROGATE.search(item):
                container[key] = _text(item)
    return top[0]


def _text(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text)


def root_run_name(value: Any) -> str | None:
    """The run a root frame's ``data.run_id`` names, or None when it names none.

    Strings are taken as they are, other values as their JSON text (``42`` ->
    ``"42"``, ``1.5`` -> ``"1.5"``). A text that is no valid run id (too long,
    other characters) is mapped deterministically: its invalid characters
    become ``_``, it is cut to 111 characters and gets ``-`` and 16 hex digits
    of a hash of the whole text, so two different ids never share a run.
    ``None``, ``""`` and an absent key name no run.
    """
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else encode(value)
    if RUN_ID_RE.fullmatch(text) is not None:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{_NOT_NAME_CHAR.sub('_', text[:_NAME_KEEP])}-{digest}"


def root_event(raw: Any) -> tuple[dict[str, Any], str | None]:
    """A root frame (already repaired) as an event without its run, and the run it names.

    Refuses only what is no JSON object or has no string ``type``. ``data`` is
    kept whatever it is; a ``timestamp`` that is not a string is kept aside
    (:data:`SENT_TIMESTAMP`) so that root subscribers get it back, while the
    stored ``timestamp`` becomes the relay's receive time. Other top-level
    fields are dropped, as they always were.
    """
    if not isinstance(raw, dict):
        raise Refused("not_object", "a frame must be a JSON object with a string 'type'")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise Refused("missing_type", "a frame needs a string 'type'")
    event: dict[str, Any] = {"type": kind, "via": VIA_ROOT}
    if "timestamp" in raw:
        timestamp = raw["timestamp"]
        if isinstance(timestamp, str):
            event["timestamp"] = timestamp
        else:
            event[SENT_TIMESTAMP] = timestamp
    named = None
    if "data" in raw:
        data = event["data"] = raw["data"]
        if isinstance(data, dict):
            named = root_run_name(data.get("run_id"))
    return event, named


def root_view(event: dict[str, Any]) -> dict[str, Any]:
    """What a root-path subscriber receives for a stored event.

    Events from ``/``: ``type``, ``timestamp`` and ``data`` as sent, with the
    relay's ``run_id`` and ``seq`` beside them (never inside ``data``). Events
    from ``/publish``: as before this path took anything, ``run_id`` and
    ``seq`` inside ``data``, which is what existing frontends read.
    """
    if event.get("via") == VIA_ROOT:
        view: dict[str, Any] = {"type": event["type"]}
        view["timestamp"] = event[SENT_TIMESTAMP] if SENT_TIMESTAMP in event else event.get("timestamp")
        if "data" in event:
            view["data"] = event["data"]
        view["run_id"] = event["run_id"]
        view["seq"] = event["seq"]
        return view
    data = dict(event.get("data") or {})
    data.setdefault("run_id", event["run_id"])
    data["seq"] = event["seq"]
    return {"type": event["type"], "timestamp": event.get("timestamp"), "data": data}
