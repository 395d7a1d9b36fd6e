"""Turn queued events into JSON text, in the sender thread.

The relay refuses NaN and Infinity (they are not JSON). Rather than lose a
whole frame to one diverged loss value, non-finite numbers are mapped to
``null`` here and counted. Numpy and torch scalars are unwrapped with
``.item()``, so metrics can be logged as they come out of a training step.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

_STRICT = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=lambda o: _unwrap(o))


_ATTEMPTS = 3
"""Encodings tried when another thread changes the data meanwhile (emit copies one level deep)."""


class Unencodable(ValueError):
    """The event cannot be turned into JSON at all (e.g. a circular reference)."""


def _unwrap(obj: Any) -> Any:
    """Numpy/torch scalars and arrays become Python numbers and lists."""
    for attr in ("item", "tolist"):
        method = getattr(obj, attr, None)
        if callable(method):
            try:
                return method()
            except (TypeError, ValueError, RuntimeError):
                continue
    if isinstance(obj, set | frozenset):
        return list(obj)
    return str(obj)


def _finite(obj: Any, counter: list[int], depth: int = 0) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by None."""
    if depth > 64:
        raise Unencodable("nested more than 64 levels deep")
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        counter[0] += 1
        return None
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): _finite(v, counter, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v, counter, depth + 1) for v in obj]
    return _finite(_unwrap(obj), counter, depth + 1)


def timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def encode_event(
    event_id: int, ts: float, type_: str, run_id: str, source: dict[str, Any] | None, data: dict
) -> tuple[str, int]:
    """One event as compact ASCII JSON (so len() is the byte size), and how many
    non-finite numbers were mapped to null."""
    event: dict[str, Any] = {"type": type_, "run_id": run_id, "timestamp": timestamp(ts), "id": event_id}
    if source is not None:
        event["source"] = source
    event["data"] = data
    for _ in range(_ATTEMPTS):
        try:
            return _STRICT.encode(event), 0
        except RecursionError:
            break
        except RuntimeError:  # "changed size during iteration": the trainer mutates a nested value
            continue
        except (ValueError, TypeError):
            break
    problem: Exception | None = None
    for _ in range(_ATTEMPTS):
        counter = [0]
        try:
            event["data"] = _finite(data, counter)
            return _STRICT.encode(event), counter[0]
        except RecursionError as exc:
            raise Unencodable(str(exc)) from None
        except RuntimeError as exc:
            problem = exc
        except (ValueError, TypeError) as exc:
            raise Unencodable(str(exc)) from None
    raise Unencodable(str(problem))


def too_large_stand_in(line: str, limit: int) -> str:
    """An ``error`` event with the id, run, time and source of an encoded event too large
    for the relay, so the id is still delivered and acked, and the dashboard
    says what happened instead of a silent hole."""
    try:
        original = json.loads(line)
    except ValueError:
        original = {}
    if not isinstance(original, dict):
        original = {}
    event = {key: original[key] for key in ("type", "run_id", "timestamp", "id", "source") if key in original}
    event["data"] = {
        "message": f"a {str(event.get('type', 'unknown'))[:40]} event was dropped: "
        f"{len(line)} bytes, over the limit of {limit} bytes per event",
    }
    event["type"] = "error"
    return _STRICT.encode(event)
