"""Frame parsing and event validation, free of I/O.

Everything that arrives over a socket passes through here. Each function
either returns clean data or raises :class:`Refused` with a machine-readable
``code`` and a sentence a human can act on, so the I/O layer only has to
forward the error.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .events import EVENT_TYPES, RUN_ID_RE, Event

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)

MAX_HOLDING_RUNS = 1000
"""Runs one ``holding`` report may name."""
PRODUCER_OPS = ("holding",)
"""Control ops a producer may send on ``/publish`` (``hello.accepts``)."""


class Refused(ValueError):
    """Input the relay will not accept, and why."""

    def __init__(self, code: str, detail: str) -> None:
        # A detail may quote the input (a key on a field path), and the input may hold
        # a lone surrogate: escaped here, or the error frame itself could not be encoded.
        detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(detail)
        self.code = code
        self.detail = detail


_FLOAT_MAX = 1.7976931348623157e308


class Poison:
    """Where a refused number was: what the producer wrote, kept for the error."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


_marks = [0]
"""How many values the decoder has marked, ever: a frame that moved it holds one."""


def _mark(detail: str) -> Poison:
    _marks[0] += 1
    return Poison(detail)


def _poison_constant(name: str) -> Poison:
    return _mark(f"{name} is not a number JSON allows; send null or a finite number")


def _poison_float(text: str) -> float | Poison:
    value = float(text)
    if value - value == 0.0:  # finite
        return value
    return _mark(f"{text[:40]} overflows a double; send a finite number")


def _poison_int(text: str) -> int | Poison:
    value = int(text)
    if len(text) > 300 and abs(value) > _FLOAT_MAX:
        return _mark(f"{text[:40]}... overflows a double; send a finite number")
    return value


_DECODER = json.JSONDecoder(parse_constant=_poison_constant, parse_float=_poison_float, parse_int=_poison_int)

_ENCODE_HEADROOM = 200
"""Stack frames kept free when a frame could be nested deep: what decodes with this much
recursion to spare can be encoded again from any later call site (the stored body, the
check for lone surrogates, the root path's reshaping), instead of failing there with
RecursionError and taking the connection down."""
_MAY_NEST_DEEP = 500
"""Fewer containers than this cannot nest deep enough for the headroom to matter."""


def _decode_with_headroom(frame: str, frames: int = _ENCODE_HEADROOM) -> Any:
    if frames:
        return _decode_with_headroom(frame, frames - 1)
    return _DECODER.decode(frame)


def parse_frame(frame: str | bytes) -> tuple[Any, bool]:
    """Decode one frame; also say whether it may hold values to refuse.

    NaN, Infinity and numbers that overflow a double decode to
    :class:`Poison` marks that quote what the producer wrote; a string may
    hold a lone surrogate only if the frame has a ``\\u`` escape. The flag
    is False for almost every frame, so :func:`refuse_unsafe_values` costs
    nothing on the hot path; checking per event lets an array keep its
    good events.
    """
    if isinstance(frame, bytes | bytearray | memoryview):
        raise Refused("binary_frame", "binary frames are not accepted; send JSON as a text frame")
    marks = _marks[0]
    try:
        if frame.count("[") + frame.count("{") >= _MAY_NEST_DEEP:
            obj = _decode_with_headroom(frame)
        else:
            obj = _DECODER.decode(frame)
    except RecursionError:
        raise Refused("bad_json", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() past the digit limit
        raise Refused("bad_json", f"not valid JSON: {exc}") from None
    return obj, _marks[0] != marks or "\\u" in frame


def refuse_unsafe_values(value: Any) -> None:
    """Raise :class:`Refused` if ``value`` holds a marked number or a lone surrogate.

    The error says where: ``data.metrics.loss: NaN is not a number ...``.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, Poison):
            raise Refused("non_finite", f"{_where(path) or 'value'}: {item.detail}")
        if isinstance(item, float) and not math.isfinite(item):  # decoded without marks
            raise Refused("non_finite", f"{_where(path) or 'value'}: not a finite number; send null or one")
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{_key(k)}" if path else _key(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    try:
        encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(
            "bad_unicode",
            "a string holds a lone surrogate escape (\\ud800-\\udfff); send valid UTF-16 pairs",
        ) from None


def parse_json(frame: str | bytes) -> Any:
    """Decode a frame that is refused as a whole if any value is unsafe."""
    obj, suspect = parse_frame(frame)
    if suspect:
        refuse_unsafe_values(obj)
    return obj


def utf8_size(text: str, limit: int) -> int:
    """Length in UTF-8 bytes, exact whenever it could matter against ``limit``.

    Below ``limit / 4`` characters the text cannot exceed ``limit`` bytes, so
    the common small frame skips the encode.
    """
    if len(text) * 4 > limit:
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text)


def encode(obj: Any) -> str:
    """The one JSON encoding the relay sends and stores: compact, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def split_frame(obj: Any, max_events: int) -> list[Any]:
    """A producer frame is one event or an array of them."""
    if isinstance(obj, dict):
        return [obj]
    if isinstance(obj, list):
        if not obj:
            raise Refused("bad_frame", "empty array: send at least one event")
        if len(obj) > max_events:
            raise Refused(
                "too_many_events",
                f"{len(obj)} events in one frame; at most {max_events} are accepted",
            )
        return obj
    raise Refused("bad_frame", "a frame must be an event object or an array of events")


_KEY_CHARS = 40
_PATH_CHARS = 160


def _key(key: object) -> str:
    """A key as an error quotes it: a 60 KB key name must not come back as a 60 KB error."""
    text = str(key)
    return text if len(text) <= _KEY_CHARS else text[: _KEY_CHARS - 3] + "..."


def _where(path: str) -> str:
    """A field path short enough to read: a long one keeps its two ends."""
    if len(path) <= _PATH_CHARS:
        return path
    return path[:60] + "..." + path[-(_PATH_CHARS - 63) :]


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:3]:
        loc = _where(".".join(_key(p) for p in error["loc"][1:] if p is not None)) or "event"
        parts.append(f"{loc}: {error['msg'][:200]}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def parse_holding(msg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """A producer's ``{"op": "holding", "runs": {RUN: {"count": N, "upto": ID}}}`` as
    ``{RUN: (N, ID)}``; anything else is refused whole, with the first thing wrong."""
    if set(msg) != {"op", "runs"}:
        raise Refused("bad_holding", 'a holding report is {"op": "holding", "runs": {...}} and nothing else')
    runs = msg["runs"]
    if not isinstance(runs, dict) or len(runs) > MAX_HOLDING_RUNS:
        raise Refused("bad_holding", f"runs must be an object of at most {MAX_HOLDING_RUNS} run ids")
    held: dict[str, tuple[int, int]] = {}
    for run_id, entry in runs.items():
        if RUN_ID_RE.fullmatch(run_id) is None:
            raise Refused("bad_holding", f"run id {_key(run_id)!r} is not valid")
        count = entry.get("count") if isinstance(entry, dict) else None
        upto = entry.get("upto") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and set(entry) == {"count", "upto"} and _id(count) and _id(upto)):
            raise Refused(
                "bad_holding",
                f'runs[{_key(run_id)!r}] must be {{"count": N, "upto": ID}} with whole numbers >= 1',
            )
        held[run_id] = (count, upto)
    return held


def _id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**63 - 1


def validate_event(raw: Any) -> dict[str, Any]:
    """Check one producer event against its type's model; return it as sent.

    The raw dict is returned rather than a model dump: strict validation
    guarantees its known fields already have the right types, and extra
    metric fields stay exactly as the trainer wrote them.
    """
    if not isinstance(raw, dict):
        raise Refused("not_object", "an event must be a JSON object")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise Refused("missing_type", "an event needs a string 'type'")
    if kind not in EVENT_TYPES:
        raise Refused(
            "unknown_type",
            f"unknown event type {kind[:64]!r}; known: {', '.join(sorted(EVENT_TYPES))}",
        )
    run_id = raw.get("run_id")
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise Refused(
            "bad_run_id",
            "run_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
        )
    try:
        _EVENT_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise Refused("invalid_event", _describe(exc)) from None
    return raw
